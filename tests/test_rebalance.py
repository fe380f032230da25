"""Cached shards are spread evenly again after a worker was replaced."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import write_data_dir

from emdist.backends.dask_backend import DaskBackend
from emdist.data.datadir import load_data_dir
from emdist.engine.trainer import make_shards


def _placement(backend: DaskBackend, sources) -> Counter:
    holders = backend.client.who_has(sources)
    return Counter(sorted(holders[f.key])[0] for f in sources)


@pytest.mark.timeout(120)
def test_rebalance_moves_piled_up_shards_to_a_replacement_worker(tmp_path):
    data = load_data_dir(write_data_dir(tmp_path / "data", utts_per_label=8))
    shards = make_shards(data, 8, global_mode=False)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                           dashboard_address=":0")
    backend = DaskBackend(Client(cluster), cluster)
    try:
        sources = backend.cache(shards)
        before = backend.client.gather(sources)
        assert sorted(_placement(backend, sources).values()) == [4, 4]
        # a worker leaves (its shards move to the survivor) and a new, empty one joins
        cluster.scale(1)  # retires a worker gracefully: its data moves to the other
        deadline = time.monotonic() + 30
        while len(backend.client.scheduler_info()["workers"]) > 1:
            assert time.monotonic() < deadline, "worker did not retire"
            time.sleep(0.05)
        cluster.scale(2)
        backend.client.wait_for_workers(2, timeout=30)
        assert sorted(_placement(backend, sources).values()) == [8]
        moved = backend.rebalance(sources)
        assert sorted(_placement(backend, moved).values()) == [4, 4]
        after = backend.client.gather(moved)
        for a, b in zip(before, after, strict=True):
            assert a.shard == b.shard
            assert a.frames.keys() == b.frames.keys()
            assert all(np.array_equal(a.frames[k], b.frames[k]) for k in a.frames)
        # an even placement is left alone
        assert backend.rebalance(moved) == moved
    finally:
        backend.close()
