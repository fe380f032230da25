"""The Dask backend: one task per shard on an embedded LocalCluster or a remote scheduler.

The model is scattered once per call (not embedded in every task); statistics are summed
on the workers in a tree whose shape follows shard indices only (groups of ``fan_in``
consecutive shards), so the result is the same bits as the serial backend's on any
cluster. Worker processes are started with one thread each; tasks also pin BLAS to one
thread themselves.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client, LocalCluster, wait

from emdist.backends.base import JobFailure, JobsFailed
from emdist.errors import RuntimeFailure
from emdist.tasks import reduce_group

RETRIES = 2


class DaskBackend:
    """Run shard tasks on a Dask cluster.

    Parameters
    ----------
    client : distributed.Client
    cluster : distributed.LocalCluster, optional
        Closed with the backend when the backend started it.
    """

    name = "dask"

    def __init__(self, client: Client, cluster: LocalCluster | None = None) -> None:
        self.client = client
        self.cluster = cluster
        self._call = 0

    @classmethod
    def local(cls, n_workers: int, processes: bool = True) -> DaskBackend:
        """Start an embedded LocalCluster of ``n_workers`` single-threaded workers."""
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )
        return cls(Client(cluster), cluster)

    @classmethod
    def connect(cls, address: str | None = None, scheduler_file: str | None = None,
                timeout: float = 30.0, n_workers: int = 1) -> DaskBackend:
        """Attach to a running scheduler and wait for ``n_workers`` workers."""
        target = address or scheduler_file
        try:
            if scheduler_file:
                client = Client(scheduler_file=scheduler_file, timeout=timeout)
            else:
                client = Client(address, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise RuntimeFailure(f"cannot reach the Dask scheduler at {target}: {exc}") from None
        try:
            client.wait_for_workers(n_workers, timeout=timeout)
        except TimeoutError:
            client.close()
            raise RuntimeFailure(
                f"the scheduler at {target} has fewer than {n_workers} workers after "
                f"{timeout:g} s; start workers or lower --wait-workers"
            ) from None
        return cls(client)

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def describe(self) -> str:
        kind = "embedded LocalCluster" if self.cluster is not None else "scheduler"
        return f"{kind} {self.client.scheduler.address} with {self.n_workers} workers"

    def _scatter(self, args: Sequence[Any]) -> list:
        # A list of one item scatters the item whole (a dict would be split by key).
        return [self.client.scatter([a], hash=False)[0] for a in args]

    def _submit_all(self, func: Callable, sources: Sequence, args: Sequence) -> list:
        self._call += 1
        name = getattr(func, "__name__", "task")
        scattered = self._scatter(args)
        return [
            self.client.submit(
                func, source, *scattered, key=f"{name}-{self._call}-{i}", retries=RETRIES,
                pure=False,
            )
            for i, source in enumerate(sources)
        ]

    def _check(self, futures: list) -> None:
        wait(futures)
        failures = []
        for i, fut in enumerate(futures):
            if fut.status == "error":
                exc = fut.exception()
                tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
                failures.append(JobFailure(i, exc, tb))
            elif fut.status == "cancelled":
                failures.append(JobFailure(i, RuntimeFailure("task was cancelled"), ""))
        if failures:
            raise JobsFailed(failures, len(futures))

    def map(self, func: Callable, sources: Sequence, *args: Any) -> list:
        futures = self._submit_all(func, sources, args)
        self._check(futures)
        return self.client.gather(futures)

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8):
        futures = self._submit_all(func, sources, args)
        level = futures
        depth = 0
        while len(level) > 1:
            depth += 1
            level = [
                group[0] if len(group) == 1 else self.client.submit(
                    reduce_group, *group, key=f"reduce-{self._call}-{depth}-{j}",
                    retries=RETRIES, pure=False,
                )
                for j, group in enumerate(
                    level[i : i + fan_in] for i in range(0, len(level), fan_in)
                )
            ]
        self._check(futures)
        return level[0].result()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
