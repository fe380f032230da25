"""Tests of the Dask backend against the serial one, on real LocalClusters (threads in this
process, and worker processes) and real Kaldi ark/scp files.

What is proved: the same bytes of every model whatever the backend and feature cache; the
tree sum on the workers equals ``tree_sum`` of the serial results bit for bit; a failing
shard becomes ``JobsFailed`` with its index (and, through the engine, a job log); scores
are the same on every backend; runs sharing a scheduler do not mix their data.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import copy_exp, model_bytes, tiny_config, train_tiny, write_data_dir

from emdist.backends.base import JobsFailed
from emdist.backends.dask_backend import DaskBackend
from emdist.backends.serial import SerialBackend
from emdist.data.datadir import load_data_dir
from emdist.engine import make_shards, train
from emdist.errors import DataError, EmdistError, RuntimeFailure
from emdist.io.expdir import ExpDir
from emdist.io.modelio import load_models
from emdist.models.estep import EStepOptions
from emdist.models.stats import tree_sum
from emdist.recognizer import score
from emdist.tasks import acc_shard, load_shard

TRAIN_OPTIONS = dict(covariance_type="full", num_gauss=3, num_iters=3, nj=4)


def _start(processes: bool):
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.WARNING,
    )
    backend = DaskBackend(Client(cluster), cluster)
    backend.client.wait_for_workers(2, timeout=60)
    return backend


@pytest.fixture(scope="module")
def threads():
    backend = _start(processes=False)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def processes():
    backend = _start(processes=True)
    yield backend
    backend.close()


@pytest.fixture(params=["threads", "processes"])
def dask_backend(request) -> DaskBackend:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dask")


@pytest.fixture(scope="module")
def data(root):
    return load_data_dir(write_data_dir(root / "train", seed=0))


@pytest.fixture(scope="module")
def serial_runs(root, data) -> dict[str, Path]:
    """Reference runs with the serial backend, streaming features from disk."""
    runs = {}
    for init in ["kmeans", "mixup"]:
        runs[init] = root / f"serial-{init}"
        train_tiny(data, runs[init], feature_cache="none", init=init, **TRAIN_OPTIONS)
    return runs


def _assert_stats_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for label in want:
        for name in ("zeroth", "first", "second"):
            assert np.array_equal(getattr(got[label], name), getattr(want[label], name)), (
                label,
                name,
            )
        assert got[label].loglike == want[label].loglike
        assert got[label].frames == want[label].frames


def _job_pids(exp: Path) -> set[int]:
    pids = set()
    for log in (exp / "log").glob("acc.*.*.log"):
        pids.add(int(re.search(r"\(pid (\d+)\)", log.read_text()).group(1)))
    return pids


# -- same bits on every backend -------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cache", ["none", "memory"])
@pytest.mark.parametrize("init", ["kmeans", "mixup"])
def test_final_model_is_identical_on_every_backend(
    dask_backend, serial_runs, data, tmp_path, init, cache
):
    exp = tmp_path / "exp"
    train_tiny(data, exp, backend=dask_backend, feature_cache=cache, init=init, **TRAIN_OPTIONS)
    for name in ["0", "1", "2", "3", "final"]:
        assert model_bytes(exp, name) == model_bytes(serial_runs[init], name), name
    pids = _job_pids(exp)
    if dask_backend.cluster.processes:
        assert os.getpid() not in pids  # the E-steps really ran in the worker processes
    else:
        assert pids == {os.getpid()}


GSELECT = dict(covariance_type="diag", num_gauss=8, gselect=3, global_mode=True, num_iters=3,
               nj=4)


@pytest.fixture(scope="module")
def serial_gselect(root, data) -> Path:
    exp = root / "serial-gselect"
    train_tiny(data, exp, feature_cache="none", **GSELECT)
    return exp


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_gaussian_selection_is_identical_on_every_backend(
    dask_backend, serial_gselect, data, tmp_path, cache
):
    """Selections kept on the workers (with the block-ordered frames when cached, alone when
    streamed) give the serial run's bytes."""
    exp = tmp_path / "exp"
    train_tiny(data, exp, backend=dask_backend, feature_cache=cache, **GSELECT)
    for name in ["0", "1", "2", "3", "final"]:
        assert model_bytes(exp, name) == model_bytes(serial_gselect, name), name
    assert "gselect: 3 of 8" in (exp / "log" / "acc.2.1.log").read_text()


