"""Isolated-word recognition: each utterance goes to the model with the highest total
score, the log-likelihood ``log p(x_1..x_T | word)`` (a GMM's ``Σ_t log p(x_t)``, an HMM's
forward total or best path) or minus the distortion of a k-means codebook; error rate and
confusion matrix against ``text``. An utterance that no model can score (shorter than every
HMM word model's number of states) gets no hypothesis and counts as an error, as a decoder
that reaches no final state gives no output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emdist.backends.base import Backend, JobsFailed
from emdist.data.datadir import DataDir, split_by_frames
from emdist.errors import RuntimeFailure, UserError
from emdist.io.modelio import atomic_write_text, check_models_fit
from emdist.models.estep import EStepOptions
from emdist.tasks import GLOBAL_LABEL, Shard, score_shard

log = logging.getLogger("emdist")


@dataclass(frozen=True)
class Results:
    """Recognition results; ``to_dict`` is the content of ``results.json``."""

    labels: list[str]
    utts: list[dict]
    confusion: np.ndarray

    @property
    def n_utts(self) -> int:
        return len(self.utts)

    @property
    def n_errors(self) -> int:
        return sum(u["ref"] != u["hyp"] for u in self.utts)

    @property
    def n_unscored(self) -> int:
        """Utterances no model could score (no hypothesis; errors, outside the confusion)."""
        return sum(u["hyp"] is None for u in self.utts)

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.n_utts if self.utts else 0.0

    def summary_line(self) -> str:
        """Kaldi's ``%WER``-style line: ``%ERR 0.91 [ 1 / 110 ]``."""
        return f"%ERR {100.0 * self.error_rate:.2f} [ {self.n_errors} / {self.n_utts} ]"

    def to_dict(self) -> dict:
        return {
            "accuracy": 1.0 - self.error_rate,
            "error_rate": self.error_rate,
            "n_utts": self.n_utts,
            "n_errors": self.n_errors,
            "n_unscored": self.n_unscored,
            "labels": self.labels,
            "confusion": self.confusion.tolist(),
            "utts": self.utts,
        }


def score(
    models: Mapping, data: DataDir, backend: Backend, nj: int = 8,
    options: EStepOptions | None = None, best_path: bool = False, progress=None,
) -> dict[str, dict[str, float]]:
    """Total score of every utterance under every model: ``{utt: {label: score}}``: the
    log-likelihood (an HMM's forward total, or its best path with ``best_path``), or minus
    the distortion for k-means codebooks. The models must fit the data
    (:func:`emdist.io.modelio.check_models_fit`). ``progress`` (see
    :class:`emdist.engine.trainer.Progress`) hears of each scored shard."""
    check_models_fit(models, data)
    shards = [Shard(i, part, tuple(GLOBAL_LABEL for _ in part))
              for i, part in enumerate(split_by_frames(data.utts, nj))]
    on_done = None
    if progress is not None:
        progress.start("score", len(shards), data.num_frames)
        on_done = lambda j: progress.advance(shards[j].num_frames)  # noqa: E731
    try:
        parts = backend.map(score_shard, shards, dict(models), options or EStepOptions(),
                            best_path, on_done=on_done)
    except JobsFailed as failed:
        first = failed.failures[0]
        kind = UserError if all(isinstance(f.error, UserError) for f in failed.failures) \
            else RuntimeFailure
        raise kind(
            f"{len(failed.failures)} / {failed.total} scoring jobs failed; job "
            f"{first.index + 1}: {first.error}"
        ) from None
    finally:
        if progress is not None:
            progress.finish()
    return {utt: scores for part in parts for utt, scores in part}


def decide(scores: Mapping[str, float]) -> tuple[str | None, float]:
    """The best label and its score (ties go to the first label in sorted order); None and
    -inf when no model gives the utterance a finite score (each HMM word model needs at
    least as many frames as it has states)."""
    labels = sorted(scores)
    values = np.array([scores[lab] for lab in labels])
    best = int(np.argmax(values))
    if not np.isfinite(values[best]):
        return None, float("-inf")
    return labels[best], float(values[best])


def _finite(score: float) -> float | None:
    return float(score) if np.isfinite(score) else None


def evaluate(models: Mapping, data: DataDir, backend: Backend, nj: int = 8,
             options: EStepOptions | None = None, best_path: bool = False,
             progress=None) -> Results:
    """Recognise every utterance of ``data`` (the model with the highest score) and compare
    with its ``text`` label."""
    if not data.has_text:
        raise UserError(f"{data.path}: no text file; scoring needs reference labels")
    scores = score(models, data, backend, nj, options, best_path, progress)
    labels = sorted(models)
    index = {lab: i for i, lab in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    utts = []
    unscored = []
    for utt in data.utts:
        hyp, best = decide(scores[utt.utt_id])
        if hyp is None:  # no model can align it (HMMs, fewer frames than states): null
            unscored.append(utt)
        else:
            confusion[index[utt.label], index[hyp]] += 1
        utts.append({"utt": utt.utt_id, "ref": utt.label, "hyp": hyp,
                     "score": _finite(best),
                     "scores": {lab: _finite(v) for lab, v in sorted(scores[utt.utt_id].items())}})
    if unscored:
        first = unscored[0]
        log.warning("%d utterances fit no model (e.g. %s, %d frames: fewer than any HMM word "
                    "model's states); they have no hypothesis and count as errors",
                    len(unscored), first.utt_id, first.num_frames)
    return Results(labels, utts, confusion)


@dataclass(frozen=True)
class LikelihoodResults:
    """Scores of a data dir under one global model (a UBM): no words to recognise."""

    utts: list[dict]

    @property
    def n_frames(self) -> int:
        return sum(u["frames"] for u in self.utts)

    @property
    def loglike_per_frame(self) -> float:
        return sum(u["score"] for u in self.utts) / max(self.n_frames, 1)

    def summary_line(self) -> str:
        """``%LOGLIKE -60.6312 per frame [ 6129 frames / 110 utts ]``."""
        return (f"%LOGLIKE {self.loglike_per_frame:.4f} per frame [ {self.n_frames} frames / "
                f"{len(self.utts)} utts ]")

    def to_dict(self) -> dict:
        return {
            "model": GLOBAL_LABEL,
            "loglike_per_frame": self.loglike_per_frame,
            "n_utts": len(self.utts),
            "n_frames": self.n_frames,
            "utts": self.utts,
        }


def evaluate_global(model, data: DataDir, backend: Backend, nj: int = 8,
                    options: EStepOptions | None = None, progress=None) -> LikelihoodResults:
    """Total score of every utterance of ``data`` under one global model (log-likelihood;
    minus the distortion for a k-means codebook)."""
    scores = score({GLOBAL_LABEL: model}, data, backend, nj, options, progress=progress)
    utts = [{"utt": u.utt_id, "frames": u.num_frames, "score": scores[u.utt_id][GLOBAL_LABEL]}
            for u in data.utts]
    return LikelihoodResults(utts)


def write_results(results: Results | LikelihoodResults, path: str | Path) -> None:
    """Write ``results.json`` atomically."""
    atomic_write_text(path, json.dumps(results.to_dict(), indent=1, allow_nan=False) + "\n")
