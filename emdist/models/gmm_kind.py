"""The GMM kind (the default): one Gaussian mixture per label, trained by EM.

* statistics: :class:`emdist.models.stats.GmmStats`, accumulated by
  :class:`emdist.models.estep.Accumulator` over the stream of a label's frames (chunks are
  cut from the stream, so utterance boundaries do not matter: ``per_utterance`` is false);
* update: :func:`emdist.models.mstep.m_step`;
* score: the total log-likelihood, all labels' models at once where they share a layout
  (:class:`emdist.models.kernel.StackedScorer`);
* initialisation: Kaldi-style mix-up (``mixup``) or k-means++ and Lloyd passes (``kmeans``);
* model file: format ``emdist-gmm`` (see :mod:`emdist.io.modelio`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np

from emdist.errors import UserError
from emdist.models.estep import Accumulator, EStepOptions, make_kernel
from emdist.models.gmm import GMM
from emdist.models.initialize import centres_model, kmeans_plus_plus, label_rng, split
from emdist.models.kernel import Scorer, StackedScorer
from emdist.models.kind import Passes, Pieces, per_frame
from emdist.models.mstep import MStepOptions, UpdateReport, m_step
from emdist.models.stats import GmmStats

log = logging.getLogger("emdist")


class GmmKind:
    name = "gmm"
    file_format = "emdist-gmm"
    per_utterance = False
    inits = ("mixup", "kmeans")
    stats_type = GmmStats

    # -- on the workers ------------------------------------------------------------------

    def accumulate(self, models: Mapping[str, GMM], pieces: Pieces, options: EStepOptions,
                   hard: bool = False) -> dict[str, GmmStats]:
        """Statistics of every label's model over its frames (hard: best component only)."""
        accs: dict[str, Accumulator] = {}
        for key, frames in pieces:
            if key not in accs:
                accs[key] = Accumulator(make_kernel(models[key], options), models[key].dim,
                                        options.chunk_size, hard=hard)
            accs[key].push(frames)
        return {key: accs[key].finish() for key in sorted(accs)}

    def score(self, models: Mapping[str, GMM], utterances: Iterable[tuple[str, np.ndarray]],
              options: EStepOptions, best_path: bool = False
              ) -> list[tuple[str, dict[str, float]]]:
        """Total log-likelihood of every utterance under every model (all models at once,
        see :class:`StackedScorer`, when their kernels share a layout)."""
        if best_path:
            raise UserError("best-path (Viterbi) scores are for HMMs (--model hmm)")
        labels = sorted(models)
        kernels = [make_kernel(models[label], options) for label in labels]
        out = []
        if StackedScorer.fits(kernels):
            stacked = StackedScorer(kernels, options.chunk_size)
            for utt_id, feats in utterances:
                totals = stacked.totals(feats)
                out.append((utt_id, dict(zip(labels, totals.tolist(), strict=True))))
            return out
        scorers = {label: Scorer(k, options.chunk_size)
                   for label, k in zip(labels, kernels, strict=True)}
        for utt_id, feats in utterances:
            out.append((utt_id, {label: float(s.frame_log_likelihood(feats).sum())
                                 for label, s in scorers.items()}))
        return out

    # -- on the driver -------------------------------------------------------------------

    def update(self, stats: GmmStats, options: MStepOptions,
               previous: GMM | None) -> tuple[GMM, UpdateReport]:
        return m_step(stats, options, previous=previous)

    def initialize(self, passes: Passes, labels: list[str]) -> dict[str, GMM]:
        init = passes.config.init
        return init_kmeans(passes, labels) if init == "kmeans" else init_mixup(passes, labels)

    # -- model files ---------------------------------------------------------------------

    def to_file(self, models: Mapping[str, GMM]) -> tuple[dict, dict[str, np.ndarray]]:
        labels = sorted(models)
        first = models[labels[0]]
        for label in labels:
            gmm = models[label]
            if (gmm.covariance_type, gmm.dim) != (first.covariance_type, first.dim):
                raise ValueError(
                    f"model {label!r} is {gmm.covariance_type} of dim {gmm.dim}, model "
                    f"{labels[0]!r} {first.covariance_type} of dim {first.dim}: one file holds "
                    "models of one kind"
                )
        meta = {
            "covariance_type": first.covariance_type,
            "dim": first.dim,
            "labels": labels,
            "n_components": [models[lab].n_components for lab in labels],
        }
        arrays = {}
        for i, label in enumerate(labels):
            arrays.update(gmm_to_arrays(f"{i}.", models[label]))
        return meta, arrays

    def file_layout(self, meta: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The arrays a file with this (checked) header holds: name -> (label, shape)."""
        full = meta["covariance_type"] == "full"
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for i, (label, k) in enumerate(zip(meta["labels"], meta["n_components"], strict=True)):
            out.update(gaussian_arrays(f"{i}.", label, k, meta["dim"], full))
        return out

    def from_file(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> dict[str, GMM]:
        return {label: gmm_from_arrays(f"{i}.", arrays, meta["covariance_type"])
                for i, label in enumerate(meta["labels"])}


KIND = GmmKind()


def gmm_to_arrays(prefix: str, gmm: GMM) -> dict[str, np.ndarray]:
    """A GMM's arrays in a model file: ``<prefix>weights``, ``means``, ``covariances``."""
    return {f"{prefix}weights": gmm.weights, f"{prefix}means": gmm.means,
            f"{prefix}covariances": gmm.covariances}


def gmm_from_arrays(prefix: str, arrays: Mapping[str, np.ndarray],
                    covariance_type: str) -> GMM:
    """The GMM :func:`gmm_to_arrays` wrote under ``prefix``."""
    return GMM(arrays[f"{prefix}weights"], arrays[f"{prefix}means"],
               arrays[f"{prefix}covariances"], covariance_type)


def gaussian_arrays(prefix: str, label: str, k: int, dim: int,
                    full: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The arrays of K Gaussians in a model file (``<prefix>weights``, ``means``,
    ``covariances``): name -> (label, shape)."""
    return {f"{prefix}weights": (label, (k,)), f"{prefix}means": (label, (k, dim)),
            f"{prefix}covariances": (label, (k, dim, dim) if full else (k, dim))}


# -- initialisation passes ----------------------------------------------------------------


def init_kmeans(passes: Passes, labels: list[str]) -> dict[str, GMM]:
    """k-means++ seeds on each model's own frames, Lloyd passes, then one M-step."""
    cfg = passes.config
    samples = passes.sample(labels)
    centres = {}
    for label in labels:
        if len(samples[label]) < cfg.num_gauss:
            raise UserError(
                f"model {label!r} has {len(samples[label])} frames, fewer than --num-gauss "
                f"{cfg.num_gauss}"
            )
        centres[label] = kmeans_plus_plus(
            samples[label], cfg.num_gauss, label_rng(cfg.seed, label, "kmeans++")
        )
    for p in range(1, cfg.kmeans_iters + 2):
        # nearest centres are the same under identity covariances of either type: only the
        # last pass, whose statistics make the model, needs full second-order sums
        cov = cfg.covariance_type if p == cfg.kmeans_iters + 1 else "diag"
        models = {lab: centres_model(c, cov) for lab, c in centres.items()}
        stats = passes.e_pass(models, "init", p, hard=True)
        if p == cfg.kmeans_iters + 1:
            break
        for label, s in stats.items():
            moved = s.first / np.maximum(s.zeroth, 1.0)[:, None]
            centres[label] = np.where(s.zeroth[:, None] > 0, moved, centres[label])
        log.info("k-means pass %d: distortion per frame %.4f", p, -2.0 * per_frame(stats)[0])
    removing = replace(cfg.mstep, remove_low_count_gaussians=True)
    new, reports = passes.update(models, stats, removing)
    passes.write_update_log(f"init.{p}.log", "initial model from k-means", stats, reports)
    for label, r in reports.items():
        if r.not_updated:
            raise UserError(
                f"model {label!r}: no k-means cluster has enough frames for the M-step; use "
                "fewer Gaussians or lower --min-gaussian-occupancy"
            )
        if r.removed:
            log.warning("model %s: starts with %d Gaussians; %d k-means clusters lack "
                        "occupancy (--min-gaussian-occupancy)", label, r.n_components_out,
                        len(r.removed))
    return new


def init_mixup(passes: Passes, labels: list[str]) -> dict[str, GMM]:
    """Kaldi-style mix-up: one Gaussian per model, split the heaviest until K, EM between."""
    cfg = passes.config
    one = {lab: centres_model(np.zeros((1, passes.dim)), cfg.covariance_type) for lab in labels}
    stats = passes.e_pass(one, "init", 1)
    models, reports = passes.update(one, stats)
    passes.write_update_log("init.1.log", "one Gaussian per model", stats, reports)
    rngs = {lab: label_rng(cfg.seed, lab, "mixup") for lab in labels}
    growing = {lab for lab, m in models.items() if m.n_components < cfg.num_gauss}
    p = 1
    while growing:
        before = {lab: models[lab].n_components for lab in growing}
        models = {
            lab: split(m, min(2 * m.n_components, cfg.num_gauss), cfg.perturb_factor, rngs[lab])
            if lab in growing else m
            for lab, m in models.items()
        }
        for _ in range(cfg.mixup_iters):
            p += 1
            stats = passes.e_pass(models, "init", p)
            models, reports = passes.update(models, stats)
            passes.write_update_log(f"init.{p}.log", "mix-up EM pass", stats, reports)
        for lab in sorted(growing):
            k = models[lab].n_components
            if k <= before[lab]:  # the new Gaussians were starved and removed
                log.warning("model %s: stays at %d Gaussians; the others lack occupancy "
                            "(--min-gaussian-occupancy)", lab, k)
        growing = {lab for lab in growing
                   if before[lab] < models[lab].n_components < cfg.num_gauss}
    return models
