"""The EM driver: initialise, then iterate "statistics of every shard, ordered sum, M-step".

One pass over the data per iteration trains every model at once: each utterance adds to
the statistics of its own label's model (``global`` for a UBM). The driver works the same
with any backend; the backend only decides where the shard tasks run.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import numpy as np

from emdist.backends.base import Backend, JobsFailed
from emdist.datadir import DataDir, parse_rxfilename, split_by_frames
from emdist.errors import EmdistWarning, RuntimeFailure, UserError
from emdist.estep import EStepOptions
from emdist.expdir import ExpDir
from emdist.gmm import COVARIANCE_TYPES, GMM
from emdist.initialize import centres_model, kmeans_plus_plus, label_rng, split
from emdist.mstep import MStepOptions, UpdateReport, m_step
from emdist.stats import StatsMap
from emdist.tasks import GLOBAL_LABEL, Shard, acc_shard, sample_shard

log = logging.getLogger("emdist")


class LikelihoodDecreaseWarning(EmdistWarning):
    """The per-frame log-likelihood went down from one iteration to the next."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained model (and nothing that does not).

    The number of workers and the backend are not here: they never change the result.
    """

    num_gauss: int = 4
    covariance_type: str = "full"
    num_iters: int = 10
    init: str = "mixup"
    nj: int = 8
    global_mode: bool = False
    seed: int = 0
    tol: float = 0.0
    kmeans_iters: int = 10
    mixup_iters: int = 2
    perturb_factor: float = 0.1
    max_sample_frames: int = 200_000
    estep: EStepOptions = field(default_factory=lambda: EStepOptions(dtype="float32"))
    mstep: MStepOptions = field(default_factory=MStepOptions)

    def __post_init__(self) -> None:
        checks = [
            (self.num_gauss >= 1, "--num-gauss must be at least 1"),
            (self.covariance_type in COVARIANCE_TYPES, "--cov must be 'diag' or 'full'"),
            (self.num_iters >= 0, "--num-iters must be at least 0"),
            (self.init in ("kmeans", "mixup"), "--init must be 'kmeans' or 'mixup'"),
            (self.nj >= 1, "--nj must be at least 1"),
            (self.tol >= 0, "--tol must not be negative"),
            (self.kmeans_iters >= 0, "--kmeans-iters must not be negative"),
            (self.mixup_iters >= 0, "--mixup-iters must not be negative"),
            (self.estep.dtype in ("float32", "float64"), "--precision: float32 or float64"),
            (self.estep.chunk_size >= 1, "--chunk-size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IterationRecord:
    """One line of ``metrics.jsonl``: the pass that turned ``iter-1``.mdl into ``iter``.mdl."""

    iter: int
    loglike_per_frame: float
    frames: int
    floored: int
    removed: int
    n_components: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def make_shards(data: DataDir, nj: int, global_mode: bool) -> list[Shard]:
    """Split a data dir into ``nj`` shards balanced by frames, with each utterance's model."""
    if not global_mode:
        unlabelled = [u.utt_id for u in data.utts if u.label is None]
        if unlabelled:
            raise UserError(
                f"{data.path}/text: utterance {unlabelled[0]} has no label; every utterance "
                "needs one to train word models (or use --global)"
            )
    parts = split_by_frames(data.utts, nj)
    return [
        Shard(i, part, tuple(GLOBAL_LABEL if global_mode else u.label for u in part))
        for i, part in enumerate(parts)
    ]


