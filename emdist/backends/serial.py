"""The in-process backend: shards one after the other, same tree sum as Dask."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from emdist.backends.base import JobFailure, JobsFailed, raise_bad_data
from emdist.errors import EmdistError
from emdist.models.stats import tree_sum
from emdist.tasks import load_shard, reduce_group


class SerialBackend:
    """Run every shard task in this process (``--workers 0``)."""

    name = "serial"
    n_workers = 0

    def cache(self, shards: Sequence) -> list:
        """Read every shard into memory once."""
        return self.map(load_shard, shards)

    def keep(self, func: Callable, sources: Sequence, *args: Any,
             on_done: Callable[[int], None] | None = None) -> list:
        """Compute and hold the results in this process."""
        return self.map(func, sources, *args, on_done=on_done)

    def rebalance(self, sources: list) -> list:
        """Nothing to spread: everything is in this process."""
        return sources

    def memory_capacity(self) -> int:
        """Physical memory of this machine, in bytes."""
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def check_paths(self, paths: Sequence[str]) -> None:
        """Nothing to check: the data dir was read in this process."""

    def map(self, func: Callable, sources: Sequence, *args: Any,
            on_done: Callable[[int], None] | None = None) -> list:
        results, failures = [], []
        for i, source in enumerate(sources):
            try:
                results.append(func(source, *args))
            except (EmdistError, OSError, ValueError, FloatingPointError) as exc:
                failures.append(JobFailure(i, exc, traceback.format_exc()))
                continue
            if on_done is not None:
                on_done(i)
        if failures:
            raise JobsFailed(failures, len(sources))
        raise_bad_data(results)
        return results

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8,
                   on_done: Callable[[int], None] | None = None):
        results = self.map(func, sources, *args, on_done=on_done)
        return tree_sum(results, add=reduce_group, fan_in=fan_in)

    def dashboard_link(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "in process"
