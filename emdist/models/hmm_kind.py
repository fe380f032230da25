"""The HMM kind: a left-to-right GMM-HMM per word, trained by Baum-Welch (or Viterbi).

* statistics: :class:`emdist.models.hmm.HmmStats` (stacked per-state GMM statistics plus
  transition counts), accumulated per utterance (``per_utterance``: forward-backward needs
  whole utterances), batched over a shard's utterances of each word;
* update: :func:`emdist.models.hmm.update_hmm` (Kaldi's GMM update state by state,
  transitions by normalised counts);
* score: the forward total log-likelihood, or the best path's (``best_path``);
* initialisation: a flat start (each utterance cut into S equal parts, one Gaussian per
  state), then mix-up as for GMMs: every state's Gaussians split (heaviest first) up to
  twice as many, at most ``--num-gauss``, with ``--mixup-iters`` Baum-Welch passes after each
  split;
* model file: format ``emdist-hmm``.

Precision: the Gaussians' scores, which make the per-state emissions and the recorded
objective, are float64 products (the objective is the forward or best-path total to 1e-9,
which float32 scores do not give); the moments' products follow ``--precision`` (float32 by
default, chunks of ``--chunk-size`` frames added to float64 sums, as the GMM's E-step); the
recursions (compiled, :mod:`emdist.models.hmm_kernels`) and all sums are float64.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from emdist.models.gmm_kind import gaussian_arrays, gmm_from_arrays, gmm_to_arrays
from emdist.models.hmm import (
    DEFAULT_BATCH_FRAMES,
    HMM,
    HmmStats,
    accumulate_hmms,
    hmm_from_segmentation,
    score_hmms,
    split_states,
    topology,
    uniform_segmentation_stats,
    update_hmm,
)
from emdist.models.initialize import label_rng
from emdist.models.kind import Passes, Pieces
from emdist.models.mstep import MStepOptions, UpdateReport

log = logging.getLogger("emdist")


@dataclass(frozen=True, eq=False)
class FlatStart:
    """The "model" of a flat-start pass: its statistics are those of the uniform
    segmentation into ``n_states`` parts; its update is the first HMM."""

    n_states: int
    covariance_type: str
    mask: np.ndarray
    dim: int

    kind = "hmm"

    @property
    def n_components(self) -> int:
        return self.n_states


def _by_label(pieces: Pieces) -> dict[str, list[np.ndarray]]:
    """A shard's utterances grouped by label, in order."""
    out: dict[str, list[np.ndarray]] = {}
    for key, frames in pieces:
        out.setdefault(key, []).append(frames)
    return out


