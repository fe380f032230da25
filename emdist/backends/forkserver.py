"""Worker processes of an embedded cluster come from a fork server, where there is one.

Dask starts each worker process with ``spawn`` by default: a new interpreter that imports
``distributed``, numpy and emdist again, one per worker (about 0.2 s of CPU each, 8 workers
on 2 cores took 1.8 s to start and 0.5 s to stop). A fork server imports them once and forks
every worker from itself, so starting 8 workers takes about as long as starting one.

This module does not import ``distributed``: the CLI starts the fork server first thing, so
its imports run in another process while the driver imports its own and reads the data dir.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os

# What every worker imports: preloaded once in the fork server.
PRELOAD = ("distributed", "numpy", "emdist.tasks")

# A forked worker keeps the environment of the fork server: it starts with these (unless
# the user set them). Dask's nannies set the thread counts before starting a worker
# (distributed.nanny.pre-spawn-environ). The glibc malloc thresholds are the values glibc
# itself grows to (32 MB mmap, twice that trim) once large blocks have been freed; set from
# the start, E-step temporaries (MBs each) are reused instead of mapped and page-faulted
# anew, whatever the order of a worker's first allocations (left to glibc, some workers ran
# the E-step 25 % slower than others, depending on that order).
_WORKER_ENVIRON = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                   "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}


def available() -> bool:
    """Whether this platform has a fork server (not on Windows)."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def start(*extra: str) -> bool:
    """Start the fork server now, unless it runs already, with ``PRELOAD`` and ``extra``
    (say the driver's ``__main__`` package, which every worker imports again) imported in
    it; returns at once (the server imports in the background) and whether there is one."""
    if not available():
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload([*PRELOAD, *extra])
    saved = {k: os.environ.get(k) for k in _WORKER_ENVIRON}
    os.environ.update({k: v for k, v in _WORKER_ENVIRON.items() if saved[k] is None})
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
    return True
