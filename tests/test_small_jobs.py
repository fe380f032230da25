"""Small jobs on an embedded cluster (issue 9, point 6): what the changes that make them fast
must not break. No timings are asserted here, only behaviour.

What is proved: a bad data dir exits 2 in one line and leaves no process behind (the fork
server of the workers starts before the data dir is read), a failed cluster start is one
error line; ``--workers`` beyond the CPU cores says so in one warning line, once, and gives
the serial bytes; passes that keep their results until the next pass's tasks are sent,
and passes that do not, give the serial tree's bits; a pass whose scattered model died
with its only worker is redone; each ``cache()`` has its own keys. Where passes run
(:class:`StartingCluster`): short passes of a small corpus never start the cluster; a long
one starts it and the workers take over once up, with the serial bytes at every iteration;
``--short-pass 0`` and ``--dashboard-address`` run every pass on the workers; a large corpus
waits for them; cached shards paired with per-shard arguments become the copies where the
pass runs; a failed start is the error of the pass that needs the cluster.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import digits_subset, emdist_command, model_bytes, write_data_dir
from typer.testing import CliRunner

import emdist.backends.dask_backend as dask_backend
import emdist.cli as cli
import emdist.tasks as tasks
from emdist.backends import starting
from emdist.backends.dask_backend import DaskBackend
from emdist.backends.serial import SerialBackend
from emdist.backends.starting import StartingCluster
from emdist.data.datadir import load_data_dir
from emdist.engine import TrainConfig, make_shards, train
from emdist.errors import EmdistError, RuntimeFailure
from emdist.io.expdir import ExpDir
from emdist.models.estep import EStepOptions
from emdist.tasks import acc_shard

psutil = pytest.importorskip("psutil")

TINY = ["--num-gauss", "2", "--cov", "diag", "--num-iters", "2", "--init", "kmeans",
        "--kmeans-iters", "1", "--nj", "3"]


pytestmark = pytest.mark.usefixtures("restore_logging")


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("small") / "train", seed=0)


# -- starting the embedded cluster -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_bad_data_dir_starts_no_cluster(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(cli, "_backend", lambda *args: started.append(args))
    result = invoke("train", tmp_path / "no-such-dir", tmp_path / "exp", "--workers", "2")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("emdist: error:") and "no-such-dir" in result.stderr
    assert started == []


@pytest.mark.timeout(30)
def test_a_failed_cluster_start_is_one_error_line(monkeypatch, data_dir, tmp_path):
    def unreachable(*args):
        raise RuntimeFailure("the cluster did not start")

    monkeypatch.setattr(cli, "_backend", unreachable)
    result = invoke("train", data_dir, tmp_path / "exp", "--workers", "2", *TINY)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["emdist: error: the cluster did not start"]
    assert not (tmp_path / "exp" / "0.mdl").exists()


def _session_processes(sid: int) -> list:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


@pytest.mark.timeout(60)
def test_bad_data_dir_with_real_workers_exits_2_and_leaves_no_process(tmp_path):
    proc = subprocess.Popen(
        [*emdist_command(), "train", str(tmp_path / "no-such-dir"), str(tmp_path / "exp"),
         "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True, cwd=tmp_path,
    )
    try:
        stdout, stderr = proc.communicate(timeout=50)
        assert proc.returncode == 2, stderr
        assert stdout == "" and len(stderr.splitlines()) == 1, stderr
        assert "no-such-dir" in stderr and "Traceback" not in stderr
        # the fork server started for the workers (and its resource tracker) end when they
        # see the driver gone
        deadline = time.monotonic() + 20
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _session_processes(proc.pid) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- more workers than cores ------------------------------------------------------------------


class QuietCluster:
    def __init__(self, n: int) -> None:
        self.n = n

    def close(self) -> None:
        pass


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("workers", "cores", "warned"), [(8, 2, True), (2, 2, False),
                                                          (3, 1, True), (1, 4, False)])
def test_more_workers_than_cores_warns_once(monkeypatch, workers, cores, warned):
    monkeypatch.setattr(cli, "_default_workers", lambda: cores)
    monkeypatch.setattr(DaskBackend, "local", classmethod(lambda cls, n, **kw: QuietCluster(n)))
    collect = Collect()
    logger = logging.getLogger("emdist")
    logger.addHandler(collect)
    try:
        backend = cli._start_local(workers)
    finally:
        logger.removeHandler(collect)
    assert backend.n == workers
    if not warned:
        assert collect.lines == []
        return
    assert len(collect.lines) == 1, collect.lines
    plural = "s" if cores > 1 else ""
    assert collect.lines[0].startswith(
        f"--workers {workers} on {cores} CPU core{plural}: {workers} worker processes share "
        f"{cores} core{plural}; starting them took ")
    assert collect.lines[0].endswith(f" s and gives no speed-up over --workers {cores}")


@pytest.mark.timeout(120)
def test_oversubscribed_cluster_warns_once_and_gives_the_serial_bytes(monkeypatch, tmp_path):
    data = digits_subset(tmp_path / "digits", "train", per_label=2)
    serial = invoke("train", data, tmp_path / "exp0", "--workers", "0", *TINY)
    assert serial.exit_code == 0, serial.output
    monkeypatch.setattr(cli, "_default_workers", lambda: 2)
    result = invoke("train", data, tmp_path / "exp3", "--workers", "3", "--short-pass", "0",
                    *TINY)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "CPU core" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("emdist: --workers 3 on 2 CPU cores: 3 worker processes")
    assert model_bytes(tmp_path / "exp3") == model_bytes(tmp_path / "exp0")
    assert model_bytes(tmp_path / "exp3", 0) == model_bytes(tmp_path / "exp0", 0)


# -- where passes run: in process while passes are short or the workers start ----------------


class Starts:
    """A ``start`` for :class:`StartingCluster`: counts calls, waits for ``go`` (set by the
    test), then starts a LocalCluster of threads (or raises ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.go = threading.Event()
        self.error = error

    def __call__(self):
        self.calls += 1
        self.go.wait(30)
        if self.error is not None:
            raise self.error
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                               dashboard_address=None, silence_logs=logging.WARNING)
        return DaskBackend(Client(cluster), cluster)


