"""An embedded LocalCluster that is started when passes are long enough to gain from it,
in the background: passes run in this process until its workers are up, then on the cluster.

Starting a LocalCluster takes about 0.45 s of both cores of a 2-core machine for 2 worker
processes, and more for more workers, and each pass on it costs some 30-50 ms of Dask
messages, while a whole pass over the bundled digits takes about 60 ms in process: the
cluster made ``--workers 2`` on the digits 1.6x slower than ``--workers 0``, and could never
make it faster. Where a pass runs never changes its result (the serial and Dask backends
give the same bits: the same tasks, the same tree sum in shard order), so:

* a small corpus (at most :data:`IN_PROCESS_FRAMES`) starts in process; the cluster is
  started, in the background, once a pass takes ``short_pass`` seconds or more (as passes
  grow with mix-up), and passes go on in process until its workers are up;
* a larger corpus starts the cluster at once and waits for it, as before;
* ``short_pass=0`` starts the cluster at once and runs every pass on it (the behaviour of
  a plain :class:`~emdist.backends.dask_backend.DaskBackend`).

A Gaussian selection (``keep``) always runs on the cluster, where the passes that use it
will run. The driver holds a small corpus's cached shards until the workers read their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from emdist.backends.serial import SerialBackend

log = logging.getLogger("emdist")

IN_PROCESS_FRAMES = 250_000
"""Corpora of at most this many frames (about 40 minutes of speech) may run passes in
process. Larger ones start the cluster at once and wait for it: their passes take seconds,
and workers taking over from the driver would read the corpus a second time (on 1,000,036
frames that made a 4.4 s run take 5.8 s)."""
SHORT_PASS = 0.2
"""Seconds of a pass in process below which workers gain little: with Dask's 30-50 ms a
pass, 2 workers save at most a third of a 0.2 s pass, and starting them costs 0.45 s."""


class CachedShards(list):
    """What :meth:`StartingCluster.cache` returns: the shards, standing for their cached
    copies in whichever place a pass runs (the driver's before the switch, the workers'
    after), also where a pass pairs them with per-shard arguments in tuples."""


class StartingCluster:
    """A backend whose cluster is being started by ``start`` in a background thread.

    Parameters
    ----------
    start : callable
        Returns the started :class:`emdist.backends.dask_backend.DaskBackend`.
    n_workers : int
        Workers that ``start`` asks for (for messages until they are up).
    short_pass : float
        Start the cluster once a pass in process takes this many seconds (0: at once, and
        every pass waits for it).
    """

    name = "dask"

    def __init__(self, start: Callable[[], Any], n_workers: int,
                 short_pass: float = SHORT_PASS) -> None:
        self._requested = n_workers
        self._short_pass = short_pass
        self._serial = SerialBackend()
        self._cluster = None
        self._start = start
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="emdist-cluster-start")
        self._starting: Future | None = None
        self._cached: CachedShards | None = None  # the shards cache() was given
        self._in_driver: list | None = None  # their copies held by the driver
        self._on_workers: list | None = None  # futures of the workers' copies
        self.passes_in_process = 0
        if short_pass <= 0:
            self._begin()

    # -- where a call runs ---------------------------------------------------------------

    def _begin(self) -> None:
        if self._starting is None:
            self._starting = self._pool.submit(self._start)

    def _started(self, wait: bool):
        """The cluster once it is up (waiting for it with ``wait``), or None."""
        if self._cluster is None:
            if wait:
                self._begin()
            if self._starting is None or not (wait or self._starting.done()):
                return None
            self._cluster = self._starting.result()  # a failed start raises here
            self._in_driver = None  # the workers read their own copies
            ran = (f" ({self.passes_in_process} passes ran in process before)"
                   if self.passes_in_process else "")
            log.info("running on %s from now on%s", self._cluster.describe(), ran)
            link = self._cluster.dashboard_link()
            if link:
                log.info("dashboard: %s", link)
        return self._cluster

    def _pick(self, sources: Sequence):
        cluster = self._started(wait=False)
        if cluster is not None:
            return cluster
        frames = sum(getattr(s[0] if isinstance(s, tuple) and s else s, "num_frames",
                             IN_PROCESS_FRAMES + 1) for s in sources)
        if self._short_pass > 0 and frames <= IN_PROCESS_FRAMES:
            return self._serial
        return self._started(wait=True)

    def _call(self, sources: Sequence, run: Callable):
        """``run(backend, sources)`` where :meth:`_pick` says; a long pass in process
        starts the cluster."""
        backend = self._pick(sources)
        resolved = self._resolve(backend, sources)
        t0 = time.monotonic()
        result = run(backend, resolved)
        if backend is self._serial:
            self.passes_in_process += 1
            seconds = time.monotonic() - t0
            if self._starting is None and seconds >= self._short_pass:
                log.info("a pass took %.2f s in process: starting %d workers (passes run in "
                         "process until they are up)", seconds, self._requested)
                self._begin()
        return result

    def _copies(self, backend) -> list:
        """The cached shards' copies where ``backend`` runs, made on first use."""
        if backend is self._serial:
            if self._in_driver is None:
                self._in_driver = self._serial.cache(self._cached)
            return self._in_driver
        if self._on_workers is None:
            self._on_workers = backend.cache(self._cached)
        return self._on_workers

    def _resolve(self, backend, sources: Sequence) -> Sequence:
        """The sources as ``backend`` takes them: each cached shard, alone or first in a
        tuple of per-shard arguments, becomes its copy there."""
        cached = self._cached
        if cached is None:
            return sources

        def swap(item, j: int):
            if isinstance(item, tuple) and item:
                return (swap(item[0], j), *item[1:])
            if j < len(cached) and item is cached[j]:
                return self._copies(backend)[j]
            return item

        return [swap(item, j) for j, item in enumerate(sources)]

    # -- the Backend protocol ------------------------------------------------------------

    def cache(self, shards: Sequence) -> list:
        """Cached copies are made where the first pass that reads them runs."""
        self._cached = CachedShards(shards)
        self._in_driver = self._on_workers = None
        return self._cached

    def keep(self, func: Callable, sources: Sequence, *args: Any,
             on_done: Callable[[int], None] | None = None) -> list:
        cluster = self._started(wait=True)
        return cluster.keep(func, self._resolve(cluster, sources), *args, on_done=on_done)

    def rebalance(self, sources: list) -> list:
        if sources is self._cached:
            if self._cluster is not None and self._on_workers is not None:
                self._on_workers = self._cluster.rebalance(self._on_workers)
            return sources
        cluster = self._started(wait=True)
        return cluster.rebalance(sources)

    def memory_capacity(self) -> int:
        """The machine's memory: the local workers share it (as the driver does)."""
        return self._serial.memory_capacity()

    def check_paths(self, paths: Sequence[str]) -> None:
        """Local workers read the driver's filesystem."""

    def map(self, func: Callable, sources: Sequence, *args: Any,
            on_done: Callable[[int], None] | None = None) -> list:
        return self._call(sources, lambda backend, resolved: backend.map(
            func, resolved, *args, on_done=on_done))

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8,
                   on_done: Callable[[int], None] | None = None):
        return self._call(sources, lambda backend, resolved: backend.map_reduce(
            func, resolved, *args, fan_in=fan_in, on_done=on_done))

    @property
    def n_workers(self) -> int:
        return self._cluster.n_workers if self._cluster is not None else self._requested

    def dashboard_link(self) -> str | None:
        return self._cluster.dashboard_link() if self._cluster is not None else None

    def describe(self) -> str:
        if self._cluster is not None:
            return self._cluster.describe()
        if self._starting is not None:
            return (f"an embedded LocalCluster of {self._requested} workers, starting (passes "
                    "run in process until it is up)")
        return (f"an embedded LocalCluster of {self._requested} workers, started when the "
                f"passes need it (a corpus over {IN_PROCESS_FRAMES:,} frames, or a pass of "
                f"{self._short_pass:g} s or more in process; in process until then)")

    def close(self) -> None:
        """Close the cluster, once started (a start that failed unused is not an error)."""
        self._pool.shutdown(wait=True)
        if self._starting is None:
            if self.passes_in_process:
                log.info("all %d passes ran in process: none took %g s, and %d workers would "
                         "have added more time than they saved (--short-pass 0 starts them "
                         "anyway)", self.passes_in_process, self._short_pass, self._requested)
        elif self._cluster is None and self._starting.exception() is None:
            self._cluster = self._starting.result()
        if self._cluster is not None:
            self._cluster.close()
        self._in_driver = self._on_workers = None
