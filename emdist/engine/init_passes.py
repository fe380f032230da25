"""Initial models as passes of the engine: k-means (greedy k-means++ seeds on a sample of
each model's own frames, then Lloyd passes of hard assignments over all frames) and Kaldi-style
mix-up (one Gaussian per model, split the heaviest, EM passes between splits).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from emdist.backends.base import JobsFailed
from emdist.engine.trainer import Trainer, per_frame
from emdist.errors import UserError
from emdist.models.gmm import GMM
from emdist.models.initialize import centres_model, kmeans_plus_plus, label_rng, split
from emdist.tasks import sample_shard

log = logging.getLogger("emdist")


def frame_sample(trainer: Trainer, labels: list[str]) -> dict[str, np.ndarray]:
    """Every ``stride``-th frame of each model's stream, at most ``max_sample_frames``."""
    totals: dict[str, int] = {}
    starts_per_shard = []
    for shard in trainer.shards:
        starts = []
        for utt, key in zip(shard.utts, shard.keys, strict=True):
            starts.append(totals.get(key, 0))
            totals[key] = totals.get(key, 0) + utt.num_frames
        starts_per_shard.append(tuple(starts))
    stride = max(1, math.ceil(max(totals.values()) / trainer.config.max_sample_frames))
    try:
        samples = trainer.backend.map(
            _sample_task, list(zip(trainer.sources, starts_per_shard, strict=True)), stride
        )
    except JobsFailed as failed:
        raise trainer.job_failure(failed, "init", 0, f"emdist init pass 0: sample every "
                               f"{stride}th frame") from None
    merged: dict[str, list[np.ndarray]] = {}
    for sample in samples:
        for key, frames in sample.items():
            merged.setdefault(key, []).append(frames)
    return {key: np.concatenate(merged[key]) for key in labels}


def _sample_task(item: tuple, stride: int) -> dict[str, np.ndarray]:
    source, starts = item
    return sample_shard(source, stride, starts)


def init_kmeans(trainer: Trainer, labels: list[str]) -> dict[str, GMM]:
    """k-means++ seeds on each model's own frames, Lloyd passes, then one M-step."""
    cfg = trainer.config
    samples = frame_sample(trainer, labels)
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
        stats = trainer.e_pass(models, "init", p, hard=True)
        if p == cfg.kmeans_iters + 1:
            break
        for label, s in stats.items():
            moved = s.first / np.maximum(s.zeroth, 1.0)[:, None]
            centres[label] = np.where(s.zeroth[:, None] > 0, moved, centres[label])
        log.info("k-means pass %d: distortion per frame %.4f", p, -2.0 * per_frame(stats)[0])
    removing = replace(cfg.mstep, remove_low_count_gaussians=True)
    new, reports = trainer.update(models, stats, removing)
    trainer.write_update_log(f"init.{p}.log", "initial model from k-means", stats, reports)
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


def init_mixup(trainer: Trainer, labels: list[str]) -> dict[str, GMM]:
    """Kaldi-style mix-up: one Gaussian per model, split the heaviest until K, EM between."""
    cfg = trainer.config
    one = {lab: centres_model(np.zeros((1, trainer.dim)), cfg.covariance_type) for lab in labels}
    stats = trainer.e_pass(one, "init", 1)
    models, reports = trainer.update(one, stats)
    trainer.write_update_log("init.1.log", "one Gaussian per model", stats, reports)
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
            stats = trainer.e_pass(models, "init", p)
            models, reports = trainer.update(models, stats)
            trainer.write_update_log(f"init.{p}.log", "mix-up EM pass", stats, reports)
        for lab in sorted(growing):
            k = models[lab].n_components
            if k <= before[lab]:  # the new Gaussians were starved and removed
                log.warning("model %s: stays at %d Gaussians; the others lack occupancy "
                            "(--min-gaussian-occupancy)", lab, k)
        growing = {lab for lab in growing
                   if before[lab] < models[lab].n_components < cfg.num_gauss}
    return models


INIT = {"kmeans": init_kmeans, "mixup": init_mixup}
