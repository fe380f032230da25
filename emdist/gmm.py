"""Gaussian mixture models and their log-densities, in the log domain.

A :class:`GMM` is an immutable value: weights, means and covariances with a covariance
type (``"diag"`` or ``"full"``). Everything that scores frames goes through a
:class:`Kernel`, the per-model constants computed once (Kaldi's ``ComputeGconsts``), so that
the log-likelihood of a chunk of frames is a single matrix product:

* diagonal: ``L = [X, X²] @ W + gconst`` with ``W = [μ/σ² ; -½/σ²]ᵀ``;
* full: ``L = [X, vech(x xᵀ)] @ W + gconst`` with ``W = [Λμ ; -½ c(Λ)]ᵀ``, where
  ``Λ = Σ⁻¹`` and ``c(Λ)`` holds ``Λᵢᵢ`` on the diagonal and ``2Λᵢⱼ`` off it, in the packed
  upper-triangle order of :func:`packed_indices`.

The same expanded features ``[X, X²]`` or ``[X, vech(x xᵀ)]`` give the first and second
order statistics with one more product (``respᵀ @ features``), see :mod:`emdist.estep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from emdist.errors import UserError

COVARIANCE_TYPES = ("diag", "full")
LOG_2PI = float(np.log(2.0 * np.pi))


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


@lru_cache(maxsize=8)
def packed_indices(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the upper triangle (i <= j), row-major, length D(D+1)/2."""
    rows, cols = np.triu_indices(dim)
    return rows.astype(np.intp), cols.astype(np.intp)


def expand_features(frames: np.ndarray, covariance_type: str, out: np.ndarray | None = None):
    """The features whose products give log-likelihoods and statistics.

    Parameters
    ----------
    frames : ndarray of shape (N, D)
    covariance_type : {"diag", "full"}
    out : ndarray of shape (N, E), optional
        Buffer to fill, of the frames' dtype.

    Returns
    -------
    ndarray of shape (N, 2D) for diag (``[x, x²]``) or (N, D + D(D+1)/2) for full
    (``[x, vech(x xᵀ)]``).
    """
    n, d = frames.shape
    width = 2 * d if covariance_type == "diag" else d + d * (d + 1) // 2
    if out is None:
        out = np.empty((n, width), dtype=frames.dtype)
    out[:, :d] = frames
    if covariance_type == "diag":
        np.multiply(frames, frames, out=out[:, d:])
    else:
        pos = d
        for i in range(d):  # D broadcast products of (N, 1) by (N, D - i): row i of vech
            np.multiply(frames[:, i : i + 1], frames[:, i:], out=out[:, pos : pos + d - i])
            pos += d - i
    return out


def _cholesky(cov: np.ndarray, k: int) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise UserError(
            f"covariance of Gaussian {k} is not positive definite; raise the variance floor "
            "(or reg_covar), or use fewer Gaussians"
        ) from None


@dataclass(frozen=True, eq=False)
class Kernel:
    """Per-model constants: log-likelihoods of a chunk are ``expand(X - shift) @ W + gconst``.

    Attributes
    ----------
    weight_matrix : ndarray of shape (E, K)
        ``W`` in the compute dtype, E being the expanded feature width.
    gconst : ndarray of shape (K,)
        Per-component constants (log weight, normaliser, quadratic term of the mean), in
        the compute dtype.
    shift : ndarray of shape (D,)
        The frames are centred by this vector before the product (zero for the float64
        reference path); the model constants are expressed around it.
    covariance_type : str
    """

    weight_matrix: np.ndarray
    gconst: np.ndarray
    shift: np.ndarray
    covariance_type: str

    @property
    def augmented(self) -> np.ndarray:
        """``[gconst; W]``, shape (1 + E, K): log-likelihoods of ``[1, expanded]`` rows."""
        aug = self.__dict__.get("_augmented")
        if aug is None:
            aug = np.ascontiguousarray(np.vstack([self.gconst[None, :], self.weight_matrix]))
            object.__setattr__(self, "_augmented", aug)
        return aug

    @classmethod
    def from_gmm(cls, gmm: GMM, dtype=np.float64, shift: np.ndarray | None = None) -> Kernel:
        d = gmm.dim
        shift = np.zeros(d) if shift is None else np.asarray(shift, dtype=np.float64)
        means = gmm.means - shift
        with np.errstate(divide="ignore"):
            log_w = np.log(gmm.weights)
        if gmm.covariance_type == "diag":
            var = gmm.covariances
            if not np.all(var > 0):
                raise UserError("a variance is not positive; raise the variance floor")
            inv_var = 1.0 / var
            w = np.concatenate([means * inv_var, -0.5 * inv_var], axis=1).T
            gconst = log_w - 0.5 * (
                d * LOG_2PI + np.log(var).sum(1) + (means * means * inv_var).sum(1)
            )
        else:
            rows, cols = packed_indices(d)
            k = gmm.n_components
            prec = np.empty((k, d, d))
            logdet = np.empty(k)
            eye = np.eye(d)
            for c in range(k):  # K small (D x D) factorisations, not a per-frame loop
                chol = _cholesky(gmm.covariances[c], c)
                inv_chol = np.linalg.solve(chol, eye)
                prec[c] = inv_chol.T @ inv_chol
                logdet[c] = 2.0 * np.log(np.diagonal(chol)).sum()
            prec_mean = np.einsum("kij,kj->ki", prec, means)
            quad = prec[:, rows, cols] * np.where(rows == cols, -0.5, -1.0)
            w = np.concatenate([prec_mean, quad], axis=1).T
            gconst = log_w - 0.5 * (d * LOG_2PI + logdet + (prec_mean * means).sum(1))
        return cls(
            weight_matrix=np.ascontiguousarray(w, dtype=dtype),
            gconst=np.asarray(gconst, dtype=dtype),
            shift=shift,
            covariance_type=gmm.covariance_type,
        )

    @property
    def dtype(self) -> np.dtype:
        return self.weight_matrix.dtype

    @property
    def n_components(self) -> int:
        return int(self.weight_matrix.shape[1])

    def component_log_likelihood(self, expanded: np.ndarray, out=None) -> np.ndarray:
        """``log w_k + log N(x_t; μ_k, Σ_k)`` for expanded features, shape (N, K)."""
        out = np.matmul(expanded, self.weight_matrix, out=out)
        out += self.gconst
        return out

    def frame_log_likelihood(self, frames: np.ndarray, chunk_size: int = 4096) -> np.ndarray:
        """Per-frame ``log p(x_t)``, shape (N,), float64, computed chunk by chunk."""
        frames = np.asarray(frames)
        shift = self.shift.astype(self.dtype)
        result = np.empty(len(frames))
        for start in range(0, len(frames), chunk_size):
            x = np.asarray(frames[start : start + chunk_size], dtype=self.dtype) - shift
            expanded = expand_features(x, self.covariance_type)
            log_like = self.component_log_likelihood(expanded)
            result[start : start + len(x)] = log_sum_exp_rows(log_like)
        return result


def check_finite(row_max: np.ndarray) -> None:
    """NaN is an error (as in Kaldi), never a silent score."""
    if not np.all(np.isfinite(row_max)):
        raise FloatingPointError(
            "non-finite log-likelihood: NaN or inf in the features or the model"
        )


def log_sum_exp_rows(log_like: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp, float64, shape (N,). Leaves the input unchanged."""
    top = log_like.max(axis=1)
    check_finite(top)
    with np.errstate(under="ignore", invalid="ignore"):
        total = np.exp(log_like - top[:, None]).sum(axis=1)
    return top.astype(np.float64) + np.log(total.astype(np.float64))