@pytest.mark.timeout(60)
def test_resume_on_dask_after_serial_start_is_byte_identical(
    processes, serial_runs, data, tmp_path
):
    exp = copy_exp(serial_runs["kmeans"], tmp_path / "exp")
    for name in ["2", "3", "final"]:
        (exp / f"{name}.mdl").unlink()
    seen = []
    train(
        data,
        tiny_config(init="kmeans", **TRAIN_OPTIONS),
        processes,
        ExpDir(exp),
        on_record=seen.append,
    )
    assert [r.iter for r in seen] == [2, 3]
    assert model_bytes(exp) == model_bytes(serial_runs["kmeans"])


# -- the tree sum ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_shards(data, serial_runs):
    shards = make_shards(data, 10, global_mode=False)
    assert len(shards) == 10
    models = load_models(serial_runs["kmeans"] / "1.mdl")
    options = EStepOptions()
    serial = [acc_shard(s, models, options) for s in shards]
    return shards, models, options, serial


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cached", [False, True])
def test_map_reduce_equals_serial_tree_sum(dask_backend, ten_shards, cached):
    shards, models, options, serial = ten_shards
    fan_in = 3  # 10 shards -> 4 groups -> 2 groups -> 1: a tree of 3 levels
    want = tree_sum([r[0] for r in serial], fan_in=fan_in)
    sources = dask_backend.cache(shards) if cached else shards
    stats, reports = dask_backend.map_reduce(
        acc_shard, sources, models, options, False, fan_in=fan_in
    )
    _assert_stats_equal(stats, want)
    assert [r.job for r in reports] == list(range(1, 11))
    assert [r.frames for r in reports] == [s.num_frames for s in shards]
    s_stats, _ = SerialBackend().map_reduce(
        acc_shard, shards, models, options, False, fan_in=fan_in
    )
    _assert_stats_equal(s_stats, want)


@pytest.mark.timeout(60)
def test_fetches_that_time_out_are_waited_for_again(threads, ten_shards, monkeypatch):
    """A fetch of finished results is given up after FETCH_SECONDS (the limit doubling
    each time) and the futures waited for again under the cluster watch: with a limit
    that every first fetch exceeds, the results are still the serial ones."""
    import emdist.backends.dask_backend as dask_backend

    shards, models, options, serial = ten_shards
    fetches = []
    real_sync = threads.client.sync

    def sync(func, *args, callback_timeout=None, **kwargs):
        fetches.append(callback_timeout)
        return real_sync(func, *args, callback_timeout=callback_timeout, **kwargs)

    monkeypatch.setattr(dask_backend, "FETCH_SECONDS", 1e-6)
    monkeypatch.setattr(threads.client, "sync", sync)
    stats, _ = threads.map_reduce(acc_shard, shards, models, options, False, fan_in=3)
    _assert_stats_equal(stats, tree_sum([r[0] for r in serial], fan_in=3))
    results = threads.map(acc_shard, shards, models, options, False)
    for (got, _), (want, _) in zip(results, serial, strict=True):
        _assert_stats_equal(got, want)
    limits = [t for t in fetches if t is not None]
    assert len(limits) > 2 and limits[:2] == [1e-6, 2e-6]  # retried, doubling


@pytest.mark.timeout(30)
def test_tree_shape_matters_so_the_test_above_can_fail(ten_shards):
    # The sums of the tree test differ with another tree shape in at least one bit; else
    # equality there would not show that the workers sum in the serial tree's order.
    *_, serial = ten_shards
    stats = [r[0] for r in serial]
    tree, flat = tree_sum(stats, fan_in=3), tree_sum(stats, fan_in=10)
    assert any(
        not np.array_equal(getattr(tree[lab], name), getattr(flat[lab], name))
        for lab in tree
        for name in ("zeroth", "first", "second")
    )


