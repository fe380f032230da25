"""Per-model constants and the posterior pipeline of a chunk of frames, in the log domain.

A :class:`Kernel` holds what scoring needs, computed once per model (Kaldi's
``ComputeGconsts``): the log-likelihoods of a chunk of frames are one matrix product of the
expanded features ``[1, x, x²]`` (diagonal) or ``[1, x, vech(x xᵀ)]`` (full) with
``[gconst; W]``, ``W = [μ/σ²; -½/σ²]`` or ``[Λμ; -½ c(Λ)]`` (``Λ = Σ⁻¹``, ``c(Λ)`` holding
``Λᵢᵢ`` and ``2Λᵢⱼ`` in the order of :func:`packed_indices`).

The hot path keeps expanded frames as columns (``rows`` of shape (P, n)): ``L = A @ rows``
is a (K, n) matrix whose per-frame maximum, normaliser and exponential are fast vectorised
passes along its contiguous rows. Three choices keep it exact and fast:

* **log2 units, flushed tails.** ``A`` is scaled by log2(e), so posteriors are ``exp2``.
  Log-posteriors more than :data:`FLUSH_BITS` (82, i.e. 2⁻⁸² ≈ 2.1e-25 ≈ e^-56.8) below
  the frame's best become exact zeros before ``exp2``: neither ``exp2`` nor the products
  ever see a subnormal number (which many CPUs process 10-100× slower), and what is
  dropped is below float64 resolution of the frame's total.
* **A common offset** (float32 path). A vector ``c`` (the weighted median of the columns
  of ``[gconst; W]``, on gconst and the linear terms) is subtracted from every column;
  ``rows·c`` is the same for every component of a frame, so posteriors do not change, but
  the products' partial sums stay small and float32 loses half as much. The frame
  log-likelihood adds ``rows·c`` back (as a float32 (hi, lo) pair summed in float64).
* **Padded width.** ``rows`` has a multiple of 16 rows (zeros past the expansion) so that
  the products run on the fast path of BLAS kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from emdist.errors import UserError

LOG_2PI = float(np.log(2.0 * np.pi))
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
FLUSH_BITS = 82
"""Posteriors below 2**-FLUSH_BITS of the frame's best (about e^-56.8) are exact zeros."""
FLUSH_FLOOR = 2.0**-FLUSH_BITS
LANES = 16
"""Expanded widths are padded to a multiple of this (one 64-byte vector of float32)."""


