"""Sufficient statistics of a GMM: additive float64 values.

For every component k, over the frames x_t with posteriors γ_tk::

    zeroth[k] = Σ_t γ_tk
    first[k]  = Σ_t γ_tk x_t
    second[k] = Σ_t γ_tk x_t²        (diag, shape (K, D))
              = Σ_t γ_tk x_t x_tᵀ    (full, shape (K, D, D))

plus the total log-likelihood and the frame count. The statistics of two sets of frames
add up to the statistics of their union, so shards are reduced by ``+`` (always in the
same order, see :func:`tree_sum`) and the M-step sees one value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_ARRAYS = ("zeroth", "first", "second")


@dataclass(frozen=True, eq=False)
class GmmStats:
    """Zeroth, first and second order statistics, log-likelihood and frame count.

    Parameters
    ----------
    zeroth : ndarray of shape (K,)
    first : ndarray of shape (K, D)
    second : ndarray of shape (K, D) or (K, D, D)
        Uncentred second-order sums: diagonal or full.
    loglike : float
        Total log-likelihood of the frames under the model that produced the posteriors.
    frames : int
    """

    zeroth: np.ndarray
    first: np.ndarray
    second: np.ndarray
    loglike: float = 0.0
    frames: int = 0

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            arr = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
            object.__setattr__(self, name, arr)
        k, d = self.first.shape
        if self.zeroth.shape != (k,) or self.second.shape not in ((k, d), (k, d, d)):
            raise ValueError(
                f"inconsistent stats shapes {self.zeroth.shape}, {self.first.shape}, "
                f"{self.second.shape}"
            )
        object.__setattr__(self, "loglike", float(self.loglike))
        object.__setattr__(self, "frames", int(self.frames))

    @classmethod
    def zero(cls, n_components: int, dim: int, covariance_type: str) -> GmmStats:
        """The neutral element of ``+``."""
        second = (n_components, dim) if covariance_type == "diag" else (n_components, dim, dim)
        return cls(np.zeros(n_components), np.zeros((n_components, dim)), np.zeros(second))

    @property
    def covariance_type(self) -> str:
        return "diag" if self.second.ndim == 2 else "full"

    @property
    def n_components(self) -> int:
        return int(self.zeroth.shape[0])

    @property
    def occupancy(self) -> float:
        """Total posterior mass (the frames counted)."""
        return float(self.zeroth.sum())

    @property
    def dim(self) -> int:
        return int(self.first.shape[1])

    def __add__(self, other: GmmStats) -> GmmStats:
        if not isinstance(other, GmmStats):
            return NotImplemented
        if other.second.shape != self.second.shape:
            raise ValueError(
                f"cannot add statistics of shapes {self.second.shape} and {other.second.shape} "
                "(statistics of different models?)"
            )
        return GmmStats(
            self.zeroth + other.zeroth,
            self.first + other.first,
            self.second + other.second,
            self.loglike + other.loglike,
            self.frames + other.frames,
        )

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays for an ``.npz`` file (see :mod:`emdist.io.modelio`)."""
        out = {prefix + name: getattr(self, name) for name in _ARRAYS}
        out[prefix + "loglike"] = np.array(self.loglike)
        out[prefix + "frames"] = np.array(self.frames, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> GmmStats:
        return cls(
            *(arrays[prefix + name] for name in _ARRAYS),
            loglike=float(arrays[prefix + "loglike"]),
            frames=int(arrays[prefix + "frames"]),
        )


StatsMap = dict[str, GmmStats]
"""Statistics of several models keyed by label (one per word; ``global`` for a UBM)."""


def add_maps(a: Mapping[str, GmmStats], b: Mapping[str, GmmStats]) -> StatsMap:
    """Label-wise sum of two statistics maps; a label missing on one side counts as zero."""
    out = dict(a)
    for label, stats in b.items():
        out[label] = out[label] + stats if label in out else stats
    return dict(sorted(out.items()))


def tree_sum(items: Sequence, add=add_maps, fan_in: int = 8):
    """Sum ``items`` in a tree shaped by their indices only.

    Groups of ``fan_in`` consecutive items are added left to right, then groups of those
    sums, and so on. Every backend reduces with this shape, so floating-point results are
    the same bits however the work was distributed.
    """
    if not items:
        raise ValueError("nothing to sum")
    level = list(items)
    while len(level) > 1:
        level = [sum_group(level[i : i + fan_in], add) for i in range(0, len(level), fan_in)]
    return level[0]


def sum_group(group: Sequence, add=add_maps):
    """Left-to-right sum of one group of a :func:`tree_sum` level."""
    total = group[0]
    for item in group[1:]:
        total = add(total, item)
    return total