class GoAt:
    """A progress sink that lets the cluster start once pass ``stage`` begins, and holds
    that pass back until the cluster is up."""

    def __init__(self, starts: Starts, stage: str, backend: StartingCluster) -> None:
        self.starts, self.stage, self.backend = starts, stage, backend

    def start(self, title: str, total: int, frames: int) -> None:
        if title == self.stage:
            self.starts.go.set()
            self.backend._starting.result(timeout=30)

    def advance(self, frames: int) -> None:
        pass

    def finish(self) -> None:
        pass


SMALL_CONFIG = TrainConfig(num_gauss=2, covariance_type="full", num_iters=3, nj=3)


@pytest.fixture(scope="module")
def serial_exp(data_dir, tmp_path_factory) -> Path:
    exp = tmp_path_factory.mktemp("serial")
    train(load_data_dir(data_dir), SMALL_CONFIG, SerialBackend(), ExpDir(exp))
    return exp


def _train_on(backend, data_dir, exp: Path, progress=None) -> None:
    try:
        train(load_data_dir(data_dir), SMALL_CONFIG, backend, ExpDir(exp), progress=progress)
    finally:
        backend.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("dashboard", "started"), [(None, False), ("127.0.0.1:0", True)])
def test_a_dashboard_starts_the_cluster_at_once(monkeypatch, dashboard, started):
    """Who asks for the dashboard wants a cluster to watch: every pass goes to it."""
    monkeypatch.setattr(cli, "_start_local", lambda n, address: QuietCluster(n))
    backend = cli._backend(2, None, None, 1, 1.0, dashboard, 0.2)
    try:
        assert isinstance(backend, StartingCluster)
        assert (backend._starting is not None) == started
        assert backend._short_pass == (0.0 if started else 0.2)
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_short_passes_never_start_the_cluster(data_dir, serial_exp, tmp_path, caplog):
    starts = Starts()
    backend = StartingCluster(starts, 2, short_pass=60.0)
    with caplog.at_level(logging.INFO, logger="emdist"):
        _train_on(backend, data_dir, tmp_path)
    assert starts.calls == 0 and backend.passes_in_process > 0
    assert model_bytes(tmp_path) == model_bytes(serial_exp)
    assert any(r.getMessage().startswith(f"all {backend.passes_in_process} passes ran in "
                                         "process") for r in caplog.records)


@pytest.mark.timeout(60)
def test_workers_take_over_once_up_with_the_serial_bytes(data_dir, serial_exp, tmp_path):
    # the first pass is long enough (1 ns) to start the cluster; it comes up as "acc 1"
    # begins, so the passes before that ran in process and the later ones on the cluster
    starts = Starts()
    backend = StartingCluster(starts, 2, short_pass=1e-9)
    _train_on(backend, data_dir, tmp_path, GoAt(starts, "acc 1", backend))
    assert starts.calls == 1
    assert backend.passes_in_process >= 2  # the mix-up passes and "acc 0" at least
    assert backend._cluster is not None and backend._cluster._call > 0
    assert backend._in_driver is None  # the driver's copy of the shards was dropped
    assert model_bytes(tmp_path) == model_bytes(serial_exp)
    for i in range(SMALL_CONFIG.num_iters):
        assert model_bytes(tmp_path, i) == model_bytes(serial_exp, i)