# -- failures -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_failing_shard_becomes_jobs_failed_with_its_index(dask_backend, data, serial_runs):
    shards = make_shards(data, 5, global_mode=False)
    models = load_models(serial_runs["kmeans"] / "0.mdl")

    def fails_on_shard_3(shard, models, options):  # pickled by value: no test module needed
        if shard.index == 3:
            raise DataError(shard.utts[0].rxfilename, "cannot read features: broken")
        return acc_shard(shard, models, options)

    for run in (dask_backend.map, dask_backend.map_reduce):
        with pytest.raises(JobsFailed) as info:
            run(fails_on_shard_3, shards, models, EStepOptions())
        failed = info.value
        assert failed.total == 5
        assert [f.index for f in failed.failures] == [3]
        error = failed.failures[0].error
        assert isinstance(error, DataError) and "broken" in str(error)
        assert "fails_on_shard_3" in failed.failures[0].traceback
    # the same task on the other shards runs fine: only shard 3 was at fault
    stats, reports = dask_backend.map_reduce(fails_on_shard_3, shards[:3], models, EStepOptions())
    assert [r.job for r in reports] == [1, 2, 3]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_corrupt_ark_on_workers_fails_with_its_job_log(processes, serial_runs, tmp_path, cache):
    path = write_data_dir(tmp_path / "data", seed=0)
    broken = load_data_dir(path)
    k = 13
    ark, offset = broken.utts[k].rxfilename.rsplit(":", 1)
    with open(ark, "r+b") as fh:
        fh.seek(int(offset))
        fh.write(b"garbage!garbage!")
    config = tiny_config(init="kmeans", **TRAIN_OPTIONS)
    job = next(s.job for s in make_shards(broken, config.nj, False) if broken.utts[k] in s.utts)
    exp = copy_exp(serial_runs["kmeans"], tmp_path / "exp")
    for name in ["1", "2", "3", "final"]:
        (exp / f"{name}.mdl").unlink()
    with pytest.raises(EmdistError) as info:
        train(broken, config, processes, ExpDir(exp), feature_cache=cache)
    message = str(info.value)
    assert f"1 / {config.nj} jobs failed" in message
    # found by the first pass, which reads and checks every utterance before any EM work
    log_path = exp / "log" / f"check.0.{job}.log"
    assert f"log is in {log_path};" in message
    assert log_path.read_text().splitlines()[-1].startswith("# Ended (code 1)")
    assert "cannot read features" in log_path.read_text()


@pytest.mark.timeout(60)
def test_missing_ark_is_refused_before_training(dask_backend, data, tmp_path):
    import dataclasses

    gone = str(tmp_path / "gone.ark")
    utt = dataclasses.replace(data.utts[5], rxfilename=gone + ":15")
    broken = dataclasses.replace(data, utts=data.utts[:5] + (utt,) + data.utts[6:])
    with pytest.raises(RuntimeFailure, match=re.escape(f"cannot read {gone}")):
        train_tiny(broken, tmp_path / "exp", backend=dask_backend)
    assert not (tmp_path / "exp" / "0.mdl").exists()


# -- scoring ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_scores_are_identical_on_every_backend(threads, processes, serial_runs, root):
    test = load_data_dir(write_data_dir(root / "test", seed=1, frames=(1, 30)))
    models = load_models(serial_runs["kmeans"] / "final.mdl")
    want = score(models, test, SerialBackend(), nj=3)
    assert sorted(want) == [u.utt_id for u in test.utts]
    for backend in (threads, processes):
        assert score(models, test, backend, nj=3) == want


