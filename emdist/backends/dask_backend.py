"""The Dask backend: one task per shard on an embedded LocalCluster or a remote scheduler.

* The model goes to the cluster once per call, as the argument of one task whose result
  the shard tasks share, not embedded in every task; small arguments (options, flags)
  travel inside the tasks. All tasks of a call go to the scheduler in one message. A
  model copy lost with its worker is recomputed from that task. (A broadcast
  ``client.scatter`` was not: scattered data cannot be recomputed, and the scheduler's
  replicate, which the broadcast runs, loops for ever when a worker dies during it.)
* With the feature cache, each shard is read once by a ``load_shard`` task whose result
  stays in worker memory (``allow_other_workers=True``: a replaced worker's shards are
  rebuilt from their lineage, i.e. re-read); without it, tasks stream from disk.
* Statistics are summed on the workers in a tree whose shape follows shard indices only
  (groups of ``fan_in`` consecutive shards), so the result is the same bits as the serial
  backend's on any cluster, whatever the order in which tasks finish. (Streaming every
  shard's statistics to the driver instead was slower: a worker sending a result while it
  computes the next one holds the GIL away from the E-step, which took 20-30 % longer.)
* An embedded LocalCluster starts its worker processes from a fork server where there is
  one (:mod:`emdist.backends.forkserver`: a fraction of the start-up and shut-down time of
  ``spawn``), and without the ``MALLOC_TRIM_THRESHOLD_=65536`` that Dask sets by default:
  it also pins glibc's mmap threshold at 128 kB, so every E-step temporary was mapped and
  unmapped again and the E-step ran about twice as slowly in the workers as in the driver
  (the fork server gives its workers thresholds that keep them in the heap).
* Worker processes have one thread each; tasks also pin BLAS to one thread themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
from distributed import Client, Future, LocalCluster, wait
from distributed.client import FutureCancelledError
from distributed.comm.addressing import parse_address, parse_host_port

from emdist.backends import forkserver
from emdist.backends.base import JobFailure, JobsFailed, raise_bad_data
from emdist.errors import ClusterLost, RuntimeFailure
from emdist.tasks import load_shard, reduce_group

log = logging.getLogger("emdist")

RETRIES = 2
POLL_SECONDS = 1.0
"""How often a waiting pass looks at the cluster (no workers, no scheduler)."""
STALL_POLLS = 3
"""Polls without a finished task after which a pass asks the scheduler to release its
stuck tasks (so that long healthy tasks cost no scheduler work)."""
LOST_DATA_RETRIES = 3
FETCH_SECONDS = 10.0
"""How long a fetch of finished results may take before they are waited for again."""
# A pass whose statistics (about the models' size per shard) stay below this keeps its
# results until the next pass's tasks are sent (see _map_reduce).
HOLD_BYTES = 16 * 2**20


def _local_cluster_config(processes: bool) -> dict:
    """Dask settings of an embedded cluster (see the module docstring); a method of
    starting processes other than Dask's default (``spawn``) is kept."""
    config: dict[str, Any] = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    if (processes and forkserver.available()
            and dask.config.get("distributed.worker.multiprocessing-method") == "spawn"):
        config["distributed.worker.multiprocessing-method"] = "forkserver"
    return config


def _inline(value) -> bool:
    """Small plain values (flags, numbers, option records) travel inside the tasks."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, tuple):
        return len(value) <= 16 and all(_inline(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_inline(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def _nbytes(value) -> int:
    """Bytes of the arrays in ``value`` (through mappings, sequences and dataclasses)."""
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    nbytes = getattr(value, "nbytes", 0)
    return nbytes if isinstance(nbytes, int) else 0


REFUSED_SECONDS = 3.0
"""How long a refused connection to a scheduler is retried (a scheduler that is just
starting) before it is an error."""


ANSWER_GRACE = 2.0
"""Seconds past ``--wait-timeout`` after which a scheduler that accepted the connection but
never answered is given up (Dask's client waits for its handshake without a limit)."""


def _client_within(timeout: float, **kwargs) -> Client:
    """``Client(timeout=timeout, **kwargs)``, or TimeoutError when it is not up shortly
    after ``timeout``: built in a daemon thread, which a silent peer may leave behind until
    the process ends."""
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["client"] = Client(timeout=timeout, **kwargs)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=build, name="emdist-connect", daemon=True)
    thread.start()
    thread.join(timeout + ANSWER_GRACE)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s (--wait-timeout); is a Dask "
                           "scheduler listening there?")
    if "error" in box:
        raise box["error"]
    return box["client"]