class HmmKind:
    name = "hmm"
    file_format = "emdist-hmm"
    per_utterance = True
    inits = ("mixup",)
    stats_type = HmmStats

    def accumulate(self, models: Mapping[str, HMM | FlatStart], pieces: Pieces, options,
                   hard: bool = False) -> dict[str, HmmStats]:
        """Forward-backward (Viterbi with ``hard``) statistics of each word's utterances."""
        by_label = _by_label(pieces)
        flat = {k: m for k, m in models.items() if isinstance(m, FlatStart) and k in by_label}
        out = {key: uniform_segmentation_stats(m.n_states, by_label[key], m.covariance_type,
                                               m.mask) for key, m in flat.items()}
        hmms = {key: utts for key, utts in by_label.items() if key not in flat}
        if hmms:
            out.update(accumulate_hmms(models, hmms, hard=hard,
                                       batch_frames=DEFAULT_BATCH_FRAMES,
                                       chunk_size=options.chunk_size,
                                       moments_dtype=options.dtype))
        return dict(sorted(out.items()))

    def update(self, stats: HmmStats, options: MStepOptions,
               previous: HMM | FlatStart) -> tuple[HMM, UpdateReport]:
        if isinstance(previous, FlatStart):
            model = hmm_from_segmentation(stats, previous.mask, options)
            return model, UpdateReport(previous.n_states, model.n_components)
        return update_hmm(stats, previous, options)

    def score(self, models: Mapping[str, HMM], utterances: Iterable[tuple[str, np.ndarray]],
              options, best_path: bool = False) -> list[tuple[str, dict[str, float]]]:
        """Forward (or best-path) total log-likelihood of every utterance under every word's
        HMM, batched over the utterances; ``-inf`` where no path fits the utterance."""
        ids, feats = [], []
        for utt_id, frames in utterances:
            ids.append(utt_id)
            feats.append(frames)
        totals = score_hmms(dict(sorted(models.items())), feats, best_path,
                            DEFAULT_BATCH_FRAMES)
        return [(utt_id, {label: float(t[i]) for label, t in totals.items()})
                for i, utt_id in enumerate(ids)]

    def initialize(self, passes: Passes, labels: list[str]) -> dict[str, HMM]:
        cfg = passes.config
        mask = topology(cfg.num_states, skip=cfg.skip, exit=True)
        flat = {lab: FlatStart(cfg.num_states, cfg.covariance_type, mask, passes.dim)
                for lab in labels}
        stats = passes.e_pass(flat, "init", 1)
        models, reports = passes.update(flat, stats)
        passes.write_update_log("init.1.log", "flat start: uniform segmentation", stats,
                                reports)
        for lab, s in stats.items():
            if s.unaligned:
                log.warning("model %s: %d utterances shorter than %d frames are left out",
                            lab, s.unaligned, cfg.num_states)
        rngs = {lab: label_rng(cfg.seed, lab, "mixup") for lab in labels}
        # per word and state: still growing (below --num-gauss, and its last split held)
        growing = {lab: m.state_sizes < cfg.num_gauss for lab, m in models.items()}
        p = 1
        while any(g.any() for g in growing.values()):
            before = {lab: m.state_sizes for lab, m in models.items()}
            models = {lab: split_states(
                m, np.where(growing[lab], np.minimum(2 * m.state_sizes, cfg.num_gauss),
                            m.state_sizes), cfg.perturb_factor, rngs[lab])
                for lab, m in models.items()}
            for _ in range(cfg.mixup_iters):
                p += 1
                stats = passes.e_pass(models, "init", p, hard=cfg.viterbi)
                models, reports = passes.update(models, stats)
                passes.write_update_log(f"init.{p}.log", "mix-up Baum-Welch pass", stats,
                                        reports)
            for lab, m in models.items():
                if len(m.state_sizes) != len(before[lab]):
                    raise RuntimeError("a mix-up pass changed the number of states")
                held = m.state_sizes > before[lab]
                starved = growing[lab] & ~held
                if starved.any():  # as the GMM mix-up: that state stops growing
                    log.warning("model %s: state(s) %s stay at %s Gaussians; the others lack "
                                "occupancy (--min-gaussian-occupancy)", lab,
                                np.flatnonzero(starved).tolist(),
                                m.state_sizes[starved].tolist())
                growing[lab] = growing[lab] & held & (m.state_sizes < cfg.num_gauss)
        return models

    def to_file(self, models: Mapping[str, HMM]) -> tuple[dict, dict[str, np.ndarray]]:
        labels = sorted(models)
        kinds = {(models[lab].covariance_type, models[lab].dim) for lab in labels}
        if len(kinds) != 1:
            raise ValueError(f"HMMs of several covariance types or dimensions: {kinds}")
        cov, dim = kinds.pop()
        meta = {"covariance_type": cov, "dim": dim, "labels": labels,
                "n_components": [models[lab].state_sizes.tolist() for lab in labels]}
        arrays = {}
        for i, lab in enumerate(labels):
            arrays[f"{i}.transitions"] = models[lab].transitions
            for s, gmm in enumerate(models[lab].states):
                arrays.update(gmm_to_arrays(f"{i}.{s}.", gmm))
        return meta, arrays

    def file_layout(self, meta: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The arrays a file with this (checked) header holds: name -> (label, shape)."""
        full = meta["covariance_type"] == "full"
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for i, (label, sizes) in enumerate(zip(meta["labels"], meta["n_components"],
                                               strict=True)):
            out[f"{i}.transitions"] = (label, (len(sizes), len(sizes) + 1))
            for s, k in enumerate(sizes):
                out.update(gaussian_arrays(f"{i}.{s}.", label, k, meta["dim"], full))
        return out

    def from_file(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> dict[str, HMM]:
        out = {}
        for i, lab in enumerate(meta["labels"]):
            states = tuple(gmm_from_arrays(f"{i}.{s}.", arrays, meta["covariance_type"])
                           for s in range(len(meta["n_components"][i])))
            out[lab] = HMM(states, arrays[f"{i}.transitions"])
        return out


KIND = HmmKind()
