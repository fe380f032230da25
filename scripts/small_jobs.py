#!/usr/bin/env python
"""Wall time of the mission's small job, ``emdist train`` on the bundled digits, with
``--workers 0`` (in process) and with embedded clusters, as a user runs it.

    python scripts/small_jobs.py [--workers 0 2 8] [--repeats 6] [--json out.json]
        [-- EXTRA TRAIN OPTIONS]

Each repeat runs every ``--workers`` value once, in turn (interleaved, so that a change of the
machine's load hits all alike), as a subprocess of the console script into a fresh exp dir,
and times it from start to exit. Prints one JSON object: per value the wall times, their
median and its ratio to the median of ``--workers 0``, whether every final.mdl had the bytes
of the in-process one, and the targets of issue 9 (point 6: ``--workers 2`` at most 1.2x,
``--workers 8`` at most 2.0x the in-process wall time). Extra options after ``--`` go to
every run (``-- --short-pass 0`` times clusters that take every pass).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dask_overhead import _cores, _cpu_model  # noqa: E402  (a sibling script)

TARGETS = {2: 1.2, 8: 2.0}


def _emdist() -> list[str]:
    script = shutil.which("emdist", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "emdist.cli"]


def time_small_jobs(workers=(0, 2, 8), repeats: int = 6, extra: list[str] | None = None,
                    workdir: str | None = None) -> dict:
    """Time the digits job ``repeats`` times per ``--workers`` value, interleaved."""
    if 0 not in workers:
        workers = (0, *workers)
    walls: dict[int, list[float]] = {w: [] for w in workers}
    same = True
    from emdist.corpora import digits_dir

    data = str(digits_dir("train"))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for r in range(repeats):
            reference = None
            for w in workers:
                exp = Path(tmp) / f"exp-w{w}-r{r}"
                cmd = [*_emdist(), "train", data, str(exp), "--workers", str(w), "-q",
                       *(extra or [])]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                walls[w].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
                final = (exp / "final.mdl").read_bytes()
                reference = final if reference is None else reference
                same = same and final == reference
                shutil.rmtree(exp)
    serial = statistics.median(walls[0])
    result = {
        "command": " ".join(["emdist train DIGITS_TRAIN EXP --workers W -q", *(extra or [])]),
        "cpu": _cpu_model(),
        "cores": _cores(),
        "repeats": repeats,
        "same_bytes": same,
        "workers": {},
    }
    for w in workers:
        median = statistics.median(walls[w])
        row = {"walls_s": [round(x, 3) for x in walls[w]], "median_s": round(median, 3),
               "ratio": round(median / serial, 3)}
        if w in TARGETS:
            row["target"] = f"<= {TARGETS[w]}"
            row["met"] = median / serial <= TARGETS[w]
        result["workers"][str(w)] = row
    return result


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = time_small_jobs(tuple(args.workers), args.repeats, extra)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
