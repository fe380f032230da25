"""Convergence: the per-frame log-likelihood monitor and early stopping with --tol."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import write_data_dir

from emdist.backends.serial import SerialBackend
from emdist.data.datadir import load_data_dir
from emdist.engine import ConvergenceMonitor, LikelihoodDecreaseWarning, TrainConfig, train
from emdist.io.expdir import ExpDir


def test_monitor_warns_on_a_real_decrease_only():
    monitor = ConvergenceMonitor(tol=0.0, rtol_decrease=1e-6)
    monitor.report(-60.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.report(-60.0 - 1e-5)  # 1.7e-7 relative: rounding, no warning
    with pytest.warns(LikelihoodDecreaseWarning, match="decreased"):
        monitor.report(-60.1)


def test_monitor_says_converged_when_the_change_is_below_tol():
    monitor = ConvergenceMonitor(tol=1e-3)
    assert not monitor.report(-70.0)
    assert not monitor.report(-69.0)
    assert monitor.report(-68.9995)


@pytest.mark.timeout(60)
def test_training_stops_at_tol_and_a_rerun_keeps_the_result(tmp_path):
    data = load_data_dir(write_data_dir(tmp_path / "data"))
    config = TrainConfig(num_gauss=2, covariance_type="diag", num_iters=50, init="kmeans",
                         kmeans_iters=2, nj=2, tol=1e-3)
    exp = ExpDir(tmp_path / "exp")
    train(data, config, SerialBackend(), exp)
    records = [json.loads(line) for line in exp.metrics_path.read_text().splitlines()]
    last = records[-1]["iter"]
    assert last < 50
    assert abs(records[-1]["loglike_per_frame"] - records[-2]["loglike_per_frame"]) < 1e-3
    assert all(abs(b["loglike_per_frame"] - a["loglike_per_frame"]) >= 1e-3
               for a, b in zip(records[:-2], records[1:-1], strict=True))
    assert exp.final.read_bytes() == exp.model_path(last).read_bytes()
    assert exp.model_numbers()[-1] == last
    # a killed run that had converged but not written final.mdl stops at the same model
    exp.final.unlink()
    train(data, config, SerialBackend(), exp)
    assert exp.model_numbers()[-1] == last
    assert exp.final.read_bytes() == exp.model_path(last).read_bytes()
