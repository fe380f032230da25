"""The E-step: sufficient statistics of frames under a model, chunk by chunk.

Per chunk of ``chunk_size`` frames the work is two matrix products and one exponential per
frame and component::

    E    = expand(X - shift)          (N, E): [x, x²] or [x, vech(x xᵀ)]
    L    = E @ W + gconst             (N, K): log w_k + log N(x_t; μ_k, Σ_k)
    resp = exp(L - logsumexp_k L)     (N, K), rows contiguous in memory
    [first, second] += respᵀ @ E      (K, E)

The products run in the kernel's dtype (float64 by default; float32 is the fast path);
statistics are always accumulated in float64. Chunks are cut from the stream of frames
pushed into an :class:`Accumulator`, so the result does not depend on how the frames were
split into utterances, shards are read from disk or from memory, or which worker ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emdist.gmm import (
    GMM,
    Kernel,
    check_finite,
    expand_features,
    packed_indices,
)
from emdist.stats import GmmStats

DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class EStepOptions:
    """How the E-step computes.

    Attributes
    ----------
    dtype : {"float64", "float32"}
        Precision of the matrix products (statistics are float64 either way).
    chunk_size : int
        Frames per product; bounds memory at about ``chunk_size * (E + K)`` values.
    """

    dtype: str = "float64"
    chunk_size: int = DEFAULT_CHUNK_SIZE


def make_kernel(model: GMM, options: EStepOptions) -> Kernel:
    """The model's kernel in the options' precision.

    In float32 the frames are centred on the model's mean (``Σ w_k μ_k``) so that the
    expanded products do not cancel; in float64 they are used as they are.
    """
    if options.dtype == "float64":
        return model.kernel(np.float64)
    return model.kernel(np.float32, shift=model.weights @ model.means)


class Accumulator:
    """Streams frames into chunks and accumulates statistics.

    Parameters
    ----------
    kernel : Kernel
        The model's constants, from :func:`make_kernel`.
    dim : int
    chunk_size : int
    hard : bool
        Hard assignments (the best component takes the frame, as in k-means) instead of
        posteriors; the log-likelihood summed is then that of the best component.
    """

    def __init__(self, kernel: Kernel, dim: int, chunk_size: int, hard: bool = False):
        self.kernel = kernel
        self.hard = hard
        self.chunk_size = chunk_size
        k, width = kernel.n_components, kernel.weight_matrix.shape[0]
        self._centre = bool(np.any(kernel.shift))
        self._shift = kernel.shift.astype(kernel.dtype)
        self._buffer = np.empty((chunk_size, dim), dtype=kernel.dtype)
        # Rows [1, expand(x)]: the 1 picks up gconst in the first product and, scaled by
        # 1/Σ_k exp(L - max), turns into the zeroth-order statistics in the second.
        self._expanded = np.empty((chunk_size, 1 + width), dtype=kernel.dtype)
        self._expanded[:, 0] = 1.0
        self._log_like = np.empty((chunk_size, k), dtype=kernel.dtype)
        self._fill = 0
        self._moments = np.zeros((k, 1 + width))
        self._loglike = 0.0
        self._frames = 0

    def push(self, frames: np.ndarray) -> None:
        """Add frames of shape (N, D); full chunks are processed at once."""
        pos = 0
        n = len(frames)
        while pos < n:
            take = min(self.chunk_size - self._fill, n - pos)
            self._buffer[self._fill : self._fill + take] = frames[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.chunk_size:
                self._process(self._fill)

    def finish(self) -> GmmStats:
        """Process what is buffered and return the statistics (uncentred, float64)."""
        if self._fill:
            self._process(self._fill)
        m = self._moments
        return _uncentre(m[:, 0], m[:, 1:], self.kernel, self._loglike, self._frames)

    def _process(self, n: int) -> None:
        x = self._buffer[:n]
        if self._centre:
            x -= self._shift
        rows = self._expanded[:n]
        rows[:, 0] = 1.0
        expand_features(x, self.kernel.covariance_type, out=rows[:, 1:])
        log_like = np.matmul(rows, self.kernel.augmented, out=self._log_like[:n])
        if self.hard:
            check_finite(log_like.max(axis=1))
            best = log_like.argmax(axis=1)
            self._loglike += float(log_like[np.arange(n), best].sum(dtype=np.float64))
            resp = np.zeros_like(log_like)
            resp[np.arange(n), best] = 1.0
        else:
            resp, norm, frame_ll = unnormalised_posteriors(log_like)
            self._loglike += float(frame_ll.sum())
            rows *= norm[:, None]  # γ = exp(L - max) / Σ: scale the (narrower) rows instead
        self._moments += resp.T @ rows
        self._frames += n
        self._fill = 0


def unnormalised_posteriors(log_like: np.ndarray):
    """``exp(L - max)`` in place, with the per-row normaliser and log-likelihood.

    Returns
    -------
    weights : ndarray of shape (N, K)
        The same buffer, now ``exp(L - max_k L)``; posteriors are ``weights * norm``.
    norm : ndarray of shape (N,)
        ``1 / Σ_k exp(L - max_k L)``.
    frame_ll : ndarray of shape (N,), float64
        ``logsumexp`` of each row: the frame's log-likelihood.
    """
    top = log_like.max(axis=1, keepdims=True)
    check_finite(top)
    log_like -= top
    with np.errstate(under="ignore"):
        np.exp(log_like, out=log_like)
    total = log_like.sum(axis=1)
    frame_ll = top[:, 0].astype(np.float64) + np.log(total.astype(np.float64))
    return log_like, 1.0 / total, frame_ll


def _uncentre(zeroth, moments, kernel: Kernel, loglike: float, frames: int) -> GmmStats:
    """Split ``[first, second]`` moments and undo the kernel's shift, in float64."""
    d = kernel.shift.shape[0]
    first_c = moments[:, :d]
    shift = kernel.shift
    if kernel.covariance_type == "diag":
        second = moments[:, d:] + 2.0 * first_c * shift + zeroth[:, None] * shift**2
    else:
        k = len(zeroth)
        rows, cols = packed_indices(d)
        second = np.empty((k, d, d))
        second[:, rows, cols] = moments[:, d:]
        second[:, cols, rows] = moments[:, d:]
        cross = first_c[:, :, None] * shift[None, None, :]
        second += cross + cross.transpose(0, 2, 1)
        second += zeroth[:, None, None] * np.outer(shift, shift)
    first = first_c + zeroth[:, None] * shift
    return GmmStats(zeroth, first, second, loglike, frames)


def accumulate(
    model: GMM, frames: np.ndarray, options: EStepOptions | None = None, hard: bool = False
) -> GmmStats:
    """Statistics of ``frames`` (N, D) under ``model``; see :class:`Accumulator`."""
    options = options or EStepOptions()
    acc = Accumulator(make_kernel(model, options), model.dim, options.chunk_size, hard=hard)
    acc.push(np.asarray(frames))
    return acc.finish()


__all__ = [
    "Accumulator",
    "EStepOptions",
    "accumulate",
    "make_kernel",
    "unnormalised_posteriors",
]
