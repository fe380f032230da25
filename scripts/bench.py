#!/usr/bin/env python
"""Benchmark emdist on synthetic data: BLAS rate, EM iteration, scikit-learn, Dask, memory.

    python scripts/bench.py [--frames 1000000] [--dim 39] [--diag-k 64,256] [--full-k 64]
        [--repeats 3] [--json bench.json] [--quick] [--skip-sklearn] [--skip-dask]
        [--skip-memory] [--sklearn-iters 2] [--mem-frames 1000000,4000000]
        [--sklearn-mem-frames 250000,1000000] [--dask-k K] [--dask-iters 4] [--nj 8]
        [--workdir DIR]

What one run measures, all on the same synthetic data (frames drawn from a known 8-component
diagonal GMM, the one ``scripts/make_corpus.py`` draws with ``--seed 0``):

1. BLAS: the rate of a square ``a @ b`` (n = 2000, float32 and float64) and of the E-step's
   own products (``(1024 x (1+E)) @ ((1+E) x K)`` and ``respᵀ @ rows``, E = 2D for diagonal,
   D + D(D+1)/2 for full), all under ``threadpool_limits(1)``; the BLAS library, version and
   kernel (``threadpoolctl``), and ``OPENBLAS_CORETYPE`` if set. Nothing here changes the
   environment: the kernel reported is the one that ran.
2. emdist in process, one thread: one EM iteration = ``estep.accumulate`` (chunks of 1024,
   float32 products; float64 for reference) + ``mstep.m_step(style="sklearn")`` on frames
   held in memory, from a fixed initial model (uniform weights, K random frames as means,
   the global variance / covariance). Useful FLOPs per iteration: diagonal ``8·N·D·K``,
   full ``4·N·D²·K``; reported as GFLOP/s and as a fraction of the square-product rate.
3. scikit-learn ``GaussianMixture`` from the same initial model, on float64 frames, one
   thread: a ``fit`` warm-started from the initial model (``warm_start=True``, parameters
   set to the initial model), ``tol = 0``, timed per iteration by sklearn itself
   (``verbose=2`` prints each iteration's time lapse): neither sklearn's initialisation nor
   its final E-step is counted. Both log-likelihoods under the initial model are recorded
   as a check that the two start from the same model.
4. The engine (``emdist.engine.train``, ``--global``, k-means init with no Lloyd pass, shards
   cached in memory) in process and on a Dask LocalCluster of 1 and 2 single-threaded
   worker processes; seconds per iteration from ``IterationRecord.seconds``, the median over
   the iterations after the first.
5. Peak RSS, each in its own process: ``emdist train --workers 0 --feature-cache none``
   (streamed; ``VmHWM`` of the process) and the same with ``--workers 2`` (driver + workers
   summed, sampled every 50 ms), on Kaldi data dirs written by ``scripts/make_corpus.py``
   (deleted at the end), and scikit-learn's cold ``fit`` (``max_iter=1``) on frames in
   memory; sklearn's run is skipped, and said so, when it would not fit in free memory.

Every figure is the median of ``--repeats`` runs; every ratio is between figures of the same
run. Targets (from the issue) are judged only at N = 1,000,000, D = 39 (memory: 1M and 4M
frames); ``--quick`` (N = 100,000, K = 16, 64 diagonal and 8 full, one repeat, memory at
200k / 400k frames for emdist and 100k / 200k for sklearn) prints ``n/a (quick)`` instead.
The JSON holds every raw timing, the medians, the environment and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
MAKE_CORPUS = SCRIPTS / "make_corpus.py"
SCHEMA = "emdist-bench/1"
SQUARE_N = 2000
CHUNK = 1024
TRUE_GAUSS = 8  # components of the synthetic data's true GMM
SEED = 0
FULL_N = 1_000_000
FULL_DIM = 39
MEM_TARGET_SIZES = (1_000_000, 4_000_000)
MIB = 1024.0 * 1024.0

FLOP_FORMULAS = {
    "diag": "8*N*D*K per iteration (log-likelihoods [x, x^2] @ W: 4NDK; statistics "
            "resp^T @ [x, x^2]: 4NDK)",
    "full": "4*N*D^2*K per iteration (log-likelihoods (x-mu)^T P (x-mu): 2ND^2K; second-order "
            "statistics sum resp x x^T: 2ND^2K; emdist does about half of these with vech)",
    "square": "2*n^3 for an (n x n) @ (n x n) product",
    "estep_shape": "2*rows*inner*cols for each product",
}

# Targets of the issue: (figure key, comparison, threshold, description).
TARGETS = {
    "emdist.diag_k256.f32": (">=", 0.50, "fraction of square f32 rate"),
    "emdist.diag_k64.f32": (">=", 0.35, "fraction of square f32 rate"),
    "sklearn.diag_k256": (">=", 6.0, "x faster than sklearn"),
    "sklearn.full_k64": (">=", 5.0, "x faster than sklearn"),
    "dask.w1": ("<=", 0.10, "overhead vs in process"),
    "dask.w2": (">=", 1.7, "speed-up vs 1 worker"),
    "memory.emdist.flat": ("<=", 1.10, "peak 4M / peak 1M"),
}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"bench: [{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def median(values):
    return float(statistics.median(values))


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


# ---------------------------------------------------------------------------- environment


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or platform.machine()}
    first = text.split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    info["model"] = fields.get("model name", platform.machine())
    info["family"] = fields.get("cpu family")
    info["model_number"] = fields.get("model")
    flags = set(fields.get("flags", "").split())
    info["simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4")))
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
        info["cpu0_thread_siblings"] = siblings.read_text().strip()
    except OSError:
        pass
    return info


def environment(argv: list[str]) -> dict:
    import numpy as np
    import threadpoolctl

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "threadpoolctl": threadpoolctl.__version__}
    for name in ("emdist", "scipy", "sklearn", "dask", "distributed", "kaldiio", "psutil"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed: say so, do not fail the benchmark
            versions[name] = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    env_vars = {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("OPENBLAS", "OMP_", "MKL_", "BLIS_", "GOTO"))}
    try:
        import psutil

        mem_total = psutil.virtual_memory().total
    except ImportError:
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "command": [sys.executable, *argv],
        "cwd": os.getcwd(),
        "git": commit or None,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpuinfo(),
        "cpus_available": cpus,
        "memory_total_gib": round(mem_total / MIB / 1024, 2),
        "loadavg_start": list(os.getloadavg()),
        "versions": versions,
        "env": env_vars,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def blas_info() -> dict:
    """threadpoolctl's view of every loaded BLAS / OpenMP library, numpy's marked."""
    import numpy as np
    from threadpoolctl import threadpool_info

    numpy_dir = str(Path(np.__file__).resolve().parent.parent)
    libs = []
    for lib in threadpool_info():
        entry = {k: lib.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                         "architecture", "threading_layer", "num_threads",
                                         "filepath")}
        path = str(lib.get("filepath") or "")
        entry["numpy"] = lib.get("user_api") == "blas" and (
            "numpy" in Path(path).parent.name or path.startswith(
                os.path.join(numpy_dir, "numpy")))
        libs.append(entry)
    numpy_blas = next((lib for lib in libs if lib["numpy"]), None)
    if numpy_blas is None:
        numpy_blas = next((lib for lib in libs if lib["user_api"] == "blas"), None)
    return {"libraries": libs, "numpy_blas": numpy_blas}


def _worker_blas() -> dict:
    """Runs on a Dask worker: the kernel numpy's BLAS uses there."""
    import numpy  # noqa: F401  (loads the BLAS)
    from threadpoolctl import threadpool_info

    return {os.path.basename(lib.get("filepath") or "?"): lib.get("architecture")
            for lib in threadpool_info() if lib.get("user_api") == "blas"}