class ConvergenceMonitor:
    """Tracks the per-frame log-likelihood; warns when it drops, says when it converged."""

    def __init__(self, tol: float, history: list[float] | None = None,
                 rtol_decrease: float = 1e-7) -> None:
        self.tol = tol
        self.rtol_decrease = rtol_decrease
        self.history = list(history or [])

    def report(self, loglike_per_frame: float) -> bool:
        """Record a value; True when the change from the previous one is below ``tol``."""
        if self.history:
            prev = self.history[-1]
            if loglike_per_frame < prev - self.rtol_decrease * max(1.0, abs(prev)):
                warnings.warn(
                    f"log-likelihood per frame decreased from {prev:.8f} to "
                    f"{loglike_per_frame:.8f}",
                    LikelihoodDecreaseWarning,
                    stacklevel=2,
                )
        converged = bool(self.history) and abs(loglike_per_frame - self.history[-1]) < self.tol
        self.history.append(loglike_per_frame)
        return converged


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
        n_bytes = sum(s.num_frames for s in shards) * dim * 4
        self.cache_mode = cache_mode(feature_cache, n_bytes, backend.memory_capacity())
        self._sources: list | None = None

    @property
    def sources(self) -> list:
        """What E-step tasks read: the shards, or their cached copies in (worker) memory."""
        if self._sources is None:
            cached = self.cache_mode == "memory"
            self._sources = self.backend.cache(self.shards) if cached else list(self.shards)
        return self._sources

    def e_pass(self, models: Mapping[str, GMM], stage: str, i: int, hard: bool = False,
               options: EStepOptions | None = None) -> StatsMap:
        """Statistics of every model over all shards, summed in shard order."""
        options = options or self.config.estep
        command = f"emdist {stage} pass {i}: acc_shard(model={i}, hard={hard})"
        frames = [s.num_frames for s in self.shards]
        self.progress.start(f"{stage} {i}", len(self.shards), sum(frames))
        try:
            stats, reports = self.backend.map_reduce(
                acc_shard, self.sources, dict(models), options, hard,
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

    def job_failure(self, failed: JobsFailed, stage: str, i: int, command: str) -> RuntimeFailure:
        """Write the failed jobs' logs; one runtime failure (exit 1, as run.pl's "k / n jobs
        failed") naming the first job, its utterances, its log and its error."""
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
        return RuntimeFailure(summary)

    def update(self, models, stats: StatsMap, options: MStepOptions | None = None):
        """M-step of every model; returns the new models and the per-model reports."""
        options = options or self.config.mstep
        new, reports = {}, {}
        for label in sorted(models):
            if label not in stats:
                raise UserError(f"model {label!r} has no frames in the data")
            new[label], reports[label] = m_step(stats[label], options, previous=models[label])
        return new, reports

    def write_update_log(self, name: str, command: str, stats: StatsMap,
                         reports: Mapping[str, UpdateReport]) -> None:
        if self.exp is None:
            return
        lines = [
            f"model {label}: {r.n_components_in} -> {r.n_components_out} Gaussians, "
            f"occupancy {stats[label].zeroth.sum():.1f}, floored {r.floored_elements} elements "
            f"in {r.floored_gaussians} Gaussians, removed {r.removed}, kept starved "
            f"{r.not_updated}"
            for label, r in reports.items()
        ]
        self.exp.write_update_log(name, command, lines)


def per_frame(stats: StatsMap) -> tuple[float, int]:
    frames = sum(s.frames for s in stats.values())
    loglike = sum(s.loglike for s in stats.values())
    return loglike / max(frames, 1), frames


# -- initialisation ---------------------------------------------------------------------


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
            _sample_task, list(zip(trainer.shards, starts_per_shard, strict=True)), stride
        )
    except JobsFailed as failed:
        raise trainer.job_failure(failed, "init", 0, f"emdist init pass 0: sample every "
                               f"{stride}th frame") from None
    merged: dict[str, list[np.ndarray]] = {}
    for sample in samples:
        for key, frames in sample.items():
            merged.setdefault(key, []).append(frames)
    return {key: np.concatenate(merged[key]) for key in labels}


def _sample_task(item: tuple[Shard, tuple[int, ...]], stride: int) -> dict[str, np.ndarray]:
    shard, starts = item
    return sample_shard(shard, stride, starts)


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
        models = {lab: centres_model(c, cfg.covariance_type) for lab, c in centres.items()}
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
    return _without_previous_starved(new, reports)


def _without_previous_starved(models, reports):
    for label, r in reports.items():
        if r.not_updated:
            raise UserError(
                f"model {label!r}: no k-means cluster has enough frames for the M-step; use "
                "fewer Gaussians or lower --min-gaussian-occupancy"
            )
    return models


def init_mixup(trainer: Trainer, labels: list[str]) -> dict[str, GMM]:
    """Kaldi-style mix-up: one Gaussian per model, split the heaviest until K, EM between."""
    cfg = trainer.config
    one = {lab: centres_model(np.zeros((1, trainer.dim)), cfg.covariance_type) for lab in labels}
    stats = trainer.e_pass(one, "init", 1)
    models, reports = trainer.update(one, stats)
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
        for _ in range(max(cfg.mixup_iters, 1)):
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


# -- training -------------------------------------------------------------------------


