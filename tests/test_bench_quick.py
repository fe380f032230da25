"""Smoke test of scripts/bench.py: the quick mode runs and writes the figures it promises.

Timings are not judged here (the machine may be busy); only that every figure is there,
positive and finite, that targets are not judged in quick mode, and that emdist and
scikit-learn start from the same initial model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
MAKE_CORPUS = REPO / "scripts" / "make_corpus.py"

# Quick mode: diagonal K = 16, 64 and full K = 8; the Dask comparison at the largest K.
EXPECTED = [
    "matmul.square_f32",
    "matmul.square_f64",
    "matmul.estep.diag_k64.loglike",
    "matmul.estep.diag_k64.stats",
    "matmul.estep.full_k8.loglike",
    "emdist.diag_k16.f32.s_per_iter",
    "emdist.diag_k64.f32",
    "emdist.diag_k64.f64",
    "emdist.full_k8.f32",
    "sklearn.diag_k16",
    "sklearn.diag_k64",
    "sklearn.full_k8",
    "dask.serial",
    "dask.w1",
    "dask.w2",
]


def _load_bench():
    spec = importlib.util.spec_from_file_location("emdist_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(200)
def test_quick_mode_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--skip-memory", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "emdist-bench/1"
    assert report["quick"] is True
    figures = report["figures"]
    missing = [key for key in EXPECTED if key not in figures]
    assert not missing, f"missing figures {missing}; have {sorted(figures)}"
    for key, row in figures.items():
        if row["status"] == "skipped (memory)":  # sklearn on a machine short of memory
            continue
        assert math.isfinite(row["value"]) and row["value"] > 0, (key, row)
        if row["target"] is not None:
            assert row["status"] == "n/a (quick)", (key, row)
    for key in ("emdist.diag_k64.f32", "dask.w1", "dask.w2"):  # the targets quick mode has
        assert figures[key]["target"] is not None
        assert math.isfinite(figures[key]["ratio"])

    # Same data, same initial model: both compute the same log-likelihood before iterating.
    for name, entry in report["in_process"].items():
        if "skipped" in entry["sklearn"]:
            continue
        check = entry["sklearn"]["loglike_check"]
        assert check["abs_diff"] <= 1e-6 * abs(check["emdist_f64_per_frame"]), (name, check)
        assert len(entry["emdist_f32"]["seconds"]) == report["config"]["repeats"]

    env = report["environment"]
    assert env["blas"]["numpy_blas"]["internal_api"]
    assert "OPENBLAS_CORETYPE" in env
    assert env["cpu"]["model"]
    assert report["flop_formulas"]["diag"].startswith("8*N*D*K")
    assert report["flop_formulas"]["full"].startswith("4*N*D^2*K")
    runs = report["dask"]["runs"]
    assert runs["serial"]["loglike_per_frame"] == pytest.approx(
        runs["w2"]["loglike_per_frame"], rel=1e-9)
    # The table is printed after the JSON, one row per figure.
    assert "n/a (quick)" in done.stdout
    assert done.stdout.count("\n") > len(figures)


def test_memory_probe_measures_a_small_run(tmp_path):
    """The peak-memory path (CLI in a child process, VmHWM, tree sampling) on a tiny corpus."""
    bench = _load_bench()
    data = tmp_path / "data"
    bench.write_corpus(data, 3000, 5)
    result = bench.measure_emdist(data, tmp_path, 4, 0, "probe")
    assert result["peak_rss_mib"] > 10
    assert result["peak_tree_rss_mib_sampled"] >= 0
    assert (tmp_path / "exp-probe" / "final.mdl").is_file()