@pytest.mark.timeout(60)
def test_short_pass_0_runs_every_pass_on_the_workers(data_dir, serial_exp, tmp_path):
    starts = Starts()
    starts.go.set()
    backend = StartingCluster(starts, 2, short_pass=0.0)
    assert starts.go.is_set() and backend._starting is not None  # started at once
    _train_on(backend, data_dir, tmp_path)
    assert starts.calls == 1 and backend.passes_in_process == 0
    assert model_bytes(tmp_path) == model_bytes(serial_exp)


def _kind(item) -> str:
    return type(item[0] if isinstance(item, tuple) else item).__name__


@pytest.mark.timeout(60)
def test_cached_shards_paired_with_arguments_are_the_copies_where_a_pass_runs(data_dir):
    # the k-means++ sample pairs each cached shard with its utterance positions in a tuple
    starts = Starts()
    backend = StartingCluster(starts, 2, short_pass=60.0)
    try:
        shards = make_shards(load_data_dir(data_dir), 3, global_mode=False)
        cached = backend.cache(shards)
        assert backend.map(_kind, cached) == ["LoadedShard"] * 3
        assert backend.map(_kind, list(zip(cached, range(3), strict=True))) == ["LoadedShard"] * 3
        assert backend.map(_kind, shards[:1] + [(shards[1], 0)]) == ["LoadedShard"] * 2
        assert backend.map(_kind, list(reversed(shards))) == ["Shard", "LoadedShard", "Shard"]
        assert starts.calls == 0
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_a_large_corpus_waits_for_the_workers(data_dir, serial_exp, tmp_path, monkeypatch):
    monkeypatch.setattr(starting, "IN_PROCESS_FRAMES", 10)
    starts = Starts()
    starts.go.set()
    backend = StartingCluster(starts, 2, short_pass=60.0)
    _train_on(backend, data_dir, tmp_path)
    assert starts.calls == 1 and backend.passes_in_process == 0
    assert model_bytes(tmp_path) == model_bytes(serial_exp)


@pytest.mark.timeout(60)
def test_a_failed_start_is_the_error_of_the_pass_that_needs_it(data_dir, tmp_path):
    starts = Starts(RuntimeFailure("the cluster did not start"))
    starts.go.set()
    backend = StartingCluster(starts, 2, short_pass=0.0)
    backend._starting.exception(timeout=30)  # the start has failed before the first pass
    with pytest.raises(RuntimeFailure, match="did not start"):
        _train_on(backend, data_dir, tmp_path)
    assert not (tmp_path / "0.mdl").exists()


# -- passes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def threads():
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                           dashboard_address=None, silence_logs=logging.WARNING)
    backend = DaskBackend(Client(cluster), cluster)
    yield backend
    backend.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("held", [True, False])
@pytest.mark.parametrize("cached", [False, True])
def test_passes_give_the_serial_tree_bits(threads, data_dir, monkeypatch, held, cached):
    data = load_data_dir(data_dir)
    shards = make_shards(data, 10, global_mode=False)
    models = train(data, TrainConfig(num_gauss=2, covariance_type="full", num_iters=1, nj=2),
                   SerialBackend())
    options = EStepOptions()
    fan_in = 3  # 10 shards: a tree of 3 levels
    want, want_reports = SerialBackend().map_reduce(acc_shard, shards, models, options, False,
                                                    fan_in=fan_in)
    if not held:  # large statistics: released as soon as the pass is done
        monkeypatch.setattr(dask_backend, "HOLD_BYTES", 0)
    sources = threads.cache(shards) if cached else shards
    done = []
    for _ in range(2):  # the second pass releases what the first one held
        stats, reports = threads.map_reduce(acc_shard, sources, models, options, False,
                                            fan_in=fan_in, on_done=done.append)
    assert bool(threads._held) == held
    assert sorted(done) == sorted(list(range(10)) * 2)
    assert [r.job for r in reports] == [r.job for r in want_reports] == list(range(1, 11))
    assert sorted(stats) == sorted(want)
    for label in want:
        for name in ("zeroth", "first", "second"):
            assert np.array_equal(getattr(stats[label], name), getattr(want[label], name))
        assert stats[label].loglike == want[label].loglike


