"""Cluster-grade runs: remote schedulers, worker and driver kills, determinism across
workers and cache modes. Real processes on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import digits_subset, kill_driver_after

from emdist.backends.dask_backend import DaskBackend
from emdist.backends.serial import SerialBackend
from emdist.data.datadir import load_data_dir
from emdist.engine import TrainConfig, train
from emdist.io.expdir import ExpDir

BIN = Path(sys.executable).parent
DASK = shutil.which("dask", path=str(BIN)) or shutil.which("dask")
EMDIST = shutil.which("emdist", path=str(BIN)) or shutil.which("emdist")
CONFIG = TrainConfig(num_gauss=3, covariance_type="diag", num_iters=3, nj=5, init="kmeans",
                     kmeans_iters=2)
TRAIN_OPTS = ["--num-gauss", "3", "--cov", "diag", "--num-iters", "3", "--nj", "5",
              "--init", "kmeans", "--kmeans-iters", "2", "--quiet"]


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return digits_subset(tmp_path_factory.mktemp("data") / "train", "train", 4)


@pytest.fixture(scope="module")
def serial_bytes(subset, tmp_path_factory) -> bytes:
    exp = ExpDir(tmp_path_factory.mktemp("serial") / "exp")
    train(load_data_dir(subset), CONFIG, SerialBackend(), exp)
    return exp.final.read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emdist(*args, timeout=240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([EMDIST, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def _stop(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


class _Cluster(tuple):
    """(address, scheduler file), with ``procs``: the scheduler's and the workers'
    processes (each the leader of its own process group)."""

    procs: list


@pytest.fixture()
def remote_cluster(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes on loopback."""
    sched_file = tmp_path / "scheduler.json"
    port = _free_port()
    common = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                  stdin=subprocess.DEVNULL, start_new_session=True)
    procs = [subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)], **common)]
    try:
        for name in ("w1", "w2"):
            procs.append(subprocess.Popen(
                [DASK, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                 "--name", name, "--host", "127.0.0.1", "--no-dashboard"], **common))
        cluster = _Cluster((f"tcp://127.0.0.1:{port}", sched_file))
        cluster.procs = procs
        yield cluster
    finally:
        _stop(procs)


@pytest.mark.timeout(240)
def test_remote_scheduler_gives_the_embedded_cluster_bytes(subset, serial_bytes, tmp_path,
                                                           remote_cluster):
    address, sched_file = remote_cluster
    remote = _emdist("train", subset, tmp_path / "remote", "--scheduler", address,
                     "--wait-workers", "2", "--wait-timeout", "60", *TRAIN_OPTS)
    assert remote.returncode == 0, remote.stderr
    by_file = _emdist("train", subset, tmp_path / "file", "--scheduler-file", sched_file,
                      "--wait-workers", "2", *TRAIN_OPTS)
    assert by_file.returncode == 0, by_file.stderr
    local = _emdist("train", subset, tmp_path / "local", "--workers", "2", "--short-pass", "0",
                    *TRAIN_OPTS)
    assert local.returncode == 0, local.stderr
    final = (tmp_path / "local" / "final.mdl").read_bytes()
    assert (tmp_path / "remote" / "final.mdl").read_bytes() == final
    assert (tmp_path / "file" / "final.mdl").read_bytes() == final
    assert final == serial_bytes


