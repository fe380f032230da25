"""Gaussian mixture models: an immutable value of weights, means and covariances.

Everything that scores frames goes through a :class:`emdist.models.kernel.Kernel`, the per-model
constants computed once, so that the log-likelihoods of a chunk of frames are one matrix
product (see :mod:`emdist.models.kernel`); the same expanded features give the statistics with one
more product (:mod:`emdist.models.estep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emdist.errors import UserError
from emdist.models.kernel import (  # noqa: F401 -- re-exported: the model's numerics
    LOG_2PI,
    Kernel,
    check_finite,
    expand_features,
    packed_indices,
)

COVARIANCE_TYPES = ("diag", "full")


@dataclass(frozen=True, eq=False)
class GMM:
    """A Gaussian mixture model.

    Parameters
    ----------
    weights : ndarray of shape (K,)
        Mixture weights, summing to one.
    means : ndarray of shape (K, D)
    covariances : ndarray of shape (K, D) or (K, D, D)
        Variances for ``"diag"``, covariance matrices for ``"full"``.
    covariance_type : {"diag", "full"}
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str

    kind = "gmm"  # the model kind (emdist.models.kind), not a field

    def __post_init__(self) -> None:
        if self.covariance_type not in COVARIANCE_TYPES:
            raise UserError(
                f"unknown covariance type {self.covariance_type!r}; use 'diag' or 'full'"
            )
        for name in ("weights", "means", "covariances"):
            arr = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        k, d = self.means.shape
        want = (k, d) if self.covariance_type == "diag" else (k, d, d)
        if self.weights.shape != (k,) or self.covariances.shape != want:
            raise ValueError(
                f"inconsistent GMM shapes: weights {self.weights.shape}, means "
                f"{self.means.shape}, covariances {self.covariances.shape} (expected {want})"
            )

    @property
    def n_components(self) -> int:
        """Number of Gaussians K."""
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.means.shape[1])

    def variances(self) -> np.ndarray:
        """Per-dimension variances, shape (K, D) (the diagonal of full covariances)."""
        if self.covariance_type == "diag":
            return self.covariances
        return np.ascontiguousarray(np.diagonal(self.covariances, axis1=1, axis2=2))

    def kernel(self, dtype=np.float64, shift: np.ndarray | None = None) -> Kernel:
        """Per-model constants for scoring frames (see :class:`Kernel`)."""
        return Kernel.from_gmm(self, dtype=dtype, shift=shift)

    def log_likelihood(self, frames: np.ndarray) -> np.ndarray:
        """Per-frame log-likelihood log p(x_t), shape (N,), in float64."""
        return self.kernel().frame_log_likelihood(frames)

    def __repr__(self) -> str:
        return f"GMM(K={self.n_components}, D={self.dim}, covariance_type={self.covariance_type!r})"