@pytest.mark.timeout(30)
def test_every_cache_call_has_its_own_keys(threads, data_dir):
    shards = make_shards(load_data_dir(data_dir), 3, global_mode=False)
    first, second = threads.cache(shards), threads.cache(shards)
    assert not {f.key for f in first} & {f.key for f in second}


# -- lost scattered data -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_pass_whose_scattered_model_died_with_its_worker_is_redone(data_dir):
    # One worker holds the only copy of the scattered model; killing it mid-pass cancels
    # the pass's tasks ("lost dependencies"): the pass is redone with a fresh scatter.
    data = load_data_dir(data_dir)
    shards = make_shards(data, 4, global_mode=False)
    models = train(data, TrainConfig(num_gauss=2, covariance_type="diag", num_iters=1, nj=2),
                   SerialBackend())
    want, _ = SerialBackend().map_reduce(acc_shard, shards, models, EStepOptions(), False)
    backend = DaskBackend.local(1)
    try:
        backend.client.wait_for_workers(1, timeout=30)
        pid = next(iter(backend.client.run(os.getpid).values()))
        killed = []

        def kill_once(j: int) -> None:
            if not killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(j)

        stats, reports = backend.map_reduce(acc_shard, shards, models, EStepOptions(), False,
                                            on_done=kill_once)
        assert killed
        assert pid not in {r.pid for r in reports}  # redone on the restarted worker
        for label in want:
            assert np.array_equal(stats[label].second, want[label].second)
    finally:
        backend.close()


def test_small_values_travel_inside_tasks():
    inline = dask_backend._inline
    assert all(inline(v) for v in (True, 3, 0.5, "x", None, EStepOptions(), (1, "a")))
    assert not any(inline(v) for v in ({"a": 1}, [1], np.zeros(3), tuple(range(20))))
    assert dask_backend._nbytes({"a": (np.zeros(4), [np.zeros((2, 2))])}) == 64


@pytest.mark.timeout(120)
def test_small_jobs_script_times_the_digits_job_and_finds_the_same_bytes(tmp_path):
    """scripts/small_jobs.py (the README's small-job figures) runs the real console script;
    timings are not judged here, only that every figure is there and the bytes agree."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "small_jobs.py"
    out = tmp_path / "small.json"
    proc = subprocess.run([sys.executable, str(script), "--workers", "0", "2", "--repeats", "1",
                           "--json", str(out), "--", "--num-iters", "2"],
                          capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["same_bytes"] is True
    assert set(result["workers"]) == {"0", "2"}
    row = result["workers"]["2"]
    assert row["median_s"] > 0 and row["ratio"] > 0 and row["target"] == "<= 1.2"
    assert isinstance(row["met"], bool)


# -- bad data is not retried -----------------------------------------------------------------


def _nan_data_dir(root: Path) -> tuple[Path, str]:
    """A data dir whose third utterance has a NaN frame (in its own ark, rewritten)."""
    data = write_data_dir(root / "nan", seed=3)
    scp = (data / "feats.scp").read_text().splitlines()
    utt, _ = scp[2].split(maxsplit=1)
    feats = dict(kaldiio.load_scp(str(data / "feats.scp")))
    feats[utt] = feats[utt].copy()
    feats[utt][5, 0] = np.nan
    kaldiio.save_ark(str(data / "feats.ark"), feats, scp=str(data / "feats.scp"))
    return data, utt


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_bad_data_on_a_worker_is_a_user_error_and_is_not_retried(threads, tmp_path, cache,
                                                                  monkeypatch):
    """NaN features are found by the first pass on the workers, which reports them as a
    value (no exception for Dask to retry): the driver stops with exit status 2, naming the
    utterance, before any EM work."""
    data, utt = _nan_data_dir(tmp_path)
    reads = []
    read = tasks.load_feats

    def counting_read(rx):  # the workers are threads of this process: one counter
        if utt in {u.utt_id for u in loaded.utts if u.rxfilename == rx}:
            reads.append(rx)
        return read(rx)

    loaded = load_data_dir(data)
    monkeypatch.setattr(tasks, "load_feats", counting_read)
    config = TrainConfig(num_gauss=2, covariance_type="diag", num_iters=1, nj=3)
    with pytest.raises(EmdistError) as info:
        train(loaded, config, threads, ExpDir(tmp_path / "exp"), feature_cache=cache)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert utt in message and "NaN" in message and "--skip-bad-utts" in message
    assert "1 of " in message
    assert len(reads) == 1  # read once: not retried
    assert not list((tmp_path / "exp" / "log").glob("init.*.log"))