@lru_cache(maxsize=8)
def packed_indices(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the upper triangle (i <= j), row-major, length D(D+1)/2."""
    rows, cols = np.triu_indices(dim)
    return rows.astype(np.intp), cols.astype(np.intp)


def expanded_width(dim: int, covariance_type: str) -> int:
    """E: 2D for ``[x, x²]``, D + D(D+1)/2 for ``[x, vech(x xᵀ)]``."""
    return 2 * dim if covariance_type == "diag" else dim + dim * (dim + 1) // 2


def padded_width(dim: int, covariance_type: str) -> int:
    """Rows of the hot path's expansion: ``1 + E`` rounded up to a multiple of :data:`LANES`."""
    return -(-(1 + expanded_width(dim, covariance_type)) // LANES) * LANES


def expand_features(frames: np.ndarray, covariance_type: str, out: np.ndarray | None = None):
    """The expanded features ``[x, x²]`` or ``[x, vech(x xᵀ)]``, frames as rows.

    Parameters
    ----------
    frames : ndarray of shape (N, D)
    covariance_type : {"diag", "full"}
    out : ndarray of shape (N, E), optional

    Returns
    -------
    ndarray of shape (N, E), E from :func:`expanded_width`
    """
    n, d = frames.shape
    if out is None:
        out = np.empty((n, expanded_width(d, covariance_type)), dtype=frames.dtype)
    out[:, :d] = frames
    _expand(out.T, d, covariance_type)
    return out


def expand_rows(rows: np.ndarray, dim: int, covariance_type: str) -> None:
    """Fill ``rows[1 + D : 1 + E]`` from ``rows[1 : 1 + D]`` (frames as columns), in place."""
    _expand(rows[1 : 1 + expanded_width(dim, covariance_type)], dim, covariance_type)


def _expand(out: np.ndarray, d: int, covariance_type: str) -> None:
    """Fill ``out[D:]`` with the squares or packed products of ``x = out[:D]`` (D, n)."""
    x = out[:d]
    if covariance_type == "diag":
        np.multiply(x, x, out=out[d : 2 * d])
        return
    pos = d
    for i in range(d):  # D broadcast products of (1, n) by (D - i, n): row i of vech
        np.multiply(x[i : i + 1], x[i:], out=out[pos : pos + d - i])
        pos += d - i


def _cholesky(cov: np.ndarray, k: int) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise UserError(
            f"covariance of Gaussian {k} is not positive definite; raise the variance floor "
            "(or reg_covar), or use fewer Gaussians"
        ) from None


def natural_parameters(gmm, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W, gconst)`` in float64 for frames centred on ``shift``: shapes (E, K) and (K,)."""
    d = gmm.dim
    means = gmm.means - shift
    with np.errstate(divide="ignore"):
        log_w = np.log(gmm.weights)
    if gmm.covariance_type == "diag":
        var = gmm.covariances
        if not np.all(var > 0):
            raise UserError("a variance is not positive; raise the variance floor")
        inv_var = 1.0 / var
        w = np.concatenate([means * inv_var, -0.5 * inv_var], axis=1).T
        gconst = log_w - 0.5 * (d * LOG_2PI + np.log(var).sum(1) + (means * means * inv_var).sum(1))
        return w, gconst
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
    return w, gconst


@dataclass(frozen=True, eq=False)
class Kernel:
    """Per-model constants for scoring frames.

    Attributes
    ----------
    weight_matrix : ndarray of shape (E, K)
        ``W`` in the compute dtype, natural units (for references and tests).
    gconst : ndarray of shape (K,)
        Per-component constants (log weight, normaliser, quadratic term of the mean).
    shift : ndarray of shape (D,)
        Frames are centred by this vector before the products; constants are expressed
        around it.
    covariance_type : str
    fast : ndarray of shape (K, P)
        The hot path's matrix: ``log2(e) · ([gconst; W] - offset)``, zero-padded to
        ``P = padded_width`` columns, tiny values flushed to zero.
    offset : ndarray of shape (P,), float64
        The common offset ``c`` (natural units): a frame's log-likelihood adds ``rows·c``.
    """

    weight_matrix: np.ndarray
    gconst: np.ndarray
    shift: np.ndarray
    covariance_type: str
    fast: np.ndarray
    offset: np.ndarray

    @classmethod
    def from_gmm(cls, gmm, dtype=np.float64, shift: np.ndarray | None = None,
                 common_offset: bool = False) -> Kernel:
        """Constants of ``gmm`` (a :class:`emdist.models.gmm.GMM`) in ``dtype``, around ``shift``;
        with ``common_offset``, less the weighted median column (the float32 fast path)."""
        dtype = np.dtype(dtype)
        shift = np.zeros(gmm.dim) if shift is None else np.asarray(shift, dtype=np.float64)
        w, gconst = natural_parameters(gmm, shift)
        augmented = np.vstack([gconst[None, :], w])  # (1 + E, K), float64
        offset = np.zeros(padded_width(gmm.dim, gmm.covariance_type))
        if common_offset:  # on gconst and the linear terms: as good as all, and cheap
            offset[: 1 + gmm.dim] = weighted_median(augmented[: 1 + gmm.dim], gmm.weights)
        fast = np.zeros((gmm.n_components, len(offset)), dtype=dtype)
        fast[:, : len(augmented)] = (LOG2E * (augmented - offset[: len(augmented), None])).T
        fast[np.abs(fast) < np.finfo(dtype).tiny] = 0.0  # no subnormal constant either
        return cls(
            weight_matrix=np.ascontiguousarray(w, dtype=dtype),
            gconst=np.asarray(gconst, dtype=dtype),
            shift=shift,
            covariance_type=gmm.covariance_type,
            fast=fast,
            offset=offset,
        )

    @property
    def dtype(self) -> np.dtype:
        return self.weight_matrix.dtype

    @property
    def n_components(self) -> int:
        return int(self.weight_matrix.shape[1])

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    @property
    def width(self) -> int:
        """P, the padded number of rows of the hot path's expansion."""
        return int(self.fast.shape[1])

    def component_log_likelihood(self, expanded: np.ndarray, out=None) -> np.ndarray:
        """``log w_k + log N(x_t; μ_k, Σ_k)`` for expanded features (N, E): shape (N, K).

        The plain product in natural units (a reference; the hot path is :class:`Rows`).
        """
        out = np.matmul(expanded, self.weight_matrix, out=out)
        out += self.gconst
        return out

    def frame_log_likelihood(self, frames: np.ndarray, chunk_size: int = 4096) -> np.ndarray:
        """Per-frame ``log p(x_t)``, shape (N,), float64, computed chunk by chunk."""
        return Scorer(self, min(chunk_size, max(len(frames), 1))).frame_log_likelihood(frames)


class Scorer:
    """Per-frame log-likelihoods of one model, with buffers reused from call to call."""

    def __init__(self, kernel: Kernel, chunk_size: int) -> None:
        self.rows = Rows(kernel, chunk_size)
        self._log_like = np.empty((kernel.n_components, chunk_size), dtype=kernel.dtype)

    def frame_log_likelihood(self, frames: np.ndarray) -> np.ndarray:
        """``log p(x_t)`` of frames (N, D), shape (N,), float64."""
        frames = np.asarray(frames)
        rows, step = self.rows, self.rows.capacity
        result = np.empty(len(frames))
        for start in range(0, len(frames), step):
            n = rows.load(frames[start : start + step])
            offset = rows.offsets(n)
            top, total = posteriors(rows.kernel, rows.block(n), self._log_like[:, :n])
            result[start : start + n] = offset + LN2 * (top + np.log2(total, dtype=np.float64))
        return result


class StackedScorer:
    """Total log-likelihoods of utterances under several models at once (the recognizer):
    each chunk of frames is expanded once and scored by one product with the models'
    stacked constants, where one :class:`Scorer` per model would expand it once per model.

    The models' kernels must share their layout (dtype, covariance type, dimension, shift
    and common offset: the float64 kernels of :func:`emdist.models.estep.make_kernel` do);
    :meth:`fits` says whether they do. A model with fewer Gaussians than the largest is
    padded with Gaussians whose log-likelihood is far below any other, so they are flushed
    to exact zeros and change nothing.
    """

    def __init__(self, kernels, chunk_size: int) -> None:
        if not self.fits(kernels):
            raise ValueError("kernels of different layouts cannot be stacked")
        first = kernels[0]
        self.n_models = len(kernels)
        self.k = max(k.n_components for k in kernels)
        fast = np.zeros((self.n_models * self.k, first.width), dtype=first.dtype)
        for m, kernel in enumerate(kernels):
            at = m * self.k
            fast[at : at + kernel.n_components] = kernel.fast
            fast[at + kernel.n_components : at + self.k, 0] = _ABSENT
        self.fast = fast
        capacity = max(1, min(chunk_size, STACK_ENTRIES // len(fast)))
        self.rows = Rows(first, capacity)
        self._log_like = np.empty((self.n_models, self.k, capacity), dtype=first.dtype)

    @staticmethod
    def fits(kernels) -> bool:
        """Whether ``kernels`` share the layout that stacking needs."""
        if not kernels:
            return False
        first = kernels[0]
        return all(k.dtype == first.dtype and k.covariance_type == first.covariance_type
                   and k.width == first.width and np.array_equal(k.shift, first.shift)
                   and np.array_equal(k.offset, first.offset) for k in kernels)

    def totals(self, frames: np.ndarray) -> np.ndarray:
        """``Σ_t log p_m(x_t)`` of frames (N, D) under each model m: shape (M,), float64."""
        frames = np.asarray(frames)
        rows, step = self.rows, self.rows.capacity
        totals = np.zeros(self.n_models)
        for start in range(0, len(frames), step):
            n = rows.load(frames[start : start + step])
            offset = rows.offsets(n)
            out = self._log_like[:, :, :n]
            np.matmul(self.fast, rows.block(n), out=out.reshape(-1, n))
            top, total = posteriors_of(out)  # (M, n) each
            frame = offset + LN2 * (top + np.log2(total, dtype=np.float64))
            totals += frame.sum(axis=1)
        return totals


STACK_ENTRIES = 1 << 22
"""Scores per chunk of a :class:`StackedScorer` at most (32 MiB in float64)."""
_ABSENT = -(2.0**60)
"""The log2-constant of a padding Gaussian in :class:`StackedScorer`: at least 2⁶⁰ below
any real Gaussian's log2-likelihood, it is flushed to an exact zero."""


class Rows:
    """A reusable (P, capacity) buffer of expanded frames as columns: ``[1; x; x²; 0...]``.

    Frames are centred on the kernel's shift in its dtype; with the shift on a grid of
    2⁻¹⁰ and never zero (see :func:`grid_shift`), a centred float32 value is zero or at
    least 2⁻³⁴ in magnitude, so squares and products stay normal numbers.
    """

    def __init__(self, kernel: Kernel, capacity: int) -> None:
        self.kernel = kernel
        self.capacity = capacity
        self.data = np.zeros((kernel.width, capacity), dtype=kernel.dtype)
        self.data[0] = 1.0
        self._centre = bool(np.any(kernel.shift))
        self._shift = kernel.shift.astype(kernel.dtype)[:, None]
        # the offset c (nonzero on [1; x] only) as a (hi, lo) pair in the compute dtype
        self._lead = 1 + kernel.dim
        c = kernel.offset[: self._lead]
        hi = c.astype(kernel.dtype)
        self._offset = np.stack([hi, (c - hi).astype(kernel.dtype)])

    def x(self, n: int) -> np.ndarray:
        """The (D, n) block that receives the frames of the next chunk, transposed."""
        return self.data[1 : 1 + self.kernel.dim, :n]

    def load(self, frames: np.ndarray) -> int:
        """Copy up to ``capacity`` frames (N, D) in and expand them; returns how many."""
        n = min(len(frames), self.capacity)
        self.x(n)[...] = frames[:n].T
        self.expand(n)
        return n

    def expand(self, n: int) -> None:
        """Centre the first ``n`` columns and fill their expansion (after the frames were
        written through :meth:`x`); the row of ones is restored too."""
        if self._centre:
            self.x(n)[...] -= self._shift
        self.data[0, :n] = 1.0
        expand_rows(self.data[:, :n], self.kernel.dim, self.kernel.covariance_type)

    def block(self, n: int) -> np.ndarray:
        return self.data[:, :n]

    def offsets(self, n: int) -> np.ndarray:
        """Per-frame common offsets ``rows·c`` in float64, shape (n,)."""
        pair = np.matmul(self._offset, self.data[: self._lead, :n])
        return pair.sum(axis=0, dtype=np.float64)

    def offset_sum(self, n: int) -> float:
        """``Σ_t rows_t·c`` over the first ``n`` columns, in float64."""
        return float(np.matmul(self._offset, self.data[: self._lead, :n]).sum(dtype=np.float64))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of ``values`` (R, K), the value at half of the total weight (K,): the middle
    of the components that carry the mass, whatever a few starved ones hold. Non-finite
    values (the -inf log weight of an empty component) are skipped; 0 where none is left."""
    finite = np.isfinite(values)
    order = np.argsort(np.where(finite, values, np.inf), axis=1, kind="stable")
    cum = np.cumsum(np.where(np.take_along_axis(finite, order, axis=1), weights[order], 0.0),
                    axis=1)
    pick = np.argmax(cum >= 0.5 * cum[:, -1:], axis=1)
    out = np.take_along_axis(values, np.take_along_axis(order, pick[:, None], axis=1), axis=1)
    return np.where(cum[:, -1] > 0, out[:, 0], 0.0)


def grid_shift(shift: np.ndarray) -> np.ndarray:
    """``shift`` rounded to a multiple of 2⁻¹⁰, with 2⁻¹⁰ in place of zero (see :class:`Rows`)."""
    grid = 2.0**-10
    out = np.round(np.asarray(shift, dtype=np.float64) / grid) * grid
    out[out == 0.0] = grid
    return out


def posteriors(kernel: Kernel, rows: np.ndarray, out: np.ndarray):
    """Unnormalised posteriors of a chunk, in place in ``out`` (frames as columns).

    Parameters
    ----------
    kernel : Kernel
    rows : ndarray of shape (P, n)
        Expanded frames as columns (:class:`Rows`).
    out : ndarray of shape (K, n)
        Receives ``2^(L - top)`` with entries below ``2^-FLUSH_BITS`` set to exactly zero.

    Returns
    -------
    top : ndarray of shape (n,)
        Each frame's best log2-likelihood less its offset.
    total : ndarray of shape (n,)
        ``Σ_k out[k]`` (at least 1): posteriors are ``out / total``.
    """
    np.matmul(kernel.fast, rows, out=out)
    return posteriors_of(out)


def posteriors_of(log2_like: np.ndarray):
    """The posterior steps of :func:`posteriors` on given log2-likelihoods (K, n), in place;
    also on a stack of them (M, K, n), one model each, giving tops and totals (M, n)."""
    top = log2_like.max(axis=-2)
    check_finite(top)
    log2_like -= top[..., None, :]
    np.maximum(log2_like, -FLUSH_BITS, out=log2_like)
    np.exp2(log2_like, out=log2_like)
    log2_like -= log2_like.dtype.type(FLUSH_FLOOR)  # flushed entries, exactly 2^-82, become 0
    total = np.matmul(_ones(log2_like.shape[-2], log2_like.dtype), log2_like)
    return top, total


@lru_cache(maxsize=16)
def _ones(k: int, dtype) -> np.ndarray:
    ones = np.ones(k, dtype=dtype)
    ones.setflags(write=False)
    return ones


def check_finite(values: np.ndarray) -> None:
    """NaN is an error (as in Kaldi), never a silent score."""
    if not np.all(np.isfinite(values)):
        raise FloatingPointError(
            "non-finite log-likelihood: NaN or inf in the features or the model"
        )
