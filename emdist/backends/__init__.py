"""Backends run "a task on every shard" and return the results in shard order.

``SerialBackend`` runs in process; ``DaskBackend`` (imported lazily, the only module that
imports ``distributed``) runs on an embedded LocalCluster or an existing scheduler. Both
reduce statistics with the same tree (:func:`emdist.models.stats.tree_sum`), so they return the
same bits.
"""

from __future__ import annotations

from emdist.backends.base import Backend, JobFailure, JobsFailed
from emdist.backends.serial import SerialBackend

__all__ = ["Backend", "JobFailure", "JobsFailed", "SerialBackend"]
