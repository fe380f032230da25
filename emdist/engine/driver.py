"""The EM driver: initialise, then iterate "statistics of every shard, ordered sum, M-step".

One pass over the data per iteration trains every model at once: each utterance adds to
the statistics of its own label's model (``global`` for a UBM). The driver works the same
with any backend; the backend only decides where the shard tasks run.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from emdist.backends.base import Backend
from emdist.data.datadir import DataDir, parse_rxfilename
from emdist.engine.config import IterationRecord, TrainConfig
from emdist.engine.trainer import Progress, Trainer, make_shards
from emdist.errors import EmdistWarning, UserError
from emdist.io.expdir import ExpDir
from emdist.io.modelio import check_models_fit
from emdist.models.kind import get_kind, per_frame
from emdist.models.mstep import MStepOptions
from emdist.tasks import GLOBAL_LABEL, BadUtterance, one_blas_thread

log = logging.getLogger("emdist")


class LikelihoodDecreaseWarning(EmdistWarning):
    """The per-frame log-likelihood went down from one iteration to the next."""


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
        self.history.append(loglike_per_frame)
        return self.converged

    @property
    def converged(self) -> bool:
        """The last two values differ by less than ``tol`` (also after a resume)."""
        h = self.history
        return len(h) >= 2 and abs(h[-1] - h[-2]) < self.tol


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
    kaldi: KaldiFiles | None = None,
    initial: dict | None = None,
    history: Sequence[float] = (),
) -> dict:
    """Train one model per label (or one ``global`` model) by EM, of the kind
    ``config.model`` (a GMM by default; see :mod:`emdist.models.kind`).

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
    kaldi : KaldiFiles, optional
        Also write each iteration's statistics as Kaldi accumulators and the final models
        as Kaldi model files, in ``exp``'s ``kaldi/<label>/`` (GMMs only).
    initial : dict, optional
        Models to start EM from instead of the kind's initialisation (``0.mdl``); a run
        resumed from ``exp`` starts from its last model instead.
    history : sequence of float
        Log-likelihoods per frame of earlier iterations (a warm start), which the
        convergence test (``config.tol``) sees before this run's.

    Returns
    -------
    dict of str to model (GMM, HMM or Codebook)
    """
    # The driver's own numerics (M-steps, initialisation) run on one BLAS thread: OpenBLAS's
    # idle threads spin for a while after every call, and in a local cluster that spinning
    # took a core from the workers (1.2 s of CPU in a 1.7 s digits run on 2 workers).
    if kaldi is not None and (kaldi.accs or kaldi.model):
        if config.model != "gmm":
            raise UserError("Kaldi's model and accumulator files hold GMMs: --write-kaldi-accs "
                            "and --write-kaldi-model need --model gmm")
        if exp is None:
            raise UserError("Kaldi files are written into an exp dir; give one")
    with one_blas_thread():
        models = _train(data, config, backend, exp, stage, overwrite, on_record, feature_cache,
                        progress, kaldi, initial, tuple(history))
        if kaldi is not None and kaldi.model:
            exp.write_kaldi_models("final", models, kaldi.binary)
            log.info("wrote the final models as Kaldi files in %s", exp.kaldi_dir)
        return models


@dataclass(frozen=True)
class KaldiFiles:
    """Kaldi's files a training run also writes (they never change the result)."""

    accs: bool = False
    """Each iteration's summed statistics: ``kaldi/<label>/I.acc`` from ``I.mdl``."""
    model: bool = False
    """The final models: ``kaldi/<label>/final.mdl``."""
    binary: bool = True