# ---------------------------------------------------------------------------- data


def _make_corpus_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("emdist_bench_make_corpus", MAKE_CORPUS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_frames(n: int, dim: int, dtype: str = "float32"):
    """N frames from the true GMM of ``make_corpus.py --seed 0 --num-gauss 8`` (diag)."""
    import numpy as np

    mc = _make_corpus_module()
    model = mc.make_model(SEED, dim, TRUE_GAUSS, "diag", 6.0)
    sampler = mc.Sampler(model, "diag", np.dtype(dtype))
    return sampler.sample(np.random.default_rng([SEED, 0xBE7C]), n)


def write_corpus(out: Path, frames: int, dim: int) -> float:
    """Write a Kaldi data dir with scripts/make_corpus.py (a subprocess); seconds taken."""
    t0 = time.perf_counter()
    cmd = [sys.executable, str(MAKE_CORPUS), str(out), "--frames", str(frames), "--dim",
           str(dim), "--num-gauss", str(TRUE_GAUSS), "--seed", str(SEED)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - t0


def initial_model(frames, k: int, cov: str):
    """Uniform weights, K distinct random frames as means, global (co)variance: no k-means."""
    import numpy as np

    from emdist.gmm import GMM

    rng = np.random.default_rng([SEED, k, 7])
    means = frames[rng.choice(len(frames), size=k, replace=False)].astype(np.float64)
    weights = np.full(k, 1.0 / k)
    if cov == "diag":
        covs = np.tile(frames.var(axis=0, dtype=np.float64), (k, 1))
    else:
        glob = np.cov(frames, rowvar=False, dtype=np.float64)
        covs = np.tile(glob, (k, 1, 1))
    return GMM(weights, means, covs, cov)


def sklearn_precisions(model):
    import numpy as np

    if model.covariance_type == "diag":
        return 1.0 / model.covariances
    prec = np.linalg.inv(model.covariances)
    return 0.5 * (prec + prec.transpose(0, 2, 1))


def useful_flops(cov: str, n: int, d: int, k: int) -> float:
    return 8.0 * n * d * k if cov == "diag" else 4.0 * n * d * d * k


def expanded_width(cov: str, d: int) -> int:
    return 2 * d if cov == "diag" else d + d * (d + 1) // 2


# ---------------------------------------------------------------------------- BLAS rates


def _rate_square(dtype: str, repeats: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.standard_normal((SQUARE_N, SQUARE_N)).astype(dtype)
    b = rng.standard_normal((SQUARE_N, SQUARE_N)).astype(dtype)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        seconds.append(time.perf_counter() - t0)
    flops = 2.0 * SQUARE_N**3
    return {"n": SQUARE_N, "dtype": dtype, "flops": flops, "seconds": seconds,
            "median_s": median(seconds), "gflops": flops / median(seconds) / 1e9}


def _rate_call(func, flops: float, repeats: int, batch_seconds: float = 0.05) -> dict:
    func()
    t0 = time.perf_counter()
    func()
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(batch_seconds / one))
    per_call = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        for _ in range(calls):
            func()
        per_call.append((time.perf_counter() - t0) / calls)
    return {"flops": flops, "calls_per_batch": calls, "seconds_per_call": per_call,
            "median_s": median(per_call), "gflops": flops / median(per_call) / 1e9}


def estep_shape_rates(cov: str, d: int, k: int, repeats: int) -> dict:
    """The two products of one E-step chunk, float32, exactly as the Accumulator runs them."""
    import numpy as np

    rng = np.random.default_rng(2)
    inner = 1 + expanded_width(cov, d)
    rows = rng.standard_normal((CHUNK, inner)).astype(np.float32)
    weights = rng.standard_normal((inner, k)).astype(np.float32)
    log_like = np.empty((CHUNK, k), dtype=np.float32)
    resp = rng.random((CHUNK, k)).astype(np.float32)
    flops = 2.0 * CHUNK * inner * k
    first = _rate_call(lambda: np.matmul(rows, weights, out=log_like), flops, repeats)
    second = _rate_call(lambda: resp.T @ rows, flops, repeats)
    first["shape"] = f"({CHUNK} x {inner}) @ ({inner} x {k})"
    second["shape"] = f"({k} x {CHUNK}) @ ({CHUNK} x {inner})  [resp.T @ rows]"
    return {"loglike": first, "stats": second}


# ---------------------------------------------------------------------------- in process


def emdist_iteration(model, frames, dtype: str):
    from emdist.estep import EStepOptions, accumulate
    from emdist.mstep import MStepOptions, m_step

    t0 = time.perf_counter()
    stats = accumulate(model, frames, EStepOptions(dtype=dtype, chunk_size=CHUNK))
    m_step(stats, MStepOptions(style="sklearn"))
    return time.perf_counter() - t0, stats


def sklearn_warm_start(model, frames64):
    """A GaussianMixture whose next ``fit`` starts from ``model`` with no initialisation.

    A cold ``fit`` on a few frames makes it fitted; its parameters are then set to the
    initial model (``weights_``, ``means_``, ``precisions_cholesky_``: what a warm start
    reads), so a timed ``fit`` runs only ``max_iter`` iterations and the final E-step.
    """
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    k = model.n_components
    gm = GaussianMixture(
        n_components=k, covariance_type=model.covariance_type,
        weights_init=model.weights, means_init=model.means,
        precisions_init=sklearn_precisions(model), max_iter=1, tol=0.0,
        init_params="random", random_state=SEED, reg_covar=1e-6, warm_start=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(frames64[: max(4 * k, 2000)])
    precisions = sklearn_precisions(model)
    gm.weights_ = model.weights.copy()
    gm.means_ = model.means.copy()
    gm.covariances_ = model.covariances.copy()
    gm.precisions_ = precisions
    if model.covariance_type == "diag":
        gm.precisions_cholesky_ = np.sqrt(precisions)
    else:  # any triangular L with L Lᵀ = Λ scores the same (the log-likelihood check says so)
        gm.precisions_cholesky_ = np.linalg.cholesky(precisions)
    return gm


ITER_LINE = re.compile(r"Iteration (\d+)\s+time lapse ([0-9.eE+-]+)s")


def sklearn_fit_iterations(prepared, frames64, max_iter: int):
    """A warm ``fit`` of ``max_iter`` iterations from the prepared model.

    Returns (total seconds, per-iteration seconds, lower bound after the first iteration).
    The per-iteration times are sklearn's own (``verbose=2`` prints the time of each
    E-step + M-step + lower bound); with a warm start none of them includes initialisation.
    """
    import contextlib
    import copy
    import io

    from sklearn.exceptions import ConvergenceWarning

    gm = copy.deepcopy(prepared)
    gm.set_params(max_iter=max_iter, verbose=2, verbose_interval=1)
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        gm.fit(frames64)
        seconds = time.perf_counter() - t0
    lapses = [float(t) for _, t in ITER_LINE.findall(printed.getvalue())]
    if len(lapses) != max_iter:
        raise RuntimeError(
            "cannot read sklearn's per-iteration times from its verbose output:\n"
            + printed.getvalue()[-2000:])
    return seconds, lapses, float(gm.lower_bound_) if max_iter == 1 else None


SKLEARN_METHOD = ("sklearn's own time of each iteration (verbose=2 'time lapse': E-step + "
                  "M-step + lower bound) in a fit of {r} iterations warm-started from the "
                  "initial model: no initialisation and no final E-step counted; mean over "
                  "the iterations of a fit, median over repeats; tol=0, float64 X, one thread")


def bench_in_process(args, frames, sq32: float, sq64: float) -> dict:
    """emdist (float32, float64) and sklearn per-iteration times, interleaved per repeat."""
    import numpy as np

    n, d = frames.shape
    frames64 = None if args.skip_sklearn else frames.astype(np.float64)
    configs = [("diag", k) for k in args.diag_k] + [("full", k) for k in args.full_k]
    results = {}
    for cov, k in configs:
        name = f"{cov}_k{k}"
        model = initial_model(frames, k, cov)
        flops = useful_flops(cov, n, d, k)
        log(f"in process {name}: warm-up")
        _, stats64 = emdist_iteration(model, frames, "float64")
        emdist_iteration(model, frames, "float32")
        em32, em64, sk, sk_raw = [], [], [], []
        sk_skipped = None
        if frames64 is not None:
            need, avail = sklearn_memory_estimate(n, k, d), available_memory()
            if need > avail:
                sk_skipped = (f"needs about {need / MIB / 1024:.1f} GiB, "
                              f"{avail / MIB / 1024:.1f} GiB available")
                log(f"in process {name}: sklearn skipped ({sk_skipped})")
        for rep in range(args.repeats):
            em32.append(emdist_iteration(model, frames, "float32")[0])
            em64.append(emdist_iteration(model, frames, "float64")[0])
            msg = f"in process {name} repeat {rep + 1}/{args.repeats}: emdist f32 " \
                  f"{em32[-1]:.3f} s, f64 {em64[-1]:.3f} s"
            if frames64 is not None and sk_skipped is None:
                if rep == 0:
                    prepared = sklearn_warm_start(model, frames64)
                    # warm-up; its lower bound is the log-likelihood under the initial model
                    _, _, lower_bound = sklearn_fit_iterations(prepared, frames64, 1)
                total, lapses, _ = sklearn_fit_iterations(prepared, frames64,
                                                          args.sklearn_iters)
                sk_raw.append({"fit_total_s": total, "iteration_s": lapses})
                sk.append(statistics.fmean(lapses))
                msg += f", sklearn {sk[-1]:.3f} s"
            log(msg)
        entry = {
            "covariance_type": cov, "K": k, "N": n, "D": d, "useful_flops": flops,
            "emdist_f32": {"seconds": em32, "median_s": median(em32),
                           "gflops": flops / median(em32) / 1e9,
                           "fraction_of_square_f32": flops / median(em32) / 1e9 / sq32},
            "emdist_f64": {"seconds": em64, "median_s": median(em64),
                           "gflops": flops / median(em64) / 1e9,
                           "fraction_of_square_f64": flops / median(em64) / 1e9 / sq64},
        }
        entry["emdist_f32"]["paired_fraction"] = [
            flops / s / 1e9 / sq32 for s in em32]
        if sk_skipped is not None:
            entry["sklearn"] = {"skipped": sk_skipped}
        if sk:
            emdist_ll = stats64.loglike / stats64.frames
            entry["sklearn"] = {
                "method": SKLEARN_METHOD.format(r=args.sklearn_iters),
                "fits": sk_raw, "seconds": sk, "median_s": median(sk),
                "gflops": flops / median(sk) / 1e9,
                "speedup_emdist_f32": median(sk) / median(em32),
                "paired_speedup": [s / e for s, e in zip(sk, em32, strict=True)],
                "loglike_check": {"emdist_f64_per_frame": emdist_ll,
                                  "sklearn_lower_bound_iter1": lower_bound,
                                  "abs_diff": abs(emdist_ll - lower_bound)},
            }
        results[name] = entry
    return results


# ---------------------------------------------------------------------------- engine / Dask


def run_engine(data, k: int, iters: int, nj: int, make_backend, label: str) -> dict:
    from emdist.engine import TrainConfig, train

    config = TrainConfig(global_mode=True, num_gauss=k, covariance_type="diag",
                         num_iters=iters, init="kmeans", kmeans_iters=0, nj=nj, seed=SEED)
    records, stamps = [], []

    def on_record(record):
        records.append(record)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    backend = make_backend()
    started = time.perf_counter() - t0
    worker_blas = None
    try:
        if hasattr(backend, "client"):
            worker_blas = backend.client.run(_worker_blas)
        t1 = time.perf_counter()
        train(data, config, backend, None, on_record=on_record, feature_cache="memory")
        total = time.perf_counter() - t1
    finally:
        backend.close()
    seconds = [r.seconds for r in records]
    steady = seconds[1:] if len(seconds) > 1 else seconds
    result = {
        "backend": label, "startup_s": started, "train_total_s": total,
        "iteration_seconds": seconds,
        "callback_intervals_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "n_components": [r.n_components.get("global") for r in records],
        "loglike_per_frame": [r.loglike_per_frame for r in records],
        "median_s": median(steady),
        "median_over": "iterations 2.." if len(seconds) > 1 else "iteration 1",
    }
    if worker_blas is not None:
        result["worker_blas_kernel"] = worker_blas
    log(f"engine {label}: {result['median_s']:.3f} s per iteration ({seconds})")
    return result


def bench_dask(args, data_path: Path) -> dict:
    from emdist.backends.dask_backend import DaskBackend
    from emdist.backends.serial import SerialBackend
    from emdist.datadir import load_data_dir

    data = load_data_dir(data_path, require_labels=False)
    k = args.dask_k
    runs = {
        "serial": run_engine(data, k, args.dask_iters, args.nj, SerialBackend, "in process"),
        "w1": run_engine(data, k, args.dask_iters, args.nj, lambda: DaskBackend.local(1),
                         "dask 1 worker"),
        "w2": run_engine(data, k, args.dask_iters, args.nj, lambda: DaskBackend.local(2),
                         "dask 2 workers"),
    }
    serial, w1, w2 = (runs[x]["median_s"] for x in ("serial", "w1", "w2"))
    return {
        "N": data.num_frames, "K": k, "covariance_type": "diag", "nj": args.nj,
        "iterations": args.dask_iters, "feature_cache": "memory",
        "config": "TrainConfig(global_mode=True, init='kmeans', kmeans_iters=0)",
        "runs": runs,
        "overhead_w1_vs_serial": w1 / serial - 1.0,
        "speedup_w2_vs_w1": w1 / w2,
        "speedup_w2_vs_serial": serial / w2,
    }


# ---------------------------------------------------------------------------- memory


def peak_rss_self() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` (ru_maxrss after an exec also counts the
    RSS of the parent it was forked from, so it overstates a small child's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Runs the emdist CLI and writes its own peak RSS to the file named by its first argument.
CLI_WRAPPER = """
import atexit, json, sys
out = sys.argv.pop(1)
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            with open(out, 'w') as fh:
                json.dump({'VmHWM_kib': int(line.split()[1])}, fh)
atexit.register(_peak)
from emdist.cli import main
main()
"""


def measure_process(cmd: list[str], log_path: Path, interval: float = 0.05) -> dict:
    """Run ``cmd``; sample the summed RSS of its process tree; seconds taken."""
    import psutil

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        peak_tree = 0
        handle = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                members = [handle, *handle.children(recursive=True)]
            except psutil.Error:
                members = []
            for member in members:
                try:
                    total += member.memory_info().rss
                except psutil.Error:
                    pass
            peak_tree = max(peak_tree, total)
            time.sleep(interval)
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text[-3000:]}")
    return {"peak_tree_rss_mib_sampled": peak_tree / MIB, "seconds": seconds, "output": text}


def emdist_train_cmd(data: Path, exp: Path, k: int, workers: int, peak_file: Path) -> list[str]:
    return [sys.executable, "-c", CLI_WRAPPER, str(peak_file),
            "train", str(data), str(exp), "--global", "--workers", str(workers),
            "--feature-cache", "none", "--num-gauss", str(k), "--cov", "diag",
            "--num-iters", "1", "--init", "kmeans", "--kmeans-iters", "0", "--nj", "8",
            "--quiet", "--overwrite"]


def measure_emdist(data: Path, work: Path, k: int, workers: int, tag: str) -> dict:
    peak_file = work / f"peak-{tag}.json"
    m = measure_process(emdist_train_cmd(data, work / f"exp-{tag}", k, workers, peak_file),
                        work / f"{tag}.log")
    m.pop("output")
    m["peak_rss_mib"] = json.loads(peak_file.read_text())["VmHWM_kib"] / 1024.0
    return m


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def sklearn_memory_estimate(n: int, k: int, d: int) -> float:
    """Bytes sklearn's diagonal fit may hold: about 6.3 (N, K) float64 arrays were measured
    (1.2 GiB per 100,000 frames at K = 256), plus X; counted as 7 for headroom."""
    return 8.0 * n * (7 * k + 2 * d)


def bench_memory(args, corpora: dict[int, Path], work: Path) -> dict:

    k = args.mem_k
    result: dict = {"K": k, "covariance_type": "diag", "emdist": {}, "dask2": {},
                    "sklearn": {},
                    "emdist_command": "emdist " + " ".join(
                        emdist_train_cmd(Path("DATA"), Path("EXP"), k, 0, Path("-"))[4:]),
                    "peak_rss_mib": "VmHWM of the main (driver) process: exact peak",
                    "peak_tree_rss_mib_sampled": "RSS summed over the process tree (driver, "
                                                 "nanny and worker processes), sampled every "
                                                 "50 ms",
                    "note": "k-means init holds a float64 sample of every stride-th frame, "
                            "stride = ceil(N / 200000) (TrainConfig.max_sample_frames): "
                            "N / stride frames, 200,000 at N = 200k, 400k, 1M and 4M, "
                            "fewer in between (150,000 at 300k)"}
    for n in args.mem_frames:
        log(f"memory: emdist streamed, in process, {n} frames")
        result["emdist"][str(n)] = measure_emdist(corpora[n], work, k, 0, f"mem-serial-{n}")
        if not args.skip_dask:
            log(f"memory: emdist streamed, dask 2 workers, {n} frames")
            result["dask2"][str(n)] = measure_emdist(corpora[n], work, k, 2, f"mem-dask2-{n}")
    a, b = (str(x) for x in args.mem_frames[:2])
    result["emdist_ratio"] = (result["emdist"][b]["peak_rss_mib"]
                              / result["emdist"][a]["peak_rss_mib"])
    if result["dask2"]:
        result["dask2_ratio"] = (result["dask2"][b]["peak_tree_rss_mib_sampled"]
                                 / result["dask2"][a]["peak_tree_rss_mib_sampled"])
    if not args.skip_sklearn:
        for n in args.sklearn_mem_frames:
            need, avail = sklearn_memory_estimate(n, k, args.dim), available_memory()
            if need > avail:
                result["sklearn"][str(n)] = {
                    "skipped": f"needs about {need / MIB / 1024:.1f} GiB, "
                               f"{avail / MIB / 1024:.1f} GiB available"}
                log(f"memory: sklearn {n} frames skipped ({result['sklearn'][str(n)]})")
                continue
            log(f"memory: sklearn fit, {n} frames")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "sklearn-mem",
                   "--frames", str(n), "--dim", str(args.dim), "--mem-k", str(k)]
            m = measure_process(cmd, work / f"mem-sklearn-{n}.log")
            child = json.loads(m.pop("output").strip().splitlines()[-1])
            m["method"] = "cold fit, max_iter=1 (initialisation included), VmHWM"
            m.update(child)
            result["sklearn"][str(n)] = m
        done = [str(n) for n in args.sklearn_mem_frames
                if "peak_rss_mib" in result["sklearn"].get(str(n), {})]
        if len(done) >= 2:
            result["sklearn_ratio"] = (result["sklearn"][done[1]]["peak_rss_mib"]
                                       / result["sklearn"][done[0]]["peak_rss_mib"])
        common = [n for n in done if n in result["emdist"]]
        if common:
            n = common[-1]
            result["sklearn_over_emdist_at"] = {
                "frames": int(n), "ratio": result["sklearn"][n]["peak_rss_mib"]
                / result["emdist"][n]["peak_rss_mib"]}
    return result


def child_sklearn_memory(args) -> None:
    """``--child sklearn-mem``: peak RSS of one cold sklearn fit (one JSON line on stdout)."""
    import psutil
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    frames = synthetic_frames(args.frames, args.dim, "float64")
    model = initial_model(frames, args.mem_k, "diag")
    rss_data = psutil.Process().memory_info().rss
    gm = GaussianMixture(
        n_components=model.n_components, covariance_type="diag", weights_init=model.weights,
        means_init=model.means, precisions_init=sklearn_precisions(model), max_iter=1,
        tol=0.0, init_params="random", random_state=SEED, reg_covar=1e-6)
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        gm.fit(frames)
        seconds = time.perf_counter() - t0
    print(json.dumps({"rss_before_fit_mib": rss_data / MIB, "peak_rss_mib": peak_rss_self(),
                      "fit_max_iter_1_s": seconds}))


# ---------------------------------------------------------------------------- report


def add_figure(figures: dict, key: str, label: str, value: float | None, unit: str,
               ratio: float | None = None, ratio_label: str = "", target_key: str | None = None,
               judged: bool = False, quick: bool = False) -> None:
    row = {"label": label, "value": value, "unit": unit, "ratio": ratio,
           "ratio_label": ratio_label, "target": None, "status": "-"}
    target = TARGETS.get(target_key or "")
    if target is not None:
        op, threshold, what = target
        row["target"] = f"{op} {threshold:g}"
        row["target_means"] = what
        if quick:
            row["status"] = "n/a (quick)"
        elif not judged:
            row["status"] = "n/a (size)"
        elif ratio is None:
            row["status"] = "n/a"
        else:
            ok = ratio >= threshold if op == ">=" else ratio <= threshold
            row["status"] = "PASS" if ok else "FAIL"
    figures[key] = row


def build_figures(args, report: dict) -> dict:
    figures: dict = {}
    quick = args.quick
    full_size = args.frames == FULL_N and args.dim == FULL_DIM
    mm = report["matmul"]
    sq32, sq64 = mm["square_float32"]["gflops"], mm["square_float64"]["gflops"]
    add_figure(figures, "matmul.square_f32", f"square f32 product n={SQUARE_N}", sq32, "GFLOP/s")
    add_figure(figures, "matmul.square_f64", f"square f64 product n={SQUARE_N}", sq64, "GFLOP/s",
               sq64 / sq32, "of f32")
    for name, shapes in mm["estep_shapes"].items():
        for part in ("loglike", "stats"):
            rate = shapes[part]["gflops"]
            add_figure(figures, f"matmul.estep.{name}.{part}",
                       f"E-step {part} product {name} f32", rate, "GFLOP/s", rate / sq32,
                       "of square f32")
    for name, entry in report.get("in_process", {}).items():
        f32, f64 = entry["emdist_f32"], entry["emdist_f64"]
        add_figure(figures, f"emdist.{name}.f32.s_per_iter", f"emdist {name} f32 per iteration",
                   f32["median_s"], "s")
        add_figure(figures, f"emdist.{name}.f32", f"emdist {name} f32 useful rate",
                   f32["gflops"], "GFLOP/s", f32["fraction_of_square_f32"], "of square f32",
                   f"emdist.{name}.f32", full_size, quick)
        add_figure(figures, f"emdist.{name}.f64", f"emdist {name} f64 useful rate",
                   f64["gflops"], "GFLOP/s", f64["fraction_of_square_f64"], "of square f64")
        sk = entry.get("sklearn", {})
        if "median_s" in sk:
            add_figure(figures, f"sklearn.{name}", f"sklearn {name} per iteration",
                       sk["median_s"], "s", sk["speedup_emdist_f32"], "x emdist f32 time",
                       f"sklearn.{name}", full_size, quick)
        elif "skipped" in sk:
            add_figure(figures, f"sklearn.{name}", f"sklearn {name} per iteration", None, "s",
                       None, "x emdist f32 time", f"sklearn.{name}", full_size, quick)
            figures[f"sklearn.{name}"]["status"] = "skipped (memory)"
    if "dask" in report:
        dk = report["dask"]
        runs = dk["runs"]
        add_figure(figures, "dask.serial", f"engine in process K={dk['K']} nj={dk['nj']}",
                   runs["serial"]["median_s"], "s/iter")
        add_figure(figures, "dask.w1", "engine dask 1 worker", runs["w1"]["median_s"],
                   "s/iter", dk["overhead_w1_vs_serial"], "overhead vs in process",
                   "dask.w1", full_size, quick)
        add_figure(figures, "dask.w2", "engine dask 2 workers", runs["w2"]["median_s"],
                   "s/iter", dk["speedup_w2_vs_w1"], "speed-up vs 1 worker",
                   "dask.w2", full_size, quick)
    if "memory" in report:
        mem = report["memory"]
        sizes = [str(n) for n in args.mem_frames]
        mem_judged = tuple(args.mem_frames[:2]) == MEM_TARGET_SIZES and args.dim == FULL_DIM
        for n in sizes:
            add_figure(figures, f"memory.emdist.{n}", f"peak RSS emdist streamed N={n}",
                       mem["emdist"][n]["peak_rss_mib"], "MiB")
        add_figure(figures, "memory.emdist.flat", f"peak RSS emdist {sizes[1]} / {sizes[0]}",
                   mem["emdist_ratio"], "x", mem["emdist_ratio"], "ratio",
                   "memory.emdist.flat", mem_judged, quick)
        for n in mem["dask2"]:
            add_figure(figures, f"memory.dask2.{n}", f"peak RSS dask 2w (tree) N={n}",
                       mem["dask2"][n]["peak_tree_rss_mib_sampled"], "MiB")
        if "dask2_ratio" in mem:
            add_figure(figures, "memory.dask2.flat", f"peak RSS dask 2w {sizes[1]} / {sizes[0]}",
                       mem["dask2_ratio"], "x", mem["dask2_ratio"], "ratio")
        for n, m in mem["sklearn"].items():
            add_figure(figures, f"memory.sklearn.{n}", f"peak RSS sklearn fit N={n}",
                       m.get("peak_rss_mib"), "MiB")
            if "skipped" in m:
                figures[f"memory.sklearn.{n}"]["status"] = "skipped (memory)"
        if "sklearn_ratio" in mem:
            a, b = (str(n) for n in args.sklearn_mem_frames[:2])
            add_figure(figures, "memory.sklearn.growth", f"peak RSS sklearn {b} / {a}",
                       mem["sklearn_ratio"], "x", mem["sklearn_ratio"], "ratio")
        if "sklearn_over_emdist_at" in mem:
            at = mem["sklearn_over_emdist_at"]
            add_figure(figures, "memory.sklearn_over_emdist",
                       f"peak RSS sklearn / emdist N={at['frames']}", at["ratio"], "x",
                       at["ratio"], "ratio")
    return figures


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_table(figures: dict, header: str) -> str:
    rows = [("figure", "value", "unit", "ratio", "", "target", "result")]
    for row in figures.values():
        rows.append((row["label"], _fmt(row["value"]), row["unit"], _fmt(row["ratio"]),
                     row["ratio_label"], row["target"] or "", row["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 3}
    lines = [header]
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark emdist against BLAS, scikit-learn and Dask.")
    p.add_argument("--frames", type=int, default=None,
                   help="N frames for the in-process and Dask timings (default 1000000; "
                        "100000 with --quick)")
    p.add_argument("--dim", type=int, default=FULL_DIM, help="feature dimension D (default 39)")
    p.add_argument("--diag-k", default=None, help="diagonal K values (default 64,256)")
    p.add_argument("--full-k", default=None, help="full-covariance K values (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3)")
    p.add_argument("--sklearn-iters", type=int, default=None,
                   help="iterations of each timed sklearn fit (default 2)")
    p.add_argument("--dask-k", type=int, default=None,
                   help="K of the Dask comparison (default: the largest --diag-k)")
    p.add_argument("--dask-iters", type=int, default=None,
                   help="EM iterations per engine run (default 4; 3 with --quick)")
    p.add_argument("--nj", type=int, default=8, help="shards of the engine runs (default 8)")
    p.add_argument("--mem-frames", default=None,
                   help="two emdist memory sizes (default 1000000,4000000)")
    p.add_argument("--sklearn-mem-frames", default=None,
                   help="two sklearn memory sizes (default 250000,1000000)")
    p.add_argument("--mem-k", type=int, default=None,
                   help="K of the memory runs (default: the largest --diag-k)")
    p.add_argument("--json", default="bench.json", help="JSON output file (default bench.json; "
                   "'-' for none)")
    p.add_argument("--workdir", default=None,
                   help="where the temporary data dirs go (default: the system temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one repeat: under a minute; targets not judged")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--skip-dask", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    q = args.quick
    args.frames = args.frames or (100_000 if q else FULL_N)
    args.diag_k = parse_ints(args.diag_k) if args.diag_k is not None else (
        [16, 64] if q else [64, 256])
    args.full_k = parse_ints(args.full_k) if args.full_k is not None else ([8] if q else [64])
    args.repeats = args.repeats or (1 if q else 3)
    args.sklearn_iters = args.sklearn_iters or 2
    args.dask_iters = args.dask_iters or (3 if q else 4)
    largest = max(args.diag_k) if args.diag_k else 64
    args.dask_k = args.dask_k or largest
    args.mem_k = args.mem_k or largest
    # Quick sizes 200k / 400k: the k-means sample is 200,000 frames at both (see the note
    # in the JSON), so the emdist ratio already means "flat in N" there.
    args.mem_frames = parse_ints(args.mem_frames) if args.mem_frames else (
        [200_000, 400_000] if q else list(MEM_TARGET_SIZES))
    args.sklearn_mem_frames = parse_ints(args.sklearn_mem_frames) if args.sklearn_mem_frames \
        else ([100_000, 200_000] if q else [250_000, 1_000_000])
    if args.child is None:
        if len(args.mem_frames) != 2 or len(args.sklearn_mem_frames) != 2:
            raise SystemExit("bench.py: error: --mem-frames and --sklearn-mem-frames take two "
                             "sizes each")
        if min([args.frames, args.dim, args.repeats, args.sklearn_iters, args.dask_iters,
                args.nj, *args.diag_k, *args.full_k]) < 1:
            raise SystemExit("bench.py: error: sizes, K and repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = resolve_args(build_parser().parse_args(argv))
    if args.child == "sklearn-mem":
        child_sklearn_memory(args)
        return 0
    if args.child is not None:
        raise SystemExit(f"bench.py: error: unknown --child {args.child!r}")

    import numpy as np  # noqa: F401
    from threadpoolctl import threadpool_limits

    if not args.skip_sklearn:
        import sklearn.mixture  # noqa: F401  (loads scipy's BLAS too: reported below)
    started = time.perf_counter()
    report: dict = {"schema": SCHEMA, "quick": args.quick, "environment": environment(
        [str(Path(__file__)), *argv])}
    report["environment"]["blas"] = blas_info()
    report["config"] = {k: v for k, v in vars(args).items() if k != "child"}
    report["flop_formulas"] = FLOP_FORMULAS
    blas = report["environment"]["blas"]["numpy_blas"] or {}
    log(f"BLAS {blas.get('internal_api')} {blas.get('version')}, kernel "
        f"{blas.get('architecture')}, OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")

    matmul_repeats = max(3 if args.quick else 5, args.repeats)
    with threadpool_limits(limits=1):
        log("square products")
        mm = {"threads": 1, "square_float32": _rate_square("float32", matmul_repeats),
              "square_float64": _rate_square("float64", matmul_repeats), "estep_shapes": {}}
        for cov, ks in (("diag", args.diag_k), ("full", args.full_k)):
            for k in ks:
                mm["estep_shapes"][f"{cov}_k{k}"] = estep_shape_rates(
                    cov, args.dim, k, matmul_repeats)
        report["matmul"] = mm
        sq32, sq64 = mm["square_float32"]["gflops"], mm["square_float64"]["gflops"]
        log(f"square product: f32 {sq32:.1f} GFLOP/s, f64 {sq64:.1f} GFLOP/s")
        log(f"synthetic frames: N={args.frames}, D={args.dim}")
        frames = synthetic_frames(args.frames, args.dim, "float32")
        report["in_process"] = bench_in_process(args, frames, sq32, sq64)
        del frames

    work = Path(tempfile.mkdtemp(prefix="emdist-bench-", dir=args.workdir))
    try:
        corpora: dict[int, Path] = {}
        report["corpora"] = {}

        def corpus(n: int) -> Path:
            if n not in corpora:
                corpora[n] = work / f"data-{n}"
                log(f"writing a Kaldi data dir of {n} frames")
                report["corpora"][str(n)] = {"seconds": write_corpus(corpora[n], n, args.dim)}
            return corpora[n]

        if not args.skip_dask:
            report["dask"] = bench_dask(args, corpus(args.frames))
        if not args.skip_memory:
            for n in args.mem_frames:
                corpus(n)
            report["memory"] = bench_memory(args, corpora, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report["environment"]["loadavg_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.perf_counter() - started
    report["figures"] = build_figures(args, report)
    blas = report["environment"]["blas"]["numpy_blas"] or {}
    header = (
        f"emdist bench: N={args.frames:,} D={args.dim} threads=1 repeats={args.repeats}"
        f"{' (quick)' if args.quick else ''}; BLAS {blas.get('internal_api')} "
        f"{blas.get('version')} kernel {blas.get('architecture')} (OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', 'unset')}); CPU "
        f"{report['environment']['cpu'].get('model')}, {report['environment']['cpus_available']}"
        f" cpus; load {report['environment']['loadavg_start'][0]:.2f} -> "
        f"{report['environment']['loadavg_end'][0]:.2f}\n"
        f"useful FLOPs/iteration: diag {FLOP_FORMULAS['diag']}; full {FLOP_FORMULAS['full']}\n"
        f"sklearn per iteration: {SKLEARN_METHOD.format(r=args.sklearn_iters)}\n"
        f"elapsed {report['elapsed_s']:.0f} s"
    )
    table = format_table(report["figures"], header)
    report["table"] = table.splitlines()
    text = json.dumps(report, indent=1, default=float)
    print(text)
    print()
    print(table)
    if args.json and args.json != "-":
        Path(args.json).write_text(text + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
