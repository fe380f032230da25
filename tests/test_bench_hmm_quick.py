"""Smoke test of scripts/bench_hmm.py: the quick mode runs and writes the figures it promises.

Timings are not judged (the machine may be busy): only that every figure is there and
positive, and that emdist, on the no-exit copy of its model that hmmlearn holds, scores the
same as hmmlearn (the same data and the same model were compared).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hmmlearn")

REPO = Path(__file__).resolve().parent.parent
BENCH_HMM = REPO / "scripts" / "bench_hmm.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_hmm")
    out = tmp / "bench-hmm.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_HMM), "--quick", "--json", str(out), "--workdir", str(tmp)],
        cwd=tmp, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def _positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _check_timing(entry: dict, repeats: int) -> None:
    assert len(entry["seconds"]) >= repeats
    assert all(_positive(s) for s in entry["seconds"]), entry
    assert _positive(entry["best"]) and _positive(entry["median"])
    assert entry["best"] <= entry["median"]


@pytest.mark.timeout(150)
def test_quick_mode_writes_every_figure(quick):
    report, stdout = quick
    assert report["schema"] == "emdist-bench-hmm/1"
    assert report["quick"] is True
    env = report["environment"]
    assert env["cpu"]["model"] and env["cpu"]["family"]
    assert env["blas"]["numpy_blas"]["internal_api"]
    assert env["command"][1].endswith("bench_hmm.py") and "--quick" in env["command"]
    cfg = report["config"]
    assert (cfg["states"], cfg["gauss"], cfg["repeats"]) == ([3], [1], 1)
    [result] = report["results"]  # the digits, S = 3, K = 1
    assert (result["states"], result["gauss"], result["k_total"]) == (3, 1, 3)
    assert result["frames"] > 0 and result["utts"] > 0
    for key in ("emdist_hmm", "emdist_gmm"):
        _check_timing(result[key], cfg["repeats"])
        assert _positive(result[key]["frames_per_s"])
        assert result[key]["frames"] == result["frames"]
    hl = result["hmmlearn"]
    assert hl["whole_corpus"] is True and hl["scaled_by"] == 1.0
    assert set(hl["implementations"]) == {"log", "scaling"}
    assert hl["faster"] in hl["implementations"]
    for impl in hl["implementations"].values():
        _check_timing(impl, cfg["hmmlearn_repeats"])
        assert _positive(impl["scaled_best"]) and _positive(impl["frames_per_s"])
    for runs in result["cli"].values():
        for model in ("hmm", "gmm"):
            assert len(runs[model]["iteration_seconds"]) == cfg["train_iters"]
            assert _positive(runs[model]["median"])
        assert _positive(runs["hmm_over_gmm"])
    assert set(result["cli"]) == {"workers0"}
    for key in ("hmm_over_gmm", "hmmlearn_over_emdist", "hmmlearn_log_over_emdist",
                "hmmlearn_scaling_over_emdist", "cli_workers0_hmm_over_gmm"):
        assert _positive(result["ratios"][key]), key
    assert report["elapsed_s"] > 0
    assert "hmmlearn/emdist" in stdout and "HMM/GMM" in stdout


@pytest.mark.timeout(150)
def test_quick_mode_compares_the_same_model(quick):
    report, _ = quick
    check = report["results"][0]["hmmlearn"]["loglike_check"]
    assert check["no_exit_rel_diff"] < 1e-9, check  # same frames, same (no-exit) model
    assert check["implementations_rel_diff"] < 1e-9, check
    assert abs(check["with_exit_minus_hmmlearn_per_frame"]) < 1.0, check  # the exit only
