"""The k-means kind: vector-quantisation codebooks, one per label.

A codebook is K centres. Training is Lloyd's algorithm, the hard-assignment case of the
GMM's EM: every frame goes to its nearest centre, the statistics are those of
:class:`emdist.models.stats.GmmStats` with 0/1 posteriors (counts and sums; the E-step is
:class:`emdist.models.estep.Accumulator` with ``hard=True`` under identity covariances and
equal weights, whose best component is the nearest centre), and the update moves each centre
to the mean of its frames. The objective is the distortion ``D = Σ_t min_k ‖x_t − c_k‖²``;
the statistics' ``loglike`` holds ``−D`` so that the engine's "never decreases" check and
``--tol`` apply unchanged. Recognition picks the codebook with the lowest total distortion
(the highest ``−D``), computed in float64.

Initialisation: ``mixup`` is the Linde-Buzo-Gray splitting of the classic VQ recipe (one
centre, then every centre split in two along ``±perturb_factor·σ`` of its cluster, Lloyd
passes between splits); ``kmeans`` is k-means++ seeding on a sample of the label's frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from emdist.errors import UserError
from emdist.models.estep import Accumulator, EStepOptions, make_kernel
from emdist.models.initialize import centres_model, kmeans_plus_plus, label_rng
from emdist.models.kind import Passes, Pieces
from emdist.models.mstep import MStepOptions, UpdateReport
from emdist.models.stats import GmmStats

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class Codebook:
    """K centres of dimension D (read-only, float64)."""

    centres: np.ndarray

    kind = "kmeans"  # the model kind (emdist.models.kind), not a field

    def __post_init__(self) -> None:
        arr = np.ascontiguousarray(self.centres, dtype=np.float64)
        if arr.ndim != 2 or len(arr) == 0:
            raise ValueError(f"a codebook needs centres of shape (K, D), not {arr.shape}")
        arr.setflags(write=False)
        object.__setattr__(self, "centres", arr)

    @property
    def n_components(self) -> int:
        return int(self.centres.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])

    def as_gmm(self):
        """The GMM whose best component is the nearest centre (identity covariances,
        equal weights): the E-step of a Lloyd pass."""
        return centres_model(self.centres, "diag")

    def distortion(self, frames: np.ndarray, chunk_size: int = 4096) -> np.ndarray:
        """Per-frame squared distance to the nearest centre, float64, chunk by chunk."""
        frames = np.asarray(frames, dtype=np.float64)
        c = self.centres
        half_sq = 0.5 * np.einsum("kd,kd->k", c, c)
        out = np.empty(len(frames))
        for start in range(0, len(frames), chunk_size):
            x = frames[start : start + chunk_size]
            best = (x @ c.T - half_sq).max(axis=1)  # max_k x·c_k − ½‖c_k‖²
            out[start : start + len(x)] = np.maximum(np.einsum("td,td->t", x, x) - 2 * best, 0)
        return out

    def __repr__(self) -> str:
        return f"Codebook(K={self.n_components}, D={self.dim})"


def distortion_of(stats: GmmStats, k: int) -> float:
    """The total distortion of a hard pass under a codebook of ``k`` centres, from the
    log-likelihood its :class:`Accumulator` summed: ``log(1/k) − D/2·log 2π − ½‖x − c‖²``
    per frame."""
    return -2.0 * (stats.loglike - stats.frames * (-math.log(k) - 0.5 * stats.dim * LOG_2PI))


class VqKind:
    name = "kmeans"
    file_format = "emdist-vq"
    per_utterance = False
    inits = ("mixup", "kmeans")
    stats_type = GmmStats

    def accumulate(self, models: Mapping[str, Codebook], pieces: Pieces,
                   options: EStepOptions, hard: bool = True) -> dict[str, GmmStats]:
        """Counts and sums of every codebook's nearest-centre clusters; ``loglike`` is minus
        the distortion."""
        accs: dict[str, Accumulator] = {}
        for key, frames in pieces:
            if key not in accs:
                gmm = models[key].as_gmm()
                accs[key] = Accumulator(make_kernel(gmm, options), gmm.dim, options.chunk_size,
                                        hard=True)
            accs[key].push(frames)
        out = {}
        for key in sorted(accs):
            s = accs[key].finish()
            out[key] = GmmStats(s.zeroth, s.first, s.second,
                                -distortion_of(s, models[key].n_components), s.frames)
        return out

    def update(self, stats: GmmStats, options: MStepOptions,
               previous: Codebook) -> tuple[Codebook, UpdateReport]:
        """Each centre to the mean of its frames; a centre without frames stays."""
        empty = stats.zeroth <= 0
        moved = stats.first / np.where(empty, 1.0, stats.zeroth)[:, None]
        centres = np.where(empty[:, None], previous.centres, moved)
        k = len(centres)
        return Codebook(centres), UpdateReport(k, k, not_updated=np.flatnonzero(empty).tolist())

    def score(self, models: Mapping[str, Codebook],
              utterances: Iterable[tuple[str, np.ndarray]], options: EStepOptions,
              best_path: bool = False) -> list[tuple[str, dict[str, float]]]:
        """Minus the total distortion of every utterance under every codebook."""
        if best_path:
            raise UserError("best-path (Viterbi) scores are for HMMs (--model hmm)")
        return [(utt_id, {label: -float(m.distortion(feats, options.chunk_size).sum())
                          for label, m in sorted(models.items())})
                for utt_id, feats in utterances]

    def initialize(self, passes: Passes, labels: list[str]) -> dict[str, Codebook]:
        cfg = passes.config
        if cfg.init == "kmeans":
            samples = passes.sample(labels)
            for label in labels:
                if len(samples[label]) < cfg.num_gauss:
                    raise UserError(f"model {label!r} has {len(samples[label])} frames, fewer "
                                    f"than --num-gauss {cfg.num_gauss}")
            return {lab: Codebook(kmeans_plus_plus(samples[lab], cfg.num_gauss,
                                                   label_rng(cfg.seed, lab, "kmeans++")))
                    for lab in labels}
        return _lbg(passes, labels)

    def to_file(self, models: Mapping[str, Codebook]) -> tuple[dict, dict[str, np.ndarray]]:
        labels = sorted(models)
        dims = {models[lab].dim for lab in labels}
        if len(dims) != 1:
            raise ValueError(f"codebooks of several dimensions: {sorted(dims)}")
        meta = {"dim": dims.pop(), "labels": labels,
                "n_components": [models[lab].n_components for lab in labels]}
        return meta, {f"{i}.centres": models[lab].centres for i, lab in enumerate(labels)}

    def file_layout(self, meta: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The arrays a file with this (checked) header holds: name -> (label, shape)."""
        return {f"{i}.centres": (label, (k, meta["dim"]))
                for i, (label, k) in enumerate(zip(meta["labels"], meta["n_components"],
                                                   strict=True))}

    def from_file(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> dict[str, Codebook]:
        return {lab: Codebook(arrays[f"{i}.centres"]) for i, lab in enumerate(meta["labels"])}


KIND = VqKind()


def _lbg(passes: Passes, labels: list[str]) -> dict[str, Codebook]:
    """Linde-Buzo-Gray: the mean of each label's frames, then every centre split in two
    (``c ± perturb_factor·σ_c·r``, σ_c the spread of its cluster and r ~ N(0, I)) until K
    (the last split only as many as needed), with ``mixup_iters`` Lloyd passes after each."""
    cfg = passes.config
    stats = passes.e_pass({lab: Codebook(np.zeros((1, passes.dim))) for lab in labels},
                          "init", 1)
    books = {lab: Codebook(s.first / s.zeroth[:, None]) for lab, s in stats.items()}
    rngs = {lab: label_rng(cfg.seed, lab, "lbg") for lab in labels}
    p = 1
    while any(b.n_components < cfg.num_gauss for b in books.values()):
        for lab, book in list(books.items()):
            k = book.n_components
            if k >= cfg.num_gauss:
                continue
            s = stats[lab]
            n = min(k, cfg.num_gauss - k)  # centres to split: the most populated first
            order = np.argsort(-s.zeroth, kind="stable")[:n]
            var = s.second[order] / np.maximum(s.zeroth[order], 1)[:, None] - \
                (s.first[order] / np.maximum(s.zeroth[order], 1)[:, None]) ** 2
            step = cfg.perturb_factor * np.sqrt(np.maximum(var, 0)) * \
                rngs[lab].standard_normal((n, passes.dim))
            centres = book.centres.copy()
            centres[order] -= step
            books[lab] = Codebook(np.vstack([centres, book.centres[order] + step]))
        for _ in range(cfg.mixup_iters):
            p += 1
            stats = passes.e_pass(books, "init", p)
            books, reports = passes.update(books, stats)
            passes.write_update_log(f"init.{p}.log", "LBG Lloyd pass", stats, reports)
    return books