def _scheduler_file_address(path: str | None) -> str | None:
    """The address a Dask scheduler file holds, if it exists and holds one."""
    if not path:
        return None
    try:
        with open(path) as fh:
            return json.load(fh).get("address")
    except (OSError, ValueError, AttributeError):
        return None  # Dask's client waits for the file, or says what is wrong with it


def _refused(address: str, seconds: float) -> bool:
    """Whether every TCP connection to ``address`` (tcp:// or tls://) was refused for
    ``seconds``; False as soon as one connects or the host does not answer at all."""
    try:
        scheme, location = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return False
        host, port = parse_host_port(location)
    except (ValueError, TypeError):
        return False
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, seconds)):
                return False
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.25)
        except OSError:  # no answer, no route: Dask's client waits for --wait-timeout
            return False


def _placement(source, j: int, workers: list[str]) -> dict:
    """Where the j-th kept result goes: next to its source when that is on the cluster
    already, otherwise round robin over the workers (any of them if that one is gone)."""
    if isinstance(source, Future) or not workers:
        return {}
    return {"workers": [workers[j % len(workers)]], "allow_other_workers": True}


def _unstick(token: str, dask_scheduler=None) -> list[str]:
    """Runs on the scheduler: tasks of this run stuck in ``no-worker`` although workers are
    up. A task placed on a worker with ``allow_other_workers`` (a cached shard) whose
    workers all died is not rescheduled when new workers join (distributed 2024-2025);
    forgetting its placement and releasing it lets the scheduler run it anywhere."""
    if not dask_scheduler.running:
        return []
    stuck = [key for key, ts in dask_scheduler.tasks.items()
             if ts.state == "no-worker" and ts.loose_restrictions and token in str(key)]
    for key in stuck:
        ts = dask_scheduler.tasks[key]
        ts.worker_restrictions = None
        ts.loose_restrictions = False
    if stuck:
        dask_scheduler.transitions({key: "released" for key in stuck},
                                   stimulus_id=f"emdist-unstick-{time.time()}")
    return stuck


def _readable(paths: list[str]) -> list[str]:
    """Runs on a worker: the paths it cannot read."""
    return [p for p in paths if not os.access(p, os.R_OK)]


def _identity(value):
    """Runs on a worker: a copy of a cached shard, fetched from the worker that holds it."""
    return value