def train(
    data: DataDir,
    config: TrainConfig,
    backend: Backend,
    exp: ExpDir | None = None,
    *,
    stage: int | None = None,
    overwrite: bool = False,
    on_record: Callable[[IterationRecord], None] | None = None,
    feature_cache: str = "auto",
    progress: Progress | None = None,
) -> dict[str, GMM]:
    """Train one GMM per label (or one ``global`` GMM) by EM.

    Parameters
    ----------
    data : DataDir
    config : TrainConfig
    backend : Backend
        Where shard tasks run; the result does not depend on it.
    exp : ExpDir, optional
        Where models, logs and records go. A run found there with the same options is
        resumed from its last complete model.
    stage : int, optional
        Restart from ``stage``.mdl, dropping later models (Kaldi's ``--stage``).
    overwrite : bool
        Replace a run with other options found in ``exp``.
    on_record : callable, optional
        Called with each :class:`IterationRecord`.
    feature_cache : {"auto", "memory", "none"}
        Keep shards in (worker) memory across passes, or stream them from disk each pass;
        ``auto`` caches when they fit in half the memory. Never changes the result.
    progress : Progress, optional

    Returns
    -------
    dict of str to GMM
    """
    shards = make_shards(data, config.nj, config.global_mode)
    labels = sorted({key for s in shards for key in s.keys})
    trainer = Trainer(shards, data.dim, config, backend, exp, on_record, feature_cache, progress)
    backend.check_paths(sorted({parse_rxfilename(u.rxfilename)[0] for u in data.utts
                                if not u.rxfilename.rstrip().endswith("|")}))
    log.info("feature cache: %s", trainer.cache_mode)
    start, models, records = _resume(trainer, stage, overwrite)
    if models is None:
        t0 = time.time()
        models = INIT[config.init](trainer, labels)
        _save(exp, 0, models)
        log.info("initial model (%s) in %.1f s", config.init, time.time() - t0)
        start = 0
    if exp is not None and exp.final.exists() and stage is None:
        log.info("%s is complete; nothing to do", exp.final)
        return exp.load_model("final")
    return _iterate(trainer, models, start, records)


def _resume(trainer: Trainer, stage: int | None, overwrite: bool):
    """(first model number, its models, records so far), or (0, None, []) to start afresh."""
    exp = trainer.exp
    if exp is None:
        return 0, None, []
    exp.prepare(trainer.config.to_dict(), overwrite)
    (exp.path / "num_jobs").write_text(f"{len(trainer.shards)}\n")
    numbers = exp.model_numbers()
    if stage is not None:
        if stage not in numbers:
            raise UserError(f"--stage {stage}: {exp.model_path(stage)} does not exist")
        exp.drop_models_after(stage)
        numbers = [n for n in numbers if n <= stage]
    if not numbers:
        return 0, None, []
    last = numbers[-1]
    records = [r for r in exp.read_metrics() if r["iter"] <= last]
    if last:
        log.info("resuming from %s", exp.model_path(last))
    return last, exp.load_model(last), records


def _save(exp: ExpDir | None, i: int, models) -> None:
    if exp is not None:
        exp.save_model(i, models)


def _iterate(trainer: Trainer, models, start: int, records: list[dict]) -> dict[str, GMM]:
    cfg = trainer.config
    # float32 products round each frame's log-likelihood at about 1e-7 relative
    rtol = 1e-6 if cfg.estep.dtype == "float32" else 1e-7
    monitor = ConvergenceMonitor(cfg.tol, [r["loglike_per_frame"] for r in records], rtol)
    i = start
    history = monitor.history
    already = len(history) >= 2 and abs(history[-1] - history[-2]) < cfg.tol
    while i < cfg.num_iters and not already:
        t0 = time.time()
        stats = trainer.e_pass(models, "acc", i)
        models_next, reports = trainer.update(models, stats)
        trainer.write_update_log(f"update.{i}.log", f"m_step {i}.mdl -> {i + 1}.mdl",
                                 stats, reports)
        i += 1
        ll, frames = per_frame(stats)
        record = IterationRecord(
            iter=i, loglike_per_frame=ll, frames=frames,
            floored=sum(r.floored_elements for r in reports.values()),
            removed=sum(len(r.removed) for r in reports.values()),
            n_components={lab: m.n_components for lab, m in models_next.items()},
            seconds=round(time.time() - t0, 3),
        )
        records.append(record.to_dict())
        if trainer.exp is not None:
            # the record first: a run killed in between resumes from i-1.mdl and drops it
            trainer.exp.write_metrics(records)
        _save(trainer.exp, i, models_next)
        if trainer.on_record is not None:
            trainer.on_record(record)
        models = models_next
        if monitor.report(ll):
            log.info("converged: log-likelihood per frame changed by less than %g", cfg.tol)
            break
    if trainer.exp is not None:
        trainer.exp.write_final(i)
    return models
