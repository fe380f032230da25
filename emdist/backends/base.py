"""The backend interface and its failure type."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


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


class Backend(Protocol):
    """Runs shard tasks; results come back in shard order."""

    name: str

    def map(self, func: Callable, sources: Sequence, *args: Any) -> list:
        """``[func(source, *args) for source in sources]``."""

    def map_reduce(self, func: Callable, sources: Sequence, *args: Any, fan_in: int = 8):
        """``tree_sum`` of ``func(source, *args)`` over sources with ``reduce_group``."""

    def close(self) -> None:
        """Release the backend's resources."""
