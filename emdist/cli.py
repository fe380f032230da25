"""The ``emdist`` command line: thin wrappers that parse, call one library function, print.

Heavy modules (numpy, the engine, ``distributed``) are imported inside the commands, so
``emdist --help`` is fast and never imports ``distributed``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

log = logging.getLogger("emdist")

# Typer vendors click in recent versions and uses click itself in older ones: find the
# classes through what typer exports.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineErrors(TyperGroup):
    """Usage errors as one line (``emdist train: error: ...``), exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                typer.echo(exc.format_message(), err=True)
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            name = ctx.command_path if ctx is not None else "emdist"
            typer.echo(f"{name}: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("emdist: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Train Gaussian mixture models by EM on Kaldi features, on one machine or a Dask "
    "cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Model(str, Enum):
    gmm = "gmm"
    hmm = "hmm"
    kmeans = "kmeans"


class Cov(str, Enum):
    diag = "diag"
    full = "full"


class Init(str, Enum):
    kmeans = "kmeans"
    mixup = "mixup"


class Precision(str, Enum):
    float64 = "float64"
    float32 = "float32"


class FeatureCache(str, Enum):
    auto = "auto"
    memory = "memory"
    none = "none"


class Style(str, Enum):
    kaldi = "kaldi"
    sklearn = "sklearn"


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("emdist: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    logging.captureWarnings(True)
    warnings.formatwarning = lambda message, category, *_args, **_kw: (
        f"{category.__name__}: {message}"
    )
    warn_log = logging.getLogger("py.warnings")
    warn_log.handlers[:] = [handler]
    warn_log.propagate = False


def _run(verbose: bool, func, *args, **kwargs):
    """Call ``func``; emdist errors become one line and their exit status."""
    from emdist.errors import EmdistError

    try:
        return func(*args, **kwargs)
    except EmdistError as exc:
        if verbose:
            traceback.print_exc()
        typer.echo(f"emdist: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("emdist: interrupted", err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:  # the reader of standard output went away (| head): end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:  # an unexpected failure: one line unless --verbose
        if verbose:
            traceback.print_exc()
        typer.echo(
            f"emdist: error: {type(exc).__name__}: {exc} (run with --verbose for a traceback)",
            err=True,
        )
        raise typer.Exit(1) from None


def _check_backend_args(workers: int | None, scheduler: str | None,
                        scheduler_file: Path | None, *_) -> None:
    """Refuse contradictory cluster options before any work is done."""
    from emdist.errors import UserError

    if scheduler and scheduler_file:
        raise UserError("--scheduler and --scheduler-file are exclusive; give one")
    if (scheduler or scheduler_file) and workers is not None:
        raise UserError("--workers starts a local cluster; it cannot go with --scheduler")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 (in process) or more, not {workers}")


def _quiet_dask() -> None:
    """Dask's client logs a lost scheduler as errors with tracebacks; emdist says it in its
    own one line (ClusterLost). Called once ``distributed`` is imported (its import sets
    its loggers' levels from the Dask config); ``--verbose`` keeps them."""
    if log.level > logging.DEBUG:
        for name in ("distributed.client", "distributed.batched", "distributed.core"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _backend(workers: int | None, scheduler: str | None, scheduler_file: Path | None,
             wait_workers: int, wait_timeout: float, dashboard_address: str | None = None,
             short_pass: float = 0.0):
    if scheduler or scheduler_file:
        from emdist.backends.dask_backend import DaskBackend

        _quiet_dask()

        return DaskBackend.connect(scheduler, str(scheduler_file) if scheduler_file else None,
                                   timeout=wait_timeout, n_workers=wait_workers)
    n = _default_workers() if workers is None else workers
    if n == 0:
        from emdist.backends.serial import SerialBackend

        return SerialBackend()
    from emdist.backends.starting import StartingCluster

    _quiet_dask()

    if dashboard_address:  # a cluster to watch: started at once, every pass on it
        short_pass = 0.0
    return StartingCluster(lambda: _start_local(n, dashboard_address), n, short_pass)


def _start_local(n: int, dashboard_address: str | None = None):
    """An embedded LocalCluster of ``n`` workers (run in the background by
    :class:`emdist.backends.starting.StartingCluster`); says once when ``n`` exceeds the cores."""
    import time

    from emdist.backends.dask_backend import DaskBackend

    t0 = time.monotonic()
    backend = DaskBackend.local(n, dashboard_address=dashboard_address)
    cores = _default_workers()
    if n > cores:
        s = "s" if cores > 1 else ""
        log.warning("--workers %d on %d CPU core%s: %d worker processes share %d core%s; "
                    "starting them took %.1f s and gives no speed-up over --workers %d",
                    n, cores, s, n, cores, s, time.monotonic() - t0, cores)
    return backend


def _start_fork_server(workers: int | None, scheduler: str | None,
                       scheduler_file: Path | None, *_) -> None:
    """When the options start an embedded cluster, start the fork server its worker
    processes will come from now: it imports what they need in a process of its own while
    the driver imports, reads the data dir and starts the scheduler."""
    if scheduler or scheduler_file or workers == 0:
        return
    from emdist.backends import forkserver

    forkserver.start("emdist.cli")  # the workers import the driver's __main__ again


def _default_data(split: str) -> Path:
    from emdist.corpora import digits_dir

    return digits_dir(split)


def _defaults_help(name: str) -> str:
    """``4 (gmm), 2 (hmm), ...``: the per-kind defaults of an option, for --help."""
    from emdist.models.defaults import KIND_DEFAULTS

    return ", ".join(f"{d[name]} ({kind})" for kind, d in KIND_DEFAULTS.items() if name in d)


Workers = Annotated[
    int | None,
    typer.Option("--workers", "-w", help="Worker processes of an embedded Dask LocalCluster "
                 "(started once passes are long enough, see --short-pass); 0 runs in process. "
                 "[default: the number of CPU cores]", show_default=False),
]
Scheduler = Annotated[
    str | None, typer.Option(help="Address of a running Dask scheduler (tcp:// or tls://).")
]
SchedulerFile = Annotated[
    Path | None, typer.Option(help="Scheduler file of a running Dask cluster.")
]
WaitWorkers = Annotated[int, typer.Option(help="Workers to wait for on a remote cluster.")]
WaitTimeout = Annotated[float, typer.Option(help="Seconds to wait for the scheduler/workers.")]
Dashboard = Annotated[str | None, typer.Option(
    help="Serve the embedded cluster's dashboard at this address (e.g. 127.0.0.1:8787; "
    "needs bokeh); the cluster then starts at once and takes every pass. [default: no "
    "dashboard]", show_default=False)]
ShortPass = Annotated[float, typer.Option(
    help="With --workers on a small corpus: passes run in process until one takes this many "
    "seconds, and while the workers start; 0 starts them at once and runs every pass on "
    "them.", min=0.0)]
Nj = Annotated[int, typer.Option(help="Number of shards (jobs); independent of --workers.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
Plots = Annotated[bool, typer.Option(
    "--plots", help="Also write EXP_DIR/plots/*.png at the end (needs matplotlib: "
    'pip install "emdist[plot]").')]


@app.command()
def train(
    data_dir: Annotated[Path | None, typer.Argument(
        help="Kaldi data dir (feats.scp, text). [default: the bundled digits train set]",
        show_default=False)] = None,
    exp_dir: Annotated[Path, typer.Argument(help="Experiment dir to write.")] = Path("exp/digits"),
    workers: Workers = None,
    scheduler: Scheduler = None,
    scheduler_file: SchedulerFile = None,
    wait_workers: WaitWorkers = 1,
    wait_timeout: WaitTimeout = 60.0,
    model: Annotated[Model, typer.Option(
        help="Model kind: a GMM per word (or --global); a left-to-right GMM-HMM per word "
        "trained by Baum-Welch; a k-means (VQ) codebook per word.")] = Model.gmm,
    num_gauss: Annotated[int | None, typer.Option(
        help="Gaussians per model (per HMM state; centres per codebook). [default: by "
        "--model: " + _defaults_help("num_gauss") + "]", show_default=False)] = None,
    num_states: Annotated[int | None, typer.Option(
        help="Emitting states per word (--model hmm). [default: "
        + _defaults_help("num_states") + "]", show_default=False)] = None,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="Allow each HMM state to "
                                       "skip the next one (--model hmm).")] = False,
    viterbi: Annotated[bool, typer.Option(help="Viterbi training: the best state path instead "
                                          "of forward-backward (--model hmm).")] = False,
    cov: Annotated[Cov | None, typer.Option(
        help="Covariance type. [default: " + _defaults_help("covariance_type") + "]",
        show_default=False)] = None,
    num_iters: Annotated[int | None, typer.Option(
        help="Maximum EM iterations. [default: " + _defaults_help("num_iters") + "]",
        show_default=False)] = None,
    init: Annotated[Init | None, typer.Option(
        help="Kaldi-style mix-up (HMMs: flat start, then mix-up; codebooks: LBG splitting), "
        "or k-means++ and Lloyd. [default: " + _defaults_help("init") + "]",
        show_default=False)] = None,
    nj: Nj = 8,
    global_: Annotated[bool, typer.Option("--global", help="One GMM over all frames (a UBM); "
                                          "no text needed.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of everything random.")] = 0,
    tol: Annotated[float, typer.Option(help="Stop when the log-likelihood per frame changes "
                                       "by less than this (0: run all iterations).")] = 0.0,
    kmeans_iters: Annotated[int, typer.Option(help="Lloyd passes of --init kmeans.")] = 10,
    mixup_iters: Annotated[int, typer.Option(help="EM passes after each split of --init "
                                             "mixup.")] = 2,
    perturb_factor: Annotated[float, typer.Option(help="Mix-up mean perturbation, in σ.")] = 0.1,
    gselect: Annotated[int, typer.Option(
        help="Gaussian selection for a --global model: per frame, the N best Gaussians of "
        "0.mdl, chosen once; posteriors and statistics over those only (Kaldi's gmm-gselect). "
        "0: exact EM.")] = 0,
    subsample: Annotated[int, typer.Option(
        help="Use every N-th frame of each utterance (Kaldi's subsample-feats --n).")] = 1,
    skip_bad_utts: Annotated[bool, typer.Option(
        help="Leave out utterances with NaN, infinite or absurd (|x| > 1e10) features or no "
        "frames, listed in EXP_DIR/log/skipped_utts.txt, instead of stopping.")] = False,
    max_skip_fraction: Annotated[float, typer.Option(
        help="With --skip-bad-utts: fail if more than this fraction of the utterances would "
        "be left out.")] = 0.1,
    precision: Annotated[Precision, typer.Option(help="Precision of the E-step products "
                                                 "(statistics are always float64).")]
    = Precision.float32,
    chunk_size: Annotated[int, typer.Option(help="Frames per E-step product.")] = 1024,
    mstep_style: Annotated[Style, typer.Option(help="Kaldi's guards, or scikit-learn's "
                                               "reg_covar with no removal.")] = Style.kaldi,
    min_variance: Annotated[float, typer.Option(help="Variance floor (diag).")] = 1e-3,
    variance_floor: Annotated[float, typer.Option(help="Eigenvalue floor (full).")] = 1e-3,
    max_condition: Annotated[float, typer.Option(help="Maximum condition number (full).")]
    = 1e4,
    min_gaussian_occupancy: Annotated[float | None, typer.Option(
        help="Occupancy needed for an update. [default: 10 diag, 100 full]",
        show_default=False)] = None,
    min_gaussian_weight: Annotated[float, typer.Option(help="Weight needed for an update.")]
    = 1e-5,
    remove_low_count: Annotated[bool, typer.Option(
        "--remove-low-count/--keep-low-count", help="Remove starved Gaussians.")] = True,
    reg_covar: Annotated[float, typer.Option(help="Added to covariance diagonals "
                                             "(--mstep-style sklearn).")] = 1e-6,
    feature_cache: Annotated[FeatureCache, typer.Option(
        help="Keep shards in worker memory across iterations, stream them from disk each "
        "time, or cache when they fit in half the workers' memory.")] = FeatureCache.auto,
    dashboard_address: Dashboard = None,
    short_pass: ShortPass = 0.2,
    stage: Annotated[int | None, typer.Option(help="Restart from STAGE.mdl.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start afresh: remove what an earlier run "
                                             "wrote in EXP_DIR.")] = False,
    write_kaldi_accs: Annotated[bool, typer.Option(
        help="Also write each iteration's summed statistics as Kaldi accumulators, "
        "EXP_DIR/kaldi/<label>/I.acc (from I.mdl; GMMs).")] = False,
    write_kaldi_model: Annotated[bool, typer.Option(
        help="Also write the final models as Kaldi model files, "
        "EXP_DIR/kaldi/<label>/final.mdl (GMMs).")] = False,
    kaldi_binary: Annotated[bool, typer.Option(
        "--kaldi-binary/--kaldi-text", help="Kaldi files in binary (Kaldi's default) or "
        "text.")] = True,
    plots: Plots = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Train one model per word of DATA_DIR/text (or one --global model) into EXP_DIR: a
    GMM, a GMM-HMM (--model hmm) or a k-means codebook (--model kmeans)."""
    _setup_logging(verbose, quiet)
    given = dict(num_gauss=num_gauss, covariance_type=cov.value if cov else None,
                 num_iters=num_iters, num_states=num_states, init=init.value if init else None)
    options = dict(
        model=model.value, skip=skip, viterbi=viterbi,
        nj=nj, global_mode=global_, seed=seed, tol=tol, kmeans_iters=kmeans_iters,
        mixup_iters=mixup_iters, perturb_factor=perturb_factor, gselect=gselect,
        subsample=subsample, skip_bad_utts=skip_bad_utts, max_skip_fraction=max_skip_fraction,
    )
    estep = dict(dtype=precision.value, chunk_size=chunk_size)
    mstep = dict(
        style=mstep_style.value, min_variance=min_variance, variance_floor=variance_floor,
        max_condition=max_condition, min_gaussian_occupancy=min_gaussian_occupancy,
        min_gaussian_weight=min_gaussian_weight, remove_low_count_gaussians=remove_low_count,
        reg_covar=reg_covar,
    )
    backend_args = (workers, scheduler, scheduler_file, wait_workers, wait_timeout,
                    dashboard_address, short_pass)
    run = dict(stage=stage, overwrite=overwrite, feature_cache=feature_cache.value, quiet=quiet,
               kaldi=(write_kaldi_accs, write_kaldi_model, kaldi_binary))
    if plots:
        _check_plots()
    _run(verbose, _train, data_dir, exp_dir, options, given, estep, mstep, backend_args, run)
    if plots:
        _run(verbose, _plot, exp_dir)


def _train(data_dir, exp_dir, options, given, estep, mstep, backend_args, run: dict) -> None:
    _check_backend_args(*backend_args)
    _start_fork_server(*backend_args)
    from emdist.data.datadir import load_data_dir
    from emdist.engine import KaldiFiles, TrainConfig, train

    run["kaldi"] = KaldiFiles(*run["kaldi"])
    options = {**options, **{k: v for k, v in given.items() if v is not None}}
    from emdist.errors import ClusterLost, WriteFailure
    from emdist.io.expdir import ExpDir
    from emdist.models.estep import EStepOptions
    from emdist.models.mstep import MStepOptions

    config = TrainConfig.for_model(options.pop("model"), **options,
                                   estep=EStepOptions(**estep), mstep=MStepOptions(**mstep))
    ExpDir(exp_dir).check_path()  # before reading data or starting workers
    data = load_data_dir(data_dir or _default_data("train"),
                         require_labels=not config.global_mode,
                         skip_empty=config.skip_bad_utts)
    log.info("data %s: %d utterances, %d frames, dim %d", data.path, len(data.utts),
             data.num_frames, data.dim)
    from emdist.progress import make_progress

    backend = _backend(*backend_args)
    progress = make_progress(run.pop("quiet"))
    try:
        log.info("running on %s", backend.describe())
        if backend.dashboard_link():
            log.info("dashboard: %s", backend.dashboard_link())
        train(data, config, backend, ExpDir(exp_dir), on_record=_record_printer(progress),
              progress=progress, **run)
        if progress is not None and progress.is_terminal:
            from emdist.progress import summary_table

            progress.console.print(summary_table(ExpDir(exp_dir).read_metrics()))
    except WriteFailure as exc:  # say what the full (or read-only) disk left intact
        raise exc.with_kept(ExpDir(exp_dir).kept()) from None
    except ClusterLost as exc:  # and what a lost scheduler or lost workers left
        raise exc.with_kept(ExpDir(exp_dir).kept("restart the cluster")) from None
    finally:
        backend.close()
    log.info("wrote %s", Path(exp_dir) / "final.mdl")


def _record_printer(progress):
    def show(record) -> None:
        if progress is not None:
            progress.last_loglike = record.loglike_per_frame
        _print_record(record)

    return show


def _print_record(record) -> None:
    log.info(
        "iter %d: log-likelihood per frame %.6f over %d frames, floored %d, removed %d "
        "(%.1f s)", record.iter, record.loglike_per_frame, record.frames, record.floored,
        record.removed, record.seconds,
    )


@app.command("test")
def test_(
    exp_dir: Annotated[Path, typer.Argument(help="Experiment dir with final.mdl.")]
    = Path("exp/digits"),
    data_dir: Annotated[Path | None, typer.Argument(
        help="Kaldi data dir to recognise. [default: the bundled digits test set]",
        show_default=False)] = None,
    model: Annotated[str, typer.Option(help="Model in EXP_DIR to score with.")] = "final.mdl",
    viterbi: Annotated[bool, typer.Option(help="Score HMMs by their best state path instead "
                                          "of the forward total.")] = False,
    workers: Workers = None,
    scheduler: Scheduler = None,
    scheduler_file: SchedulerFile = None,
    wait_workers: WaitWorkers = 1,
    wait_timeout: WaitTimeout = 60.0,
    short_pass: ShortPass = 0.2,
    nj: Nj = 8,
    plots: Plots = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Recognise every utterance of DATA_DIR with the word models of EXP_DIR; print %ERR.

    With a --global model there are no words: each utterance's log-likelihood is scored
    and the mean per frame printed (%LOGLIKE).
    """
    _setup_logging(verbose, quiet)
    backend_args = (workers, scheduler, scheduler_file, wait_workers, wait_timeout, None,
                    short_pass)
    if plots:
        _check_plots()
    _run(verbose, _test, exp_dir, data_dir, model, backend_args, nj, viterbi, quiet)
    if plots:
        _run(verbose, _plot, exp_dir)


def _test(exp_dir: Path, data_dir: Path | None, model: str, backend_args, nj: int,
          viterbi: bool = False, quiet: bool = False) -> None:
    from emdist.data.datadir import load_data_dir
    from emdist.errors import UserError, WriteFailure
    from emdist.io.modelio import check_models_fit, load_models
    from emdist.recognizer import evaluate, evaluate_global, write_results
    from emdist.tasks import GLOBAL_LABEL

    _check_backend_args(*backend_args)
    _start_fork_server(*backend_args)
    models = load_models(Path(exp_dir) / model)
    if viterbi and type(next(iter(models.values()))).kind != "hmm":
        raise UserError(f"--viterbi scores HMMs; {Path(exp_dir) / model} holds "
                        f"{type(next(iter(models.values()))).kind} models")
    ubm = set(models) == {GLOBAL_LABEL}
    data = load_data_dir(data_dir or _default_data("test"), require_labels=not ubm)
    check_models_fit(models, data, Path(exp_dir) / model)  # before any worker starts
    from emdist.progress import make_progress

    backend = _backend(*backend_args)
    progress = make_progress(quiet)
    try:
        if ubm:
            results = evaluate_global(models[GLOBAL_LABEL], data, backend, nj,
                                      progress=progress)
        else:
            results = evaluate(models, data, backend, nj, best_path=viterbi, progress=progress)
    finally:
        backend.close()
    out = Path(exp_dir) / f"decode_{data.name}" / "results.json"
    try:
        write_results(results, out)
    except WriteFailure as exc:
        raise exc.with_kept("the models are untouched and no partial results.json exists; "
                            "free space (or fix the permissions), then rerun emdist test") \
            from None
    log.info("wrote %s", out)
    typer.echo(results.summary_line())


@app.command("import")
def import_(
    kaldi_model: Annotated[Path, typer.Argument(help="Kaldi <DiagGMM> or <FullGMM> file, text "
                                                "or binary.")],
    out_model: Annotated[Path, typer.Argument(help="emdist model file to write.")],
    label: Annotated[str, typer.Option(help="Label of the model in OUT_MODEL.")] = "global",
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Convert a Kaldi global GMM file (gmm-global-copy, fgmm-global-copy) to an emdist
    model file holding one model labelled LABEL."""
    _setup_logging(verbose, quiet)
    _run(verbose, _import, kaldi_model, out_model, label)


def _import(kaldi_model: Path, out_model: Path, label: str) -> None:
    from emdist.errors import UserError
    from emdist.io.kaldi import read_kaldi_model
    from emdist.io.modelio import save_models

    if not label or label != label.strip():
        raise UserError(f"--label {label!r}: a label is a non-empty word")
    gmm = read_kaldi_model(kaldi_model)
    save_models(out_model, {label: gmm})
    log.info("wrote %s (%s GMM, %d Gaussians, dimension %d, label %s)", out_model,
             gmm.covariance_type, gmm.n_components, gmm.dim, label)


def _kaldi_bool(value: str, name: str = "--binary") -> bool:
    """Kaldi's spelling of a boolean option's value."""
    low = value.lower()
    if low in ("true", "t", "1", "yes", "y"):
        return True
    if low in ("false", "f", "0", "no", "n"):
        return False
    raise typer.BadParameter(f"{value!r} is not true or false", param_hint=name)


class _KaldiBoolCommand(typer.core.TyperCommand):
    """Kaldi's boolean options: ``--binary=false``, and a bare ``--binary`` means
    ``--binary=true``."""

    kaldi_bools: tuple[str, ...] = ("--binary",)

    def parse_args(self, ctx, args):
        out, rest = [], list(args)
        while rest:
            arg = rest.pop(0)
            if arg == "--":
                out += [arg, *rest]
                break
            out.append(f"{arg}=true" if arg in self.kaldi_bools else arg)
        return super().parse_args(ctx, out)


def _kaldi_bools(*names: str) -> type:
    """A command class for Kaldi boolean options ``names``."""
    return type("KaldiCommand", (_KaldiBoolCommand,), {"kaldi_bools": names})


def _bool_option(help_text: str, name: str):
    return typer.Option(name, metavar="[=true|false]", help=help_text)


@app.command("export", cls=_KaldiBoolCommand)
def export(
    model: Annotated[Path, typer.Argument(help="emdist model file of GMMs.")],
    kaldi_out: Annotated[Path | None, typer.Argument(
        help="Kaldi model file to write (not with --all).", show_default=False)] = None,
    binary: Annotated[str, typer.Option(
        "--binary", metavar="[=true|false]",
        help="Write Kaldi's binary format (as Kaldi does by default); --binary=false writes "
        "text.")] = "true",
    label: Annotated[str | None, typer.Option(
        help="The model to write, from a file of several word models.")] = None,
    all_: Annotated[Path | None, typer.Option(
        "--all", help="Write DIR/<label>.mdl for every model of MODEL.",
        metavar="DIR")] = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Write GMMs of an emdist model file as Kaldi model files (gmm-global-* and
    fgmm-global-* read them)."""
    _setup_logging(verbose, quiet)
    as_binary = _kaldi_bool(binary)
    if (kaldi_out is None) == (all_ is None):
        raise typer.BadParameter("give KALDI_OUT or --all DIR (one of them)")
    if all_ is not None and label is not None:
        raise typer.BadParameter("--label picks one model; --all writes every model")
    _run(verbose, _export, model, kaldi_out, as_binary, label, all_)


def _export(model: Path, kaldi_out: Path | None, binary: bool, label: str | None,
            all_dir: Path | None) -> None:
    from emdist.errors import UserError
    from emdist.io.expdir import check_file_label
    from emdist.io.kaldi import write_kaldi_model
    from emdist.io.modelio import load_models

    models = load_models(model)
    kind = type(next(iter(models.values()))).kind
    if kind != "gmm":
        raise UserError(f"{model}: holds {kind} models; Kaldi model files hold GMMs")
    if all_dir is not None:
        for name in models:
            check_file_label(name, all_dir)
        for name, gmm in sorted(models.items()):
            write_kaldi_model(Path(all_dir) / f"{name}.mdl", gmm, binary=binary)
        log.info("wrote %d Kaldi models to %s", len(models), all_dir)
        return
    if label is None:
        if len(models) != 1:
            shown = ", ".join(sorted(models)[:10]) + (", ..." if len(models) > 10 else "")
            raise UserError(f"{model}: holds {len(models)} models ({shown}); pick one with "
                            "--label L, or write them all with --all DIR")
        label = next(iter(models))
    if label not in models:
        raise UserError(f"{model}: no model labelled {label!r} (labels: "
                        f"{', '.join(sorted(models)[:10])})")
    write_kaldi_model(kaldi_out, models[label], binary=binary)
    log.info("wrote %s (label %s, %s)", kaldi_out, label, "binary" if binary else "text")


# -- Kaldi's piecewise commands -----------------------------------------------------------

KaldiBinary = Annotated[str, _bool_option(
    "Kaldi files in binary (as Kaldi writes by default); --binary=false writes text.",
    "--binary")]
UpdateFlags = Annotated[str, typer.Option(
    "--update-flags", help="Kaldi's update flags: which of means (m), variances (v) and weights "
    "(w) to update.")]
FeaturesArg = Annotated[str, typer.Argument(
    help="A Kaldi data dir (each utterance to its text label's model, or all to a one-model "
    "file), or an rspecifier such as scp:feats.scp or ark:feats.ark (one model).")]
PrecisionOpt = Annotated[Precision, typer.Option(help="Precision of the E-step products "
                                                 "(statistics are always float64).")]
GmmFileArg = Annotated[Path, typer.Argument(help="emdist or Kaldi GMM file.")]
GselectOpt = Annotated[str | None, typer.Option(
    "--gselect", help="Gaussian selections (emdist gselect, gmm-gselect): an rspecifier such "
    "as ark:gselect.ark or 'ark,s,cs:gunzip -c gselect.1.gz |'. Posteriors are then over "
    "each frame's selected Gaussians only; a one-GMM model file.")]


@app.command("acc-stats", cls=_kaldi_bools("--binary", "--kaldi-accs"))
def acc_stats(
    model: Annotated[Path, typer.Argument(help="emdist or Kaldi model file.")],
    features: FeaturesArg,
    stats_out: Annotated[Path, typer.Argument(help="Statistics file to write.")],
    kaldi_accs: Annotated[str, _bool_option(
        "Write Kaldi's accumulators (<GMMACCS>, as gmm-global-acc-stats does) instead of "
        "emdist's float64 statistics.", "--kaldi-accs")] = "false",
    binary: KaldiBinary = "true",
    update_flags: UpdateFlags = "mvw",
    precision: PrecisionOpt = Precision.float32,
    chunk_size: Annotated[int, typer.Option(help="Frames per E-step product.")] = 1024,
    gselect: GselectOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Accumulate the statistics of MODEL over FEATURES (gmm-global-acc-stats): one E-step
    job, the task emdist train runs per shard."""
    _setup_logging(verbose, quiet)
    kaldi = _kaldi_bool(kaldi_accs, "--kaldi-accs")
    _run(verbose, _acc_stats, model, features, stats_out, kaldi, _kaldi_bool(binary),
         update_flags, precision.value, chunk_size, gselect)


def _acc_stats(model: Path, features: str, stats_out: Path, kaldi: bool, binary: bool,
               update_flags: str, precision: str, chunk_size: int,
               gselect: str | None) -> None:
    from emdist.engine.steps import acc_stats, read_model_file
    from emdist.models.estep import EStepOptions
    from emdist.models.kind import per_frame
    from emdist.models.mstep import augment_flags

    flags = augment_flags(update_flags)
    models = read_model_file(model)
    if kaldi:
        _check_kaldi_accs(models.models, model)
    stats = acc_stats(models, features, EStepOptions(dtype=precision, chunk_size=chunk_size),
                      gselect)
    _write_stats(stats_out, stats, kaldi, binary, flags)
    ll, frames = per_frame(stats)
    log.info("accumulated %d frames of %d models; log-likelihood per frame %.6f; wrote %s",
             frames, len(stats), ll, stats_out)


def _check_kaldi_accs(stats_or_models, path: Path) -> None:
    from emdist.errors import UserError

    if len(stats_or_models) != 1:
        raise UserError(f"{path}: Kaldi accumulators hold one GMM, and this holds "
                        f"{len(stats_or_models)} models; write emdist statistics instead")
    value = next(iter(stats_or_models.values()))
    if type(value).__name__ not in ("GMM", "GmmStats"):
        raise UserError(f"{path}: Kaldi accumulators hold GMM statistics, not "
                        f"{type(value).__name__}")


def _write_stats(path: Path, stats, kaldi: bool, binary: bool, flags: str) -> None:
    from emdist.io.kaldi import write_kaldi_accs
    from emdist.io.modelio import save_stats

    if kaldi:
        _check_kaldi_accs(stats, path)
        write_kaldi_accs(path, next(iter(stats.values())), binary=binary, flags=flags)
    else:
        save_stats(path, stats)


@app.command("sum-accs", cls=_kaldi_bools("--binary", "--kaldi-accs"))
def sum_accs(
    stats_out: Annotated[Path, typer.Argument(help="Statistics file to write.")],
    stats_in: Annotated[list[Path], typer.Argument(help="Statistics files to add (emdist's "
                                                   "or Kaldi's accumulators).")],
    kaldi_accs: Annotated[str, _bool_option(
        "Write Kaldi's accumulators (<GMMACCS>) instead of emdist's float64 statistics.",
        "--kaldi-accs")] = "false",
    binary: KaldiBinary = "true",
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Add statistics files (gmm-global-sum-accs), in the order the trainer adds shards."""
    _setup_logging(verbose, quiet)
    kaldi = _kaldi_bool(kaldi_accs, "--kaldi-accs")
    _run(verbose, _sum_accs, stats_out, stats_in, kaldi, _kaldi_bool(binary))


def _sum_accs(stats_out: Path, stats_in: list[Path], kaldi: bool, binary: bool) -> None:
    from emdist.engine.steps import sum_stats

    total = sum_stats(stats_in)
    _write_stats(stats_out, total.stats, kaldi, binary, total.flags)
    log.info("summed %d statistics files into %s", len(stats_in), stats_out)


@app.command("est", cls=_kaldi_bools("--binary", "--remove-low-count-gaussians"))
def est(
    model: Annotated[Path, typer.Argument(help="emdist or Kaldi model file the statistics "
                                          "were accumulated with.")],
    stats: Annotated[Path, typer.Argument(help="Statistics (emdist's, or Kaldi's "
                                          "accumulators).")],
    model_out: Annotated[Path, typer.Argument(help="Model file to write: Kaldi's format when "
                                              "MODEL is a Kaldi file, else emdist's.")],
    min_gaussian_weight: Annotated[float, typer.Option(
        help="Weight a Gaussian needs to be updated.")] = 1e-5,
    min_gaussian_occupancy: Annotated[float | None, typer.Option(
        help="Occupancy a Gaussian needs to be updated. [default: 10 diag, 100 full]",
        show_default=False)] = None,
    min_variance: Annotated[float, typer.Option(help="Variance floor (diag).")] = 1e-3,
    variance_floor: Annotated[float, typer.Option(help="Eigenvalue floor (full).")] = 1e-3,
    max_condition: Annotated[float, typer.Option(help="Maximum condition number (full).")]
    = 1e4,
    remove_low_count_gaussians: Annotated[str, _bool_option(
        "Remove Gaussians too starved to update (never the last one).",
        "--remove-low-count-gaussians")] = "true",
    mix_up: Annotated[int, typer.Option(help="After the update, split the heaviest Gaussians "
                                        "until there are this many (0: no mix-up).")] = 0,
    perturb_factor: Annotated[float, typer.Option(
        help="Mix-up mean perturbation, in standard deviations.")] = 0.01,
    update_flags: UpdateFlags = "mvw",
    binary: KaldiBinary = "true",
    seed: Annotated[int, typer.Option(help="Seed of the mix-up perturbation.")] = 0,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Estimate a new model from statistics (gmm-global-est), with Kaldi's options."""
    _setup_logging(verbose, quiet)
    remove = _kaldi_bool(remove_low_count_gaussians, "--remove-low-count-gaussians")
    mstep = dict(min_gaussian_weight=min_gaussian_weight,
                 min_gaussian_occupancy=min_gaussian_occupancy, min_variance=min_variance,
                 variance_floor=variance_floor, max_condition=max_condition,
                 remove_low_count_gaussians=remove, update_flags=update_flags)
    _run(verbose, _est, model, stats, model_out, mstep, mix_up, perturb_factor,
         _kaldi_bool(binary), seed)


def _est(model: Path, stats_path: Path, model_out: Path, mstep: dict, mix_up: int,
         perturb_factor: float, binary: bool, seed: int) -> None:
    from emdist.engine.steps import describe_update, estimate, read_model_file, read_stats_file
    from emdist.errors import UserError
    from emdist.io.kaldi import write_kaldi_model
    from emdist.io.modelio import save_models
    from emdist.models.mstep import MStepOptions

    if mix_up < 0:
        raise UserError(f"--mix-up={mix_up}: give a number of Gaussians, or 0")
    models = read_model_file(model)
    stats = read_stats_file(stats_path)
    new, reports = estimate(models, stats, MStepOptions(**mstep), mix_up, perturb_factor, seed)
    for line in describe_update(stats, models, reports):
        log.info("%s", line)
    if models.kaldi:
        write_kaldi_model(model_out, next(iter(new.values())), binary=binary)
    else:
        save_models(model_out, new)
    log.info("wrote %s", model_out)


@app.command("get-frame-likes", cls=_kaldi_bools("--average"))
def get_frame_likes(
    model: GmmFileArg,
    features: FeaturesArg,
    likes_out: Annotated[str, typer.Argument(
        help="Kaldi wspecifier: ark:likes.ark, ark,t:likes.txt, ark,scp:likes.ark,likes.scp, "
        "'ark:| gzip -c > likes.gz', ark,t:- for standard output.")],
    average: Annotated[str, _bool_option(
        "One average log-likelihood per utterance instead of a vector per frame.",
        "--average")] = "false",
    label: Annotated[str | None, typer.Option(
        help="The model to score with, from a file of several models.")] = None,
    precision: PrecisionOpt = Precision.float32,
    gselect: GselectOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Per-frame log-likelihoods of every utterance (gmm-global-get-frame-likes), as a
    Kaldi archive of vectors, or of floats with --average."""
    _setup_logging(verbose, quiet)
    mean = _kaldi_bool(average, "--average")
    _run(verbose, _frame_likes, model, features, likes_out, mean, label, precision.value,
         gselect)


def _frame_likes(model: Path, features: str, likes_out: str, average: bool,
                 label: str | None, precision: str, gselect: str | None) -> None:
    from emdist.engine.steps import frame_likes, read_model_file
    from emdist.io.tables import TableWriter
    from emdist.models.estep import EStepOptions

    models = read_model_file(model)
    utts = frames = 0
    total = 0.0
    with TableWriter(likes_out) as writer:
        for utt_id, likes in frame_likes(models, features, label, EStepOptions(dtype=precision),
                                         gselect):
            writer.write(utt_id, float(likes.mean()) if average else likes)
            utts, frames, total = utts + 1, frames + len(likes), total + float(likes.sum())
    log.info("scored %d utterances, %d frames; log-likelihood per frame %.6f", utts, frames,
             total / max(frames, 1))


@app.command("gselect")
def gselect(
    model: GmmFileArg,
    features: FeaturesArg,
    gselect_out: Annotated[str, typer.Argument(
        help="Kaldi wspecifier for the selections: ark:gselect.ark, ark,t:gselect.txt, "
        "ark,scp:gselect.ark,gselect.scp, 'ark:| gzip -c > gselect.1.gz', ark:- for "
        "standard output.")],
    n: Annotated[int, typer.Option("--n", help="Gaussians selected per frame.")] = 50,
    label: Annotated[str | None, typer.Option(
        help="The model to select from, from a file of several models.")] = None,
    precision: PrecisionOpt = Precision.float32,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Each frame's N best Gaussians by log-likelihood, best first (gmm-gselect), as a Kaldi
    archive of int32 vectors of vectors, for acc-stats and get-frame-likes --gselect."""
    _setup_logging(verbose, quiet)
    _run(verbose, _gselect, model, features, gselect_out, n, label, precision.value)


def _gselect(model: Path, features: str, gselect_out: str, n: int, label: str | None,
             precision: str) -> None:
    from emdist.engine.steps import gaussian_selection, read_model_file
    from emdist.io.tables import TableWriter
    from emdist.models.estep import EStepOptions

    models = read_model_file(model)
    utts = frames = 0
    with TableWriter(gselect_out) as writer:
        for utt_id, indices in gaussian_selection(models, features, n, label,
                                                  EStepOptions(dtype=precision)):
            writer.write(utt_id, indices)
            utts, frames = utts + 1, frames + len(indices)
    log.info("selected up to %d Gaussians per frame for %d utterances, %d frames; wrote %s",
             n, utts, frames, gselect_out)


# -- looking at results ----------------------------------------------------------------------

@app.command()
def plot(
    exp_dir: Annotated[Path, typer.Argument(help="Experiment dir (after emdist train, and "
                                            "emdist test for confusion matrices).")],
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Write PNG plots into EXP_DIR/plots/: log-likelihood by iteration per model, each
    decode's confusion matrix, component weights and occupancies."""
    _setup_logging(verbose, quiet)
    _run(verbose, _plot, exp_dir)


def _check_plots() -> None:
    """--plots without matplotlib fails before any work, with how to install it."""
    from emdist.report.plots import require_matplotlib

    _run(False, require_matplotlib)


def _plot(exp_dir: Path) -> None:
    from emdist.report.plots import write_plots

    for path in write_plots(exp_dir):
        log.info("wrote %s", path)


@app.command()
def report(
    exp_dir: Annotated[Path, typer.Argument(help="Experiment dir.")],
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Write EXP_DIR/report.html: one self-contained page (images embedded) with the
    configuration, the iterations, the plots, the results and the misrecognised
    utterances with their scores against every word."""
    _setup_logging(verbose, quiet)
    _run(verbose, _report, exp_dir)


def _report(exp_dir: Path) -> None:
    from emdist.report.html import write_report

    log.info("wrote %s", write_report(exp_dir))


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A model file (emdist or Kaldi) or an exp dir.")],
    json_: Annotated[bool, typer.Option("--json", help="One JSON object, for scripts.")]
    = False,
    verbose: Verbose = False,
) -> None:
    """What a model file or an exp dir holds: model kind, labels, Gaussians, dimension,
    iterations, final log-likelihood and the latest results."""
    _setup_logging(verbose, False)
    _run(verbose, _info, path, json_)


def _info(path: Path, as_json: bool) -> None:
    import json

    from emdist.report.info import describe

    summary = describe(path)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    from rich.console import Console

    console = Console()
    for table in _info_tables(summary):
        console.print(table)


def _info_tables(summary: dict) -> list:
    from rich.table import Table

    tables = []
    model = summary.get("model")
    if model is not None:
        t = Table(title=f"model {model['path']}", show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column()
        cov = f", {model['covariance_type']} covariances" if model["covariance_type"] else ""
        t.add_row("kind", f"{model['kind']}{cov} ({model['file_format']} file)")
        t.add_row("dimension", str(model["dim"]))
        labels = model["labels"]
        shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} in all)"
                                          if len(labels) > 12 else "")
        t.add_row("labels", shown)
        counts = sorted(set(model["components"].values()))
        per = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        t.add_row("Gaussians", f"{per} per model, {model['total_components']} in all")
        if "states" in model:
            states = sorted(set(model["states"].values()))
            t.add_row("HMM states", ", ".join(map(str, states)))
        tables.append(t)
    training = summary.get("training")
    if training:
        t = Table(title="training", show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column()
        total = training.get("num_iters")
        done = f"{training['iterations']}" + (f" of {total}" if total is not None else "")
        t.add_row("iterations", done + ("" if training["complete"] else " (not complete)"))
        if "final_loglike_per_frame" in training:
            t.add_row("log-likelihood per frame", f"{training['final_loglike_per_frame']:.4f} "
                      f"over {training['frames']:,} frames")
            t.add_row("time", f"{training['seconds']:.2f} s")
            t.add_row("floored / removed", f"{training['floored']} / {training['removed']}")
        for key, value in sorted(training.get("config", {}).items()):
            t.add_row(key, str(value))
        tables.append(t)
    results = summary.get("results") or []
    if results:
        t = Table(title="results", title_justify="left")
        for column in ("decode", "error rate", "errors / utterances", "log-likelihood/frame"):
            t.add_column(column)
        for r in results:
            rate = f"{100 * r['error_rate']:.2f}%" if "error_rate" in r else "-"
            errors = f"{r['n_errors']} / {r['n_utts']}" if "n_errors" in r else \
                f"{r.get('n_utts', '-')} utts"
            ll = f"{r['loglike_per_frame']:.4f}" if "loglike_per_frame" in r else "-"
            t.add_row(r["decode"], rate, errors, ll)
        tables.append(t)
    return tables


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
