"""Scale check: train a UBM on a large synthetic corpus, streamed, and check what it learnt.

    python scripts/scale_run.py WORK_DIR [--frames 20000000] [--num-gauss 8] [--workers 2]

1. writes a synthetic Kaldi data dir of ``--frames`` frames from a known GMM with
   ``scripts/make_corpus.py`` (skipped when WORK_DIR/data already holds one of that size);
2. runs ``emdist train DATA EXP --global --feature-cache none --workers N`` as a
   subprocess, sampling the resident memory of the driver and of every worker process
   (psutil) every 0.2 s;
3. matches the trained components to the generating ones (Hungarian assignment on the
   mean distances) and reports the largest mean error in units of the true standard
   deviation, and the largest weight error.

Prints a summary and writes WORK_DIR/scale_run.json. Exit status 1 when a check fails
(peak worker memory over --max-worker-rss-gib, or a mean off by more than --mean-tol σ).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


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


def _match(true_means, true_vars, means):
    from scipy.optimize import linear_sum_assignment

    cost = ((true_means[:, None, :] - means[None, :, :]) ** 2 / true_vars[:, None, :]).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return rows, cols


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--frames", type=int, default=20_000_000)
    ap.add_argument("--num-gauss", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-iters", type=int, default=10)
    ap.add_argument("--nj", type=int, default=16)
    ap.add_argument("--max-worker-rss-gib", type=float, default=1.0)
    ap.add_argument("--mean-tol", type=float, default=0.05)
    args = ap.parse_args(argv)

    data, exp = args.work_dir / "data", args.work_dir / "exp"
    truth_path = data / "truth.json"
    if not truth_path.exists() or json.loads(truth_path.read_text())["frames"] != args.frames:
        subprocess.run([sys.executable, str(HERE / "make_corpus.py"), str(data), "--frames",
                        str(args.frames), "--num-gauss", str(args.num_gauss), "--overwrite"],
                       check=True)
    cmd = ["emdist", "train", str(data), str(exp), "--global", "--feature-cache", "none",
           "--workers", str(args.workers), "--num-gauss", str(args.num_gauss), "--cov", "diag",
           "--num-iters", str(args.num_iters), "--nj", str(args.nj), "--init", "kmeans",
           "--kmeans-iters", "3", "--overwrite"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    root_pid = proc.pid
    code, peaks = _peak_rss(proc)
    seconds = time.time() - t0
    if code != 0:
        print(f"emdist train failed with exit status {code}", file=sys.stderr)
        return 1

    import emdist

    truth = json.loads(truth_path.read_text())["models"]["global"]
    model = emdist.load_models(exp / "final.mdl")["global"]
    t_means, t_vars = np.array(truth["means"]), np.array(truth["covariances"])
    rows, cols = _match(t_means, t_vars, model.means)
    mean_err = np.abs(model.means[cols] - t_means[rows]) / np.sqrt(t_vars[rows])
    weight_err = np.abs(model.weights[cols] - np.array(truth["weights"])[rows])
    var_err = np.abs(model.covariances[cols] / t_vars[rows] - 1.0)
    driver_pid = root_pid
    worker_peaks = sorted((rss for pid, rss in peaks.items() if pid != driver_pid),
                          reverse=True)[: args.workers]
    report = {
        "command": " ".join(cmd),
        "frames": args.frames,
        "seconds": round(seconds, 1),
        "driver_peak_rss_mib": round(peaks[driver_pid] / 2**20, 1),
        "worker_peak_rss_mib": [round(r / 2**20, 1) for r in worker_peaks],
        "max_mean_error_sigma": float(mean_err.max()),
        "max_weight_error": float(weight_err.max()),
        "max_variance_relative_error": float(var_err.max()),
        "n_components": model.n_components,
    }
    (args.work_dir / "scale_run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = max(worker_peaks, default=0) < args.max_worker_rss_gib * 2**30
    ok &= report["max_mean_error_sigma"] < args.mean_tol
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