def _one_runtime_error(res: subprocess.CompletedProcess) -> str:
    """The one error line of a run that failed at run time (exit 1, no traceback)."""
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("emdist: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["address", "scheduler-file"])
def test_refused_connection_fails_within_5_s_whatever_the_wait_timeout(subset, tmp_path, how):
    """A refused connection is final (issue 12): no waiting for --wait-timeout."""
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    if how == "address":
        option = ["--scheduler", address]
    else:
        sched_file = tmp_path / "scheduler.json"
        sched_file.write_text(json.dumps({"address": address}))
        option = ["--scheduler-file", sched_file]
    t0 = time.monotonic()
    res = _emdist("train", subset, tmp_path / "exp", *option, "--wait-timeout", "60",
                  timeout=50)
    assert time.monotonic() - t0 < 5 + 3  # 3 s of refusals tolerated, plus start-up
    assert "connection refused" in _one_runtime_error(res)
    assert not (tmp_path / "exp" / "0.mdl").exists()


@pytest.mark.timeout(60)
def test_a_scheduler_that_does_not_answer_is_waited_for_wait_timeout(subset, tmp_path):
    """Something listens but never speaks Dask: wait --wait-timeout, then one error line."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel's backlog, never answered
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        res = _emdist("train", subset, tmp_path / "exp", "--scheduler",
                      f"tcp://127.0.0.1:{port}", "--wait-timeout", "4", timeout=50)
        waited = time.monotonic() - t0
    assert 4 <= waited < 30
    error = _one_runtime_error(res)
    assert "cannot reach the Dask scheduler" in error and "refused" not in error


@pytest.mark.timeout(60)
def test_scheduler_and_workers_options_are_exclusive(subset, tmp_path):
    res = _emdist("train", subset, tmp_path / "exp", "--scheduler", "tcp://127.0.0.1:1",
                  "--workers", "2")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n_workers", [1, 3])
def test_bytes_equal_across_worker_counts_and_cache_modes(subset, serial_bytes, tmp_path,
                                                          n_workers):
    backend = DaskBackend.local(n_workers, processes=False)
    try:
        for cache in ("memory", "none"):
            exp = ExpDir(tmp_path / f"{cache}")
            train(load_data_dir(subset), CONFIG, backend, exp, feature_cache=cache)
            assert exp.final.read_bytes() == serial_bytes, cache
    finally:
        backend.close()


class KillOnce:
    """A progress sink that SIGKILLs a worker process once a pass of ``stage`` is under way."""

    def __init__(self, pid: int, stage: str) -> None:
        self.pid, self.stage, self.killed, self._title = pid, stage, False, ""

    def start(self, title: str, n_jobs: int, n_frames: int) -> None:
        self._title = title

    def advance(self, n_frames: int) -> None:
        if not self.killed and self._title == self.stage:
            os.kill(self.pid, signal.SIGKILL)
            self.killed = True

    def finish(self) -> None:
        pass


@pytest.mark.timeout(240)
def test_worker_killed_mid_iteration_costs_time_not_results(subset, serial_bytes, tmp_path):
    backend = DaskBackend.local(2, processes=True)
    try:
        pids = sorted(backend.client.run(os.getpid).values())
        killer = KillOnce(pids[0], "acc 1")
        exp = ExpDir(tmp_path / "exp")
        train(load_data_dir(subset), CONFIG, backend, exp, feature_cache="memory",
              progress=killer)
        assert killer.killed
        assert exp.final.read_bytes() == serial_bytes
    finally:
        backend.close()


GSELECT = TrainConfig(num_gauss=8, covariance_type="diag", num_iters=3, nj=5, init="kmeans",
                      kmeans_iters=2, global_mode=True, gselect=3)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_worker_holding_selections_killed_costs_time_not_results(subset, tmp_path, cache):
    """Gaussian selections kept on a worker that dies are recomputed from their lineage."""
    serial = ExpDir(tmp_path / "serial")
    train(load_data_dir(subset), GSELECT, SerialBackend(), serial)
    backend = DaskBackend.local(2, processes=True)
    try:
        pids = sorted(backend.client.run(os.getpid).values())
        killer = KillOnce(pids[0], "acc 1")
        exp = ExpDir(tmp_path / "exp")
        train(load_data_dir(subset), GSELECT, backend, exp, feature_cache=cache,
              progress=killer)
        assert killer.killed
        assert exp.final.read_bytes() == serial.final.read_bytes()
    finally:
        backend.close()


@pytest.mark.timeout(300)
def test_driver_killed_then_rerun_resumes_to_the_same_bytes(tmp_path):
    data = digits_subset(tmp_path / "data", "train", 8)
    opts = ["--workers", "0", "--num-gauss", "3", "--cov", "diag", "--num-iters", "80",
            "--nj", "4", "--init", "kmeans", "--kmeans-iters", "2", "--quiet"]
    whole = _emdist("train", data, tmp_path / "whole", *opts)
    assert whole.returncode == 0, whole.stderr
    exp = tmp_path / "killed"
    kill_driver_after(["train", data, exp, *opts], exp)
    resumed = _emdist("train", data, exp, *opts[:-1])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert (exp / "final.mdl").read_bytes() == (tmp_path / "whole" / "final.mdl").read_bytes()
    # a temporary file left by the kill is swept; no half-written model stays behind
    assert not list(exp.rglob("*.tmp"))


@pytest.mark.timeout(120)
def test_changed_options_are_refused_unless_overwrite(subset, tmp_path):
    exp = tmp_path / "exp"
    assert _emdist("train", subset, exp, "--workers", "0", *TRAIN_OPTS).returncode == 0
    other = _emdist("train", subset, exp, "--workers", "0", *TRAIN_OPTS, "--seed", "1")
    assert other.returncode == 2
    assert "other training options" in other.stderr and "seed" in other.stderr
    forced = _emdist("train", subset, exp, "--workers", "0", *TRAIN_OPTS, "--seed", "1",
                     "--overwrite")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.timeout(120)
def test_stage_restarts_from_a_model_and_recomputes_the_same_bytes(subset, tmp_path):
    exp = tmp_path / "exp"
    assert _emdist("train", subset, exp, "--workers", "0", *TRAIN_OPTS).returncode == 0
    final = (exp / "final.mdl").read_bytes()
    again = _emdist("train", subset, exp, "--workers", "0", *TRAIN_OPTS, "--stage", "1")
    assert again.returncode == 0, again.stderr
    assert (exp / "final.mdl").read_bytes() == final


# -- a cluster that goes away mid-run (issue 12, point 4) ----------------------------------


def _run_until_model(args: list, exp: Path, model: str = "1.mdl") -> subprocess.Popen:
    proc = subprocess.Popen([EMDIST, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (exp / model).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc


@pytest.mark.timeout(180)
@pytest.mark.parametrize("what", ["scheduler", "workers"])
def test_a_cluster_lost_mid_run_fails_within_wait_timeout_naming_the_last_model(
        subset, tmp_path, remote_cluster, what):
    """The scheduler, or every worker (nanny and all), is killed after 1.mdl: with nothing
    coming back, the run ends with exit 1 within --wait-timeout, in one line naming the
    scheduler and the last complete model, which is intact."""
    address, _ = remote_cluster
    exp = tmp_path / "exp"
    slow = ["--num-iters", "200", "--num-gauss", "8", "--cov", "full", "--nj", "5", "--quiet"]
    proc = _run_until_model(["train", subset, exp, "--scheduler", address, "--wait-workers",
                             "2", "--wait-timeout", "5", *slow], exp)
    victims = remote_cluster.procs[:1] if what == "scheduler" else remote_cluster.procs[1:]
    for victim in victims:  # the worker's nanny too: nothing restarts it
        os.killpg(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    res = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = _one_runtime_error(res)
    assert "127.0.0.1" in line and "--wait-timeout" in line
    last = max(int(p.stem) for p in exp.glob("[0-9]*.mdl"))
    assert f"the last complete model, {exp / f'{last}.mdl'}, is intact" in line
    assert took < 5 + 20, (took, err)  # the wait, plus detection and shutdown
    from emdist.io.modelio import load_models

    load_models(exp / f"{last}.mdl")  # intact
    assert not list(exp.glob(".*.tmp"))