# -- a scheduler shared by two runs -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_runs_on_one_scheduler_do_not_mix_their_features(threads, root):
    # Fails (emdist bug): DaskBackend.cache() names the cached shards "emdist-feats-<index>"
    # and tasks "<func>-<call>-<index>", the same in every run, and Dask keys are global to
    # the scheduler: a second run (another client, e.g. a second `emdist train --scheduler`)
    # gets the first run's features instead of loading its own.
    data_a = load_data_dir(write_data_dir(root / "run-a", seed=10))
    data_b = load_data_dir(write_data_dir(root / "run-b", seed=11))
    shards_a = make_shards(data_a, 2, False)
    shards_b = make_shards(data_b, 2, False)
    run_a = DaskBackend(Client(threads.cluster))
    run_b = DaskBackend(Client(threads.cluster))
    try:
        held = run_a.cache(shards_a)  # run A is under way: its shards are in worker memory
        run_a.client.gather(held)
        loaded = run_b.client.gather(run_b.cache(shards_b))
    finally:  # closing the clients releases every key they hold, whatever happened
        run_a.client.close()
        run_b.client.close()
    assert [s.shard for s in loaded] == list(shards_b), "run B was given run A's shards"
    for got, shard in zip(loaded, shards_b, strict=True):
        want = load_shard(shard).frames
        assert all(np.array_equal(got.frames[k], want[k]) for k in want)


@pytest.mark.timeout(60)
def test_trainings_in_a_row_on_one_backend_use_their_own_data(threads, root):
    # The Python API lets a user train several data dirs with one backend; each training
    # must see its own features, even when the cached shards have the same indices.
    for seed in (20, 21, 22):
        data = load_data_dir(write_data_dir(root / f"row-{seed}", seed=seed))
        train_tiny(data, root / f"row-{seed}-serial", feature_cache="none", nj=2)
        train_tiny(data, root / f"row-{seed}-dask", backend=threads, feature_cache="memory", nj=2)
        assert model_bytes(root / f"row-{seed}-dask") == model_bytes(root / f"row-{seed}-serial")


def test_sample_of_a_cached_shard_is_the_sample_read_from_disk(data):
    """The k-means++ sample is taken in memory from cached shards: the same frames."""
    from emdist.tasks import sample_shard

    shards = make_shards(data, 3, global_mode=False)
    totals: dict[str, int] = {}
    for shard in shards:
        starts = []
        for utt, key in zip(shard.utts, shard.keys, strict=True):
            starts.append(totals.get(key, 0))
            totals[key] = totals.get(key, 0) + utt.num_frames
        for stride in (1, 3, 7):
            from_disk = sample_shard(shard, stride, tuple(starts))
            in_memory = sample_shard(load_shard(shard), stride, tuple(starts))
            assert sorted(from_disk) == sorted(in_memory)
            for key in from_disk:
                np.testing.assert_array_equal(in_memory[key], from_disk[key])


@pytest.mark.timeout(60)
def test_streamed_passes_send_references_to_kept_shards(threads, data):
    """Streamed shards are kept on the workers once: passes send futures, not utterance
    lists (tens of MB per pass for a large corpus)."""
    from distributed import Future

    from emdist.engine.trainer import Trainer

    trainer = Trainer(make_shards(data, 4, global_mode=False), data.dim,
                      tiny_config(nj=4), threads, None, feature_cache="none")
    assert trainer.cache_mode == "none"
    assert all(isinstance(s, Future) for s in trainer.sources)
    assert [s.result().index for s in trainer.sources] == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_models_reach_the_workers_as_tasks_not_as_scattered_data(processes, data,
                                                                 serial_runs, tmp_path):
    """Scattered data cannot be computed again when its holders die, and a broadcast
    scatter runs the scheduler's replicate, which loops for ever when a worker dies during
    it (a CI run hung so, with one of two SGE workers deleted by qdel). Each pass's model is
    the result of a task instead, which the scheduler can run again (the kill tests of
    test_cluster_runs.py and test_model_kinds.py prove that part): no scatter is recorded."""
    client = processes.client

    def scatters() -> int:
        return sum(e.get("action") == "scatter" for _, e in client.get_events("all"))

    before = scatters()
    exp = tmp_path / "exp"
    train_tiny(data, exp, backend=processes, feature_cache="memory", init="kmeans",
               **TRAIN_OPTIONS)
    assert scatters() == before
    assert model_bytes(exp) == model_bytes(serial_runs["kmeans"])
    client.scatter([np.zeros(3)], hash=False)  # what the count above would have seen
    assert scatters() == before + 1