def _emdist_version() -> str:
    import emdist

    return emdist.__version__


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
        # Keys are global to a scheduler: a token keeps two runs sharing one apart.
        self._token = uuid.uuid4().hex[:12]
        # (workers, cached keys) when the cached shards were last found evenly spread
        self._balanced: tuple[frozenset, tuple] | None = None
        # the futures of the last call, released once the next call's tasks are sent
        self._held: list = []
        self.wait_timeout = 60.0
        """Seconds to wait for workers when the cluster has none (--wait-timeout)."""
        self._address = str(getattr(client.scheduler, "address", "") or "(unknown)")

    @classmethod
    def local(cls, n_workers: int, processes: bool = True,
              dashboard_address: str | None = None) -> DaskBackend:
        """Start an embedded LocalCluster of ``n_workers`` single-threaded workers.

        The scheduler's HTTP server binds to a free port on localhost unless
        ``dashboard_address`` says otherwise.
        """
        config = _local_cluster_config(processes)
        if config.get("distributed.worker.multiprocessing-method") == "forkserver":
            forkserver.start()  # unless the CLI started it already
        with dask.config.set(config):
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=processes,
                dashboard_address=dashboard_address or "127.0.0.1:0",
                silence_logs=logging.WARNING,
            )
        try:
            return cls(Client(cluster), cluster)
        except BaseException:
            cluster.close()
            raise

    @classmethod
    def connect(cls, address: str | None = None, scheduler_file: str | None = None,
                timeout: float = 30.0, n_workers: int = 1) -> DaskBackend:
        """Attach to a running scheduler, wait for ``n_workers`` workers, check versions.

        A refused connection is final: it fails within :data:`REFUSED_SECONDS` (Dask's
        client would retry it for the whole ``timeout``); an address that does not answer
        is waited for ``timeout`` seconds."""
        target = address or scheduler_file
        probe = address or _scheduler_file_address(scheduler_file)
        if probe and _refused(probe, min(REFUSED_SECONDS, timeout)):
            raise RuntimeFailure(
                f"cannot reach the Dask scheduler at {target}: connection refused (nothing "
                "listens there); start the scheduler first, or check the address")
        try:
            client = _client_within(timeout, address=address, scheduler_file=scheduler_file)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RuntimeFailure(f"cannot reach the Dask scheduler at {target}: {reason}") \
                from None
        except TypeError as exc:  # tls:// without certificates in the Dask config
            raise RuntimeFailure(
                f"cannot connect to {target}: {exc}; set the TLS certificates in the Dask "
                "config (distributed.comm.tls.*, see cluster/README.md)"
            ) from None
        backend = cls(client)
        backend.wait_timeout = timeout
        try:
            client.wait_for_workers(n_workers, timeout=timeout)
            backend.check_versions()
        except TimeoutError:
            backend.close()
            raise RuntimeFailure(
                f"the scheduler at {target} has fewer than {n_workers} workers after "
                f"{timeout:g} s; start workers or lower --wait-workers"
            ) from None
        except BaseException:
            backend.close()
            raise
        return backend

    def check_versions(self) -> None:
        """Refuse workers whose emdist (or Python packages Dask checks) differ from ours."""
        try:
            self.client.get_versions(check=True)
        except ValueError as exc:
            raise RuntimeFailure(f"package versions differ across the cluster: {exc}") from None
        ours = _emdist_version()
        theirs = self.client.run(_emdist_version)
        bad = {w: v for w, v in theirs.items() if v != ours}
        if bad:
            worker, version = sorted(bad.items())[0]
            raise RuntimeFailure(
                f"worker {worker} runs emdist {version}, the driver {ours}; install the same "
                "version everywhere"
            )

    def check_paths(self, paths: Sequence[str]) -> None:
        """Every worker must read every feature file (a shared filesystem, as Kaldi's
        queue.pl assumes); name the first worker and path that fail."""
        missing = self.client.run(_readable, sorted(set(paths)))
        for worker, bad in sorted(missing.items()):
            if bad:
                raise RuntimeFailure(
                    f"worker {worker} cannot read {bad[0]} ({len(bad)} files unreadable); the "
                    "feature files must be at the same paths on every worker"
                )

    def _workers(self) -> dict[str, dict]:
        """The scheduler's table of workers: address -> info."""
        return self.client.scheduler_info(n_workers=-1)["workers"]

    @property
    def n_workers(self) -> int:
        return len(self._workers())

    def memory_capacity(self) -> int:
        """Summed ``memory_limit`` of the workers, in bytes."""
        return int(sum(w.get("memory_limit") or 0 for w in self._workers().values()))

    def dashboard_link(self) -> str | None:
        """The dashboard's address, when the dashboard can be served (needs bokeh)."""
        if importlib.util.find_spec("bokeh") is None and self.cluster is not None:
            return None
        return self.client.dashboard_link

    def describe(self) -> str:
        kind = "embedded LocalCluster" if self.cluster is not None else "scheduler"
        return f"{kind} {self.client.scheduler.address} with {self.n_workers} workers"

    # -- running tasks ----------------------------------------------------------------

    def cache(self, shards: Sequence) -> list:
        """Load every shard once into worker memory; returns futures to pass as sources.

        Keys are new on every call: a key that a scheduler still knows (say, from an earlier
        training on this backend) would keep its old task and give that training's data."""
        workers = sorted(self._workers())
        self._call += 1
        return [
            self.client.submit(
                load_shard, shard, key=f"emdist-feats-{self._token}-{self._call}-{shard.index}",
                workers=[workers[i % len(workers)]] if workers else None,
                allow_other_workers=True, retries=RETRIES, pure=False,
            )
            for i, shard in enumerate(shards)
        ]

    def keep(self, func: Callable, sources: Sequence, *args: Any,
             on_done: Callable[[int], None] | None = None) -> list:
        """Run ``func(source, *args)`` next to each source and keep the results on the
        workers; returns once all are there. The arguments go to the scheduler once, as a
        task (not scattered), so a result lost with its worker is recomputed from its
        lineage."""
        self._call += 1
        name = getattr(func, "__name__", "task")
        held = self._send_args(name, args)
        workers = sorted(self._workers())
        futures = [
            self.client.submit(func, source, *held, retries=RETRIES, pure=False,
                               key=f"{name}-{self._token}-{self._call}-{j}",
                               **_placement(source, j, workers))
            for j, source in enumerate(sources)
        ]
        self._wait(futures, on_done)
        return futures

    def rebalance(self, sources: list) -> list:
        """Spread cached shards evenly again, e.g. after a dead worker's shards were rebuilt
        on a survivor and its replacement came back empty (``Client.rebalance`` does not
        move task results). Extra shards move worker to worker, not from disk.

        Cached shards only move when workers come or go, so while the workers are those
        of the last even spread, nothing is asked of the scheduler but its worker list."""
        workers = sorted(self._workers())
        if len(workers) < 2 or not sources:
            return sources
        state = (frozenset(workers), tuple(f.key for f in sources))
        if state == self._balanced:
            return sources
        holders = self.client.who_has(sources)
        load: dict[str, list[int]] = {w: [] for w in workers}
        for i, fut in enumerate(sources):
            where = sorted(holders.get(fut.key, ()))
            if where and where[0] in load:
                load[where[0]].append(i)
        target = -(-len(sources) // len(workers))  # ceil
        extra = [i for w in workers for i in load[w][target:]]
        moved = list(sources)
        self._call += 1
        call = self._call
        for i in extra:
            dest = min(workers, key=lambda w: len(load[w]))
            if len(load[dest]) >= target:
                break
            moved[i] = self.client.submit(
                _identity, sources[i], key=f"emdist-feats-moved-{self._token}-{call}-{i}",
                workers=[dest], allow_other_workers=True, pure=False,
            )
            load[dest].append(i)
        if extra:
            wait(moved)
        self._balanced = (frozenset(workers), tuple(f.key for f in moved))
        return moved

    def _send_args(self, name: str, args: Sequence) -> list:
        """The arguments of this call's tasks: small plain values as they are, the others
        (models, shard lists) each as the result of one task, which the scheduler can
        compute again if every copy is lost with its worker. The tasks carry their argument
        to the scheduler once; a model of more than Dask's large-graph threshold (10 MB)
        is no sign of a badly built graph here, so Dask's warning about it is not given."""
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "4GiB"}):
            return [a if _inline(a) else self.client.submit(
                        _identity, a, key=f"{name}-arg{i}-{self._token}-{self._call}",
                        pure=False)
                    for i, a in enumerate(args)]

    def _submit_all(self, func: Callable, sources: Sequence, args: Sequence) -> list:
        """One task per source, sent to the scheduler in one message."""
        self._call += 1
        name = getattr(func, "__name__", "task")
        shared = self._send_args(name, args)
        n = len(sources)
        keys = [f"{name}-{self._token}-{self._call}-{i}" for i in range(n)]
        futures = self.client.map(func, list(sources), *([a] * n for a in shared), key=keys,
                                  retries=RETRIES, pure=False)
        self._held = []  # the last pass's results: released behind these tasks
        return futures

    def _wait(self, futures: list, on_done: Callable[[int], None] | None) -> None:
        """Wait for every future, watching the cluster: a result lost with its worker
        ("lost") is waited for again while the scheduler computes it again; tasks stuck
        although workers are up are released (:func:`_unstick`); a cluster left without
        workers is waited for ``wait_timeout`` seconds, then the run fails naming the
        scheduler."""
        index = {f.key: i for i, f in enumerate(futures)}
        pending = list(futures)
        alone_since = None
        idle = 0  # polls in a row in which no task ended
        while pending:
            try:
                wait(pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            except Exception:  # noqa: BLE001 -- cancelled futures: judged below, by status
                pass
            still = []
            for fut in pending:
                if fut.status in ("pending", "lost"):
                    still.append(fut)
                elif fut.status == "finished" and on_done is not None:
                    on_done(index[fut.key])
            idle = idle + 1 if len(still) == len(pending) else 0
            pending = still
            if not pending:
                break
            alone_since = self._check_workers(alone_since)
            if alone_since is not None or idle < STALL_POLLS:
                continue
            idle = 0  # the scheduler is asked at most every STALL_POLLS polls
            self.client.run_on_scheduler(_unstick, self._token)
        self._raise_failures(futures)

    def _fetch(self, futures: list) -> list:
        """The results of ``futures``, waited for under :meth:`_wait`'s watch. A result
        lost with its worker after the wait is computed again, and the client's fetch
        waits for it without any watch (for ever, on a cluster that lost every worker):
        so a fetch that takes ``FETCH_SECONDS`` is given up and the futures are waited
        for again (the limit doubles each time, for results that are merely large)."""
        limit = FETCH_SECONDS

        async def gather():
            return await self.client.gather(futures, asynchronous=True)

        while True:
            self._wait(futures, None)
            try:
                return self.client.sync(gather, callback_timeout=limit)
            except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
                limit *= 2

    def _check_workers(self, alone_since: float | None) -> float | None:
        """None while the scheduler answers and has workers; else since when it does not,
        and :class:`ClusterLost` once that is ``wait_timeout`` seconds."""
        address = self._address
        connected = self.client.status == "running"
        if connected and self.client.scheduler_info().get("workers"):
            return None
        now = time.monotonic()
        if alone_since is None:
            what = "lost the connection to the scheduler" if not connected else "no workers"
            log.warning("the Dask cluster at %s: %s; waiting up to %g s (--wait-timeout)",
                        address, what, self.wait_timeout)
            return now
        if now - alone_since > self.wait_timeout:
            if not connected:
                raise self._lost_scheduler()
            raise ClusterLost(f"every worker of the Dask cluster at {address} was lost, and "
                              f"none came back within {self.wait_timeout:g} s (--wait-timeout)")
        return alone_since

    @staticmethod
    def _raise_failures(futures: list) -> None:
        failures = []
        for i, fut in enumerate(futures):
            if fut.status == "error":
                exc = fut.exception()
                tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
                failures.append(JobFailure(i, exc, tb))
            elif fut.status == "cancelled":
                # e.g. "lost dependencies": a scattered input died with its worker
                try:
                    fut.result()
                except FutureCancelledError as exc:
                    failures.append(JobFailure(i, exc, ""))
                    continue
                except Exception:  # cancelled some other way
                    pass
                failures.append(JobFailure(i, RuntimeFailure("task was cancelled"), ""))
        if failures:
            raise JobsFailed(failures, len(futures))

    def _retry_lost(self, run: Callable[[], Any]) -> Any:
        """Redo a pass whose tasks were cancelled (``lost dependencies``: an input that
        a caller scattered was lost with its worker); a lost scheduler is
        :class:`ClusterLost` once it has not come back within ``wait_timeout``."""
        for attempt in range(LOST_DATA_RETRIES + 1):
            try:
                return run()
            except JobsFailed as failed:
                lost = all(isinstance(f.error, FutureCancelledError) for f in failed.failures)
                if not lost or attempt == LOST_DATA_RETRIES:
                    raise
            except FutureCancelledError:
                if attempt == LOST_DATA_RETRIES:
                    raise
            except OSError:  # CommClosedError and the like: is the scheduler still there?
                if not self._scheduler_came_back():
                    raise self._lost_scheduler() from None
        raise AssertionError("unreachable")

    def _scheduler_came_back(self) -> bool:
        """After a connection error: wait up to ``wait_timeout`` while the client
        reconnects; True when it is connected again (or never lost the scheduler)."""
        deadline = time.monotonic() + self.wait_timeout
        settle = time.monotonic() + 2.0  # a broken stream is noticed within a moment
        lost = False
        while time.monotonic() < deadline:
            status = self.client.status
            if status == "running" and (lost or time.monotonic() > settle):
                return True
            if status in ("closing", "closed"):
                return False
            lost = lost or status != "running"
            time.sleep(0.1)
        return False

    def _lost_scheduler(self) -> ClusterLost:
        return ClusterLost(f"lost the connection to the Dask scheduler at {self._address}, "
                           f"and it did not come back within {self.wait_timeout:g} s "
                           "(--wait-timeout)")

    def map(self, func: Callable, sources: Sequence, *args: Any,
            on_done: Callable[[int], None] | None = None) -> list:
        def run():
            futures = self._submit_all(func, sources, args)
            self._wait(futures, on_done)
            results = self._fetch(futures)
            raise_bad_data(results)
            return results

        return self._retry_lost(run)

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8,
                   on_done: Callable[[int], None] | None = None):
        hold = len(sources) * _nbytes(args) <= HOLD_BYTES
        return self._retry_lost(
            lambda: self._map_reduce(func, sources, args, fan_in, on_done, hold))

    def _map_reduce(self, func, sources, args, fan_in, on_done, hold=False):
        futures = self._submit_all(func, sources, args)
        level, depth, tree = futures, 0, []
        while len(level) > 1:
            depth += 1
            groups = [level[i : i + fan_in] for i in range(0, len(level), fan_in)]
            level = [
                g[0] if len(g) == 1 else self.client.submit(
                    reduce_group, *g, key=f"reduce-{self._token}-{self._call}-{depth}-{j}",
                    retries=RETRIES, pure=False)
                for j, g in enumerate(groups)
            ]
            tree += level
        if hold:
            # Released only once the next pass's tasks are sent: the client sends its
            # messages at most every 10 ms, so releases sent as this pass ends would hold
            # the next pass's tasks back.
            self._held = futures + tree
        self._wait(futures, on_done)
        if len(tree):
            self._wait(tree, None)
        result = self._fetch(level[:1])[0]
        raise_bad_data([result], total=len(sources), by_job=True)
        return result

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
