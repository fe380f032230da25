"""Scale check: train a UBM on a large corpus on disk, streamed, and report what it cost.

    python scripts/scale_run.py WORK_DIR [--corpus real|synthetic] [--frames 50000000]
        [--num-gauss 1024] [--gselect 30] [--workers 2] [--nj 64] [--num-iters 5]

1. writes the corpus into WORK_DIR/data unless one of that size is there: ``real`` (the
   default) tiles the bundled digits' real MFCC with seeded noise
   (``scripts/make_real_corpus.py``); ``synthetic`` samples a known GMM
   (``scripts/make_corpus.py``), whose components the trained model is matched against;
2. runs ``emdist train DATA EXP --global --feature-cache none --workers N ...`` as a
   subprocess, sampling the resident memory of the driver and of every worker process
   (psutil, every 0.2 s);
3. reads the run's own records (``metrics.jsonl``; the init and selection times from its
   log) and reports total, initialisation, Gaussian-selection and per-iteration times, the
   peak RSS of the driver and of each worker, and, from the measured cost per frame and
   worker, the time 1,000 hours of speech (100 frames a second: 3.6e8 frames) would take on
   N workers of this kind.

Writes WORK_DIR/scale_run.json and prints it. Exit status 1 when a check fails: a worker's
peak RSS over --max-worker-rss-gib, or (synthetic) a mean off by more than --mean-tol σ.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FRAMES_PER_HOUR = 360_000  # 10 ms frames
ESTIMATE_WORKERS = (2, 16, 64, 256)


def _peak_rss(proc: subprocess.Popen, interval: float = 0.2) -> tuple[int, dict[int, int]]:
    """Wait for ``proc``; return its exit code and the peak RSS of each descendant."""
    import psutil

    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        time.sleep(interval)
    return proc.wait(), peaks


def make_data(args) -> Path:
    data = args.work_dir / "data"
    info = data / ("source.json" if args.corpus == "real" else "truth.json")
    if info.exists() and json.loads(info.read_text())["frames"] >= args.frames:
        return data
    script = "make_real_corpus.py" if args.corpus == "real" else "make_corpus.py"
    extra = [] if args.corpus == "real" else ["--num-gauss", "8"]
    subprocess.run([sys.executable, str(HERE / script), str(data), "--frames", str(args.frames),
                    "--overwrite", *extra], check=True)
    return data


def train_command(args, data: Path, exp: Path) -> list[str]:
    cmd = ["emdist", "train", str(data), str(exp), "--global", "--feature-cache", "none",
           "--workers", str(args.workers), "--num-gauss", str(args.num_gauss), "--cov", "diag",
           "--num-iters", str(args.num_iters), "--nj", str(args.nj), "--init", "kmeans",
           "--kmeans-iters", str(args.kmeans_iters), "--overwrite"]
    if args.gselect:
        cmd += ["--gselect", str(args.gselect)]
    return cmd


def timings(exp: Path, log_text: str) -> dict:
    """Init, selection and per-iteration seconds from the run's records and log."""
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    init = re.search(r"initial model \(\w+\) in ([\d.]+) s", log_text)
    select = re.search(r"Gaussian selection: .* in ([\d.]+) s", log_text)
    seconds = [r["seconds"] for r in records]
    return {
        "init_seconds": float(init.group(1)) if init else None,
        "selection_seconds": float(select.group(1)) if select else None,
        "iteration_seconds": seconds,
        "median_iteration_seconds": float(np.median(seconds[1:] or seconds)),
        "loglike_per_frame": [r["loglike_per_frame"] for r in records],
    }


def estimate(report: dict, frames: int, workers: int) -> dict:
    """Minutes for 1,000 hours of speech on N workers, from the cost per frame and worker."""
    per_frame = {k: report[k] * workers / frames
                 for k in ("init_seconds", "selection_seconds", "median_iteration_seconds")
                 if report.get(k)}
    total = FRAMES_PER_HOUR * 1000
    out = {}
    for n in ESTIMATE_WORKERS:
        minutes = {k.replace("_seconds", ""): round(v * total / n / 60, 1)
                   for k, v in per_frame.items()}
        out[f"{n} workers"] = minutes
    return {"frames": total, "minutes_per_stage": out,
            "note": "cost per frame and worker measured here, scaled linearly; iteration is "
                    "per EM iteration"}


def synthetic_check(data: Path, exp: Path) -> dict:
    from scipy.optimize import linear_sum_assignment

    import emdist

    truth = json.loads((data / "truth.json").read_text())["models"]["global"]
    model = emdist.load_models(exp / "final.mdl")["global"]
    t_means, t_vars = np.array(truth["means"]), np.array(truth["covariances"])
    cost = ((t_means[:, None, :] - model.means[None, :, :]) ** 2 / t_vars[:, None, :]).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return {
        "max_mean_error_sigma": float((np.abs(model.means[cols] - t_means[rows])
                                       / np.sqrt(t_vars[rows])).max()),
        "max_weight_error": float(np.abs(model.weights[cols]
                                         - np.array(truth["weights"])[rows]).max()),
        "max_variance_relative_error": float(np.abs(model.covariances[cols]
                                                    / t_vars[rows] - 1).max()),
    }


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--corpus", choices=("real", "synthetic"), default="real")
    ap.add_argument("--frames", type=int, default=50_000_000)
    ap.add_argument("--num-gauss", type=int, default=1024)
    ap.add_argument("--gselect", type=int, default=30, help="0: exact EM")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-iters", type=int, default=5)
    ap.add_argument("--kmeans-iters", type=int, default=3)
    ap.add_argument("--nj", type=int, default=64)
    ap.add_argument("--max-worker-rss-gib", type=float, default=4.0)
    ap.add_argument("--mean-tol", type=float, default=0.05, help="synthetic corpus only")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data, exp = make_data(args), args.work_dir / "exp"
    cmd = train_command(args, data, exp)
    print("$", " ".join(cmd), flush=True)
    log_path = args.work_dir / "train.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stderr=log)
        code, peaks = _peak_rss(proc)
    seconds = time.time() - t0
    if code != 0:
        print(f"emdist train failed with exit status {code}; see {log_path}", file=sys.stderr)
        return 1
    frames = json.loads((exp / "metrics.jsonl").read_text().splitlines()[0])["frames"]
    worker_peaks = sorted((rss for pid, rss in peaks.items() if pid != proc.pid),
                          reverse=True)[: args.workers]
    report = {"command": " ".join(cmd), "frames": frames, "seconds": round(seconds, 1),
              **timings(exp, log_path.read_text()),
              "driver_peak_rss_mib": round(peaks[proc.pid] / 2**20, 1),
              "worker_peak_rss_mib": [round(r / 2**20, 1) for r in worker_peaks],
              "n_components": json.loads((exp / "metrics.jsonl").read_text().splitlines()[-1])
              ["n_components"]["global"]}
    report["estimate_1000_hours"] = estimate(report, frames, args.workers)
    ok = max(worker_peaks, default=0) < args.max_worker_rss_gib * 2**30
    if args.corpus == "synthetic":
        report.update(synthetic_check(data, exp))
        ok &= report["max_mean_error_sigma"] < args.mean_tol
    (args.work_dir / "scale_run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
