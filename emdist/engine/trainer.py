"""The pass machinery of training: shards, the feature cache, progress, and a
:class:`Trainer` that runs "statistics of every shard, ordered sum" passes with a backend,
writes job and update logs, and turns failed jobs into one clear error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

import numpy as np

from emdist.backends.base import Backend, JobsFailed
from emdist.data.datadir import DataDir, split_by_frames
from emdist.engine.config import IterationRecord, TrainConfig
from emdist.errors import RuntimeFailure, UserError
from emdist.io.expdir import ExpDir
from emdist.io.modelio import atomic_write_text
from emdist.models.estep import EStepOptions
from emdist.models.gmm import GMM
from emdist.models.gselect import kept_bytes_per_frame
from emdist.models.kind import update_models
from emdist.models.mstep import MStepOptions, UpdateReport
from emdist.models.stats import StatsMap
from emdist.tasks import (
    GLOBAL_LABEL,
    Shard,
    acc_shard,
    check_shard,
    hold,
    sample_shard,
    select_shard,
    without,
)

log = logging.getLogger("emdist")


def make_shards(data: DataDir, nj: int, global_mode: bool, subsample: int = 1) -> list[Shard]:
    """Split a data dir into ``nj`` shards balanced by frames, with each utterance's model.

    With ``subsample`` n, every n-th frame of each utterance is used (Kaldi's
    ``subsample-feats --n``): utterances count the frames kept, and the shards are those of
    a data dir holding only those frames.
    """
    utts = data.utts
    if subsample > 1:
        utts = tuple(replace(u, num_frames=-(-u.num_frames // subsample)) for u in utts)
    if not global_mode:
        unlabelled = [u.utt_id for u in data.utts if u.label is None]
        if unlabelled:
            raise UserError(
                f"{data.path}/text: utterance {unlabelled[0]} has no label; every utterance "
                "needs one to train word models (or use --global)"
            )
    parts = split_by_frames(utts, nj)
    return [
        Shard(i, part, tuple(GLOBAL_LABEL if global_mode else u.label for u in part), subsample)
        for i, part in enumerate(parts)
    ]


class Progress(Protocol):
    """Receives progress of each pass (the CLI draws a bar or prints lines)."""

    def start(self, title: str, n_jobs: int, n_frames: int) -> None: ...

    def advance(self, n_frames: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, title: str, n_jobs: int, n_frames: int) -> None:
        pass

    def advance(self, n_frames: int) -> None:
        pass

    def finish(self) -> None:
        pass


FEATURE_CACHE_MODES = ("auto", "memory", "none")


def cache_mode(requested: str, n_bytes: int, capacity: int) -> str:
    """``memory`` or ``none``: ``auto`` caches when the features fill at most half of
    the memory available (Dask spills at 60 % and pauses at 80 % of a worker's limit)."""
    if requested not in FEATURE_CACHE_MODES:
        raise UserError(f"--feature-cache must be auto, memory or none, not {requested!r}")
    if requested != "auto":
        return requested
    return "memory" if capacity and n_bytes <= capacity // 2 else "none"


class Trainer:
    """Runs passes over the shards with a backend and writes the exp dir as it goes."""

    def __init__(self, shards: list[Shard], dim: int, config: TrainConfig, backend: Backend,
                 exp: ExpDir | None, on_record: Callable[[IterationRecord], None] | None = None,
                 feature_cache: str = "auto", progress: Progress | None = None):
        self.shards = shards
        self.dim = dim
        self.config = config
        self.backend = backend
        self.exp = exp
        self.on_record = on_record
        self.progress = progress or NoProgress()
        # float32 features, plus a kept Gaussian selection
        per_frame = dim * 4 + (kept_bytes_per_frame(config.gselect, config.num_gauss)
                               if config.selects else 0)
        n_bytes = sum(s.num_frames for s in shards) * per_frame
        self.cache_mode = cache_mode(feature_cache, n_bytes, backend.memory_capacity())
        self._sources: list | None = None
        self._selected: list | None = None

    def select(self, model: GMM, n_select: int) -> None:
        """Gaussian selection under ``model`` on every shard, kept (on the workers) for the
        passes that follow (``e_pass(..., selected=True)``): with the feature cache, each
        shard is kept in block order instead of stream order; streamed, the selection alone."""
        command = f"emdist gselect: select_shard(n={n_select})"
        frames = [s.num_frames for s in self.shards]
        self.progress.start("gselect", len(self.shards), sum(frames))
        try:
            kept = self.backend.keep(select_shard, self.sources, {GLOBAL_LABEL: model},
                                     self.config.estep, n_select,
                                     on_done=lambda j: self.progress.advance(frames[j]))
        except JobsFailed as failed:
            raise self.job_failure(failed, "gselect", 0, command) from None
        finally:
            self.progress.finish()
        if self.cache_mode == "memory":
            self._selected, self._sources = kept, None  # the block-ordered copy replaces it
        else:
            self._selected = [(src, sel) for src, sel in zip(self.sources, kept, strict=True)]

    def validate(self, empty: tuple = ()) -> list:
        """The first pass over the data, before any EM work: every shard's utterances
        checked on the workers (NaN, infinite or absurd features; all of them, not only the
        first). Without ``--skip-bad-utts`` any bad one is a user error naming the first and
        their count; with it, they (and ``empty``, the zero-frame utterances the data dir
        dropped) are left out, listed in ``log/skipped_utts.txt``, and the run fails if more
        than ``--max-skip-fraction`` of the utterances would go. Returns what was skipped."""
        try:
            found = self.backend.map(check_shard, self.sources)
        except JobsFailed as failed:
            raise self.job_failure(failed, "check", 0, "emdist check: read and check every "
                                   "utterance") from None
        bad = [b for part in found for b in part] + list(empty)
        if not bad:
            return []
        total = sum(len(s.utts) for s in self.shards) + len(empty)
        if not self.config.skip_bad_utts:
            listing = self._write_utt_list("bad_utts.txt", bad)
            raise UserError(f"{len(bad)} of {total} utterances cannot be trained on ({listing})"
                            f"; the first: {bad[0].describe()}; fix or drop them, or rerun "
                            "with --skip-bad-utts")
        listing = self._write_utt_list("skipped_utts.txt", bad)
        if len(bad) > self.config.max_skip_fraction * total:
            raise UserError(f"{len(bad)} of {total} utterances cannot be trained on, more than "
                            f"--max-skip-fraction {self.config.max_skip_fraction:g} "
                            f"({listing}); the first: {bad[0].describe()}")
        ids = {b.utt_id for b in bad}
        self.shards = [without(s, ids) for s in self.shards]
        if self.cache_mode != "memory":  # the cached copies left them out when loading
            self._sources = self.backend.keep(hold, self.shards)
        log.warning("skipped %d of %d utterances whose features cannot be trained on (%s)",
                    len(bad), total, listing)
        return bad

    def _write_utt_list(self, name: str, bad: list) -> str:
        """Write ``log/<name>`` (utt-id, rxfilename, reason per line); where it is."""
        if self.exp is None:
            return "not written: no exp dir"
        path = self.exp.path / "log" / name
        atomic_write_text(path, "".join(f"{b.utt_id} {b.rxfilename} {b.reason}\n"
                                        for b in bad))
        return f"listed in {path}"

    @property
    def sources(self) -> list:
        """What E-step tasks read: the shards' cached copies in (worker) memory, or, when
        they stream, the shards' descriptions, kept on the workers so that a pass sends
        references only."""
        if self._sources is None:
            if self.cache_mode == "memory":
                self._sources = self.backend.cache(self.shards)
            else:
                self._sources = self.backend.keep(hold, self.shards)
        elif self.cache_mode == "memory":
            self._sources = self.backend.rebalance(self._sources)
        return self._sources

    def e_pass(self, models: Mapping[str, GMM], stage: str, i: int, hard: bool = False,
               options: EStepOptions | None = None, selected: bool = False) -> StatsMap:
        """Statistics of every model over all shards, summed in shard order; over each
        frame's selected Gaussians with ``selected`` (after :meth:`select`)."""
        options = options or self.config.estep
        command = f"emdist {stage} pass {i}: acc_shard(model={i}, hard={hard})"
        if selected:
            if self._selected is None:
                raise RuntimeError("e_pass(selected=True) before select()")
            command = f"emdist {stage} pass {i}: acc_shard(model={i}, gselect)"
        frames = [s.num_frames for s in self.shards]
        self.progress.start(f"{stage} {i}", len(self.shards), sum(frames))
        try:
            stats, reports = self.backend.map_reduce(
                acc_shard, self._selected if selected else self.sources, dict(models),
                options, hard,
                on_done=lambda j: self.progress.advance(frames[j]),
            )
        except JobsFailed as failed:
            raise self.job_failure(failed, stage, i, command) from None
        finally:
            self.progress.finish()
        if self.exp is not None:
            for report in reports:
                self.exp.write_job_log(stage, i, command, report)
        return stats

    def job_failure(self, failed: JobsFailed, stage: str, i: int,
                    command: str) -> RuntimeFailure | UserError:
        """Write the failed jobs' logs; one error naming the first job, its utterances, its
        log and its error: a user error (exit 2) when every job failed on bad data (the
        tasks do not retry those), else a runtime failure (exit 1, as run.pl's "k / n jobs
        failed")."""
        first = failed.failures[0]
        where = ""
        for f in failed.failures:
            if self.exp is not None:
                path = self.exp.write_failed_log(stage, i, f.index + 1, command, f.traceback)
                where = where or f", log is in {path}"
        shard = self.shards[first.index]
        utts = f"{shard.utts[0].utt_id} .. {shard.utts[-1].utt_id}"
        summary = (f"{len(failed.failures)} / {failed.total} jobs failed{where}; "
                   f"job {shard.job} ({utts}): {first.error}")
        if self.exp is not None and self.exp.model_numbers():
            # mid-run (the data passed the first pass: a vanished mount, a rewritten ark)
            summary += "; " + self.exp.kept("fix the cause (the features must stay readable)")
        if all(isinstance(f.error, UserError) for f in failed.failures):
            return UserError(summary)
        return RuntimeFailure(summary)

    def update(self, models, stats: StatsMap, options: MStepOptions | None = None):
        """Update of every model by its kind; returns the new models and the per-model
        reports (:class:`emdist.models.mstep.UpdateReport`)."""
        return update_models(models, stats, options or self.config.mstep)

    def sample(self, labels: list[str]) -> dict[str, np.ndarray]:
        """Every ``stride``-th frame of each model's stream, at most ``max_sample_frames``
        (float64), for initialisations that start from frames (k-means++)."""
        totals: dict[str, int] = {}
        starts_per_shard = []
        for shard in self.shards:
            starts = []
            for utt, key in zip(shard.utts, shard.keys, strict=True):
                starts.append(totals.get(key, 0))
                totals[key] = totals.get(key, 0) + utt.num_frames
            starts_per_shard.append(tuple(starts))
        stride = max(1, math.ceil(max(totals.values()) / self.config.max_sample_frames))
        try:
            samples = self.backend.map(
                _sample_task, list(zip(self.sources, starts_per_shard, strict=True)), stride
            )
        except JobsFailed as failed:
            raise self.job_failure(failed, "init", 0, f"emdist init pass 0: sample every "
                                   f"{stride}th frame") from None
        merged: dict[str, list[np.ndarray]] = {}
        for sample in samples:
            for key, frames in sample.items():
                merged.setdefault(key, []).append(frames)
        return {key: np.concatenate(merged[key]) for key in labels}

    def write_update_log(self, name: str, command: str, stats: StatsMap,
                         reports: Mapping[str, UpdateReport]) -> None:
        if self.exp is None:
            return
        lines = [r.line(label, stats[label].occupancy) for label, r in reports.items()]
        self.exp.write_update_log(name, command, lines)


def _sample_task(item: tuple, stride: int) -> dict[str, np.ndarray]:
    source, starts = item
    return sample_shard(source, stride, starts)