def _train(data, config, backend, exp, stage, overwrite, on_record, feature_cache, progress,
           kaldi, initial, history):
    shards = make_shards(data, config.nj, config.global_mode, config.subsample)
    labels = sorted({key for s in shards for key in s.keys})
    trainer = Trainer(shards, data.dim, config, backend, exp, on_record, feature_cache, progress)
    backend.check_paths(sorted({parse_rxfilename(u.rxfilename)[0] for u in data.utts
                                if not u.rxfilename.rstrip().endswith("|")}))
    log.info("feature cache: %s", trainer.cache_mode)
    start, models, records = _resume(trainer, stage, overwrite, data)
    if models is not None and exp.final.exists() and stage is None:
        log.info("%s is complete; nothing to do", exp.final)
        return exp.load_model("final")
    trainer.validate(tuple(BadUtterance(u.utt_id, u.rxfilename, "has no frames")
                           for u in data.empty))
    if models is None and initial is not None:
        models, start = dict(initial), 0
        _save(exp, 0, models)
    elif models is None:
        t0 = time.time()
        models = get_kind(config.model).initialize(trainer, labels)
        _save(exp, 0, models)
        log.info("initial model (%s) in %.1f s", config.init, time.time() - t0)
        start = 0
    if config.selects and start < config.num_iters:
        # as Kaldi's train_diag_ubm.sh: once, with the model EM starts from (also on resume)
        t0 = time.time()
        first = models if start == 0 or exp is None else exp.load_model(0)
        trainer.select(first[GLOBAL_LABEL], config.gselect)
        log.info("Gaussian selection: top %d of %d per frame, by 0.mdl, in %.1f s",
                 config.gselect, first[GLOBAL_LABEL].n_components, time.time() - t0)
    elif config.gselect:
        log.info("--gselect %d selects every Gaussian of %d: exact EM", config.gselect,
                 config.num_gauss)
    return _iterate(trainer, models, start, records, kaldi, history)


def _resume(trainer: Trainer, stage: int | None, overwrite: bool, data: DataDir):
    """(first model number, its models, records so far), or (0, None, []) to start afresh.
    The model resumed from is read, checked and matched to the data before anything in the
    exp dir changes."""
    exp = trainer.exp
    if exp is None:
        return 0, None, []
    exp.prepare(trainer.config.to_dict(), overwrite)
    (exp.path / "num_jobs").write_text(f"{len(trainer.shards)}\n")
    numbers = exp.model_numbers()
    if stage is not None:
        if stage not in numbers:
            raise UserError(f"--stage {stage}: {exp.model_path(stage)} does not exist")
        numbers = [n for n in numbers if n <= stage]
    if not numbers:
        return 0, None, []
    last = numbers[-1]
    models = exp.load_model(last)
    check_models_fit(models, data, exp.model_path(last))
    if stage is not None:
        exp.drop_models_after(stage)
    records = [r for r in exp.read_metrics() if r["iter"] <= last]
    if last:
        log.info("resuming from %s", exp.model_path(last))
    return last, models, records


def _save(exp: ExpDir | None, i: int, models) -> None:
    if exp is not None:
        exp.save_model(i, models)


def _mstep_options(cfg: TrainConfig, i: int) -> MStepOptions:
    """The M-step from ``i``.mdl: with Gaussian selection, starved Gaussians are kept (their
    indices are in the stored selections) until the last iteration, as Kaldi does."""
    if cfg.selects and i + 1 < cfg.num_iters:
        return replace(cfg.mstep, remove_low_count_gaussians=False)
    return cfg.mstep


def _iterate(trainer: Trainer, models, start: int, records: list[dict],
             kaldi: KaldiFiles | None = None, history: tuple[float, ...] = ()) -> dict:
    cfg = trainer.config
    # float32 products round each frame's log-likelihood at about 1e-7 relative
    rtol = 1e-6 if cfg.estep.dtype == "float32" else 1e-7
    monitor = ConvergenceMonitor(cfg.tol, [*history, *(r["loglike_per_frame"] for r in records)],
                                 rtol)
    i = start
    while i < cfg.num_iters and not monitor.converged:
        t0 = time.time()
        stats = trainer.e_pass(models, "acc", i, hard=cfg.viterbi, selected=cfg.selects)
        models_next, reports = trainer.update(models, stats, _mstep_options(cfg, i))
        if kaldi is not None and kaldi.accs and trainer.exp is not None:
            trainer.exp.write_kaldi_accs(i, stats, kaldi.binary)
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
            loglike_by_label={lab: s.loglike / max(s.frames, 1) for lab, s in stats.items()},
            occupancy={lab: [float(f"{x:.6g}") for x in getattr(s, "gmm", s).zeroth]
                       for lab, s in stats.items()},
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
