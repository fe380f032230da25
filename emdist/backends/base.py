"""The backend interface and its failure type."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from emdist.tasks import BadData


@dataclass(frozen=True)
class JobFailure:
    """A shard whose task raised (after any retries)."""

    index: int
    error: BaseException
    traceback: str


class JobsFailed(Exception):
    """Some shards failed; ``failures`` lists them in shard order."""

    def __init__(self, failures: list[JobFailure], total: int) -> None:
        super().__init__(f"{len(failures)} / {total} jobs failed")
        self.failures = failures
        self.total = total


def raise_bad_data(results: Sequence, total: int | None = None, by_job: bool = False) -> None:
    """Raise :class:`JobsFailed` for the :class:`~emdist.tasks.BadData` among ``results``:
    task results in shard order, or (``by_job``) tree-sum results, whose job names the
    shard."""
    failures = [JobFailure(r.job - 1 if by_job else i, r.error, r.traceback)
                for i, r in enumerate(results) if isinstance(r, BadData)]
    if failures:
        raise JobsFailed(failures, len(results) if total is None else total)


class Backend(Protocol):
    """Runs shard tasks; results come back in shard order.

    ``sources`` are shards, or what :meth:`cache` returned for them. ``on_done(i)`` is
    called as shard ``i`` finishes (for progress only: results never depend on order).
    """

    name: str

    def cache(self, shards: Sequence) -> list:
        """Load shards once and keep them in (worker) memory; returns sources."""

    def keep(self, func: Callable, sources: Sequence, *args: Any,
             on_done: Callable[[int], None] | None = None) -> list:
        """``func(source, *args)`` per source, each result kept where it was computed (next
        to its source) for later tasks; returns handles to pass as (parts of) sources once
        every result is there."""

    def rebalance(self, sources: list) -> list:
        """Spread cached shards evenly over the workers again; returns the new sources."""

    def memory_capacity(self) -> int:
        """Memory the cache may use at most twice over, in bytes."""

    def check_paths(self, paths: Sequence[str]) -> None:
        """Raise if a worker cannot read one of ``paths``."""

    def map(self, func: Callable, sources: Sequence, *args: Any,
            on_done: Callable[[int], None] | None = None) -> list:
        """``[func(source, *args) for source in sources]``."""

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8,
                   on_done: Callable[[int], None] | None = None):
        """``tree_sum`` of ``func(source, *args)`` over sources with ``reduce_group``."""

    def dashboard_link(self) -> str | None:
        """Where to watch the run, if anywhere."""

    def close(self) -> None:
        """Release the backend's resources."""
