"""The in-process backend: shards one after the other, same tree sum as Dask."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

from emdist.backends.base import JobFailure, JobsFailed
from emdist.errors import EmdistError
from emdist.stats import tree_sum
from emdist.tasks import reduce_group


class SerialBackend:
    """Run every shard task in this process (``--workers 0``)."""

    name = "serial"
    n_workers = 0

    def map(self, func: Callable, sources: Sequence, *args: Any) -> list:
        results, failures = [], []
        for i, source in enumerate(sources):
            try:
                results.append(func(source, *args))
            except (EmdistError, OSError, ValueError, FloatingPointError) as exc:
                failures.append(JobFailure(i, exc, traceback.format_exc()))
        if failures:
            raise JobsFailed(failures, len(sources))
        return results

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8):
        results = self.map(func, sources, *args)
        return tree_sum(results, add=lambda a, b: reduce_group(a, b), fan_in=fan_in)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "in process"
