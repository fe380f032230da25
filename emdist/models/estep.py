"""The E-step: sufficient statistics of frames under a model, chunk by chunk.

Per chunk of ``chunk_size`` frames (see :mod:`emdist.models.kernel`)::

    R    = [1; x - shift; x² or vech(x xᵀ); 0...]   (P, n), frames as columns
    L    = A @ R                                   (K, n): log2 w_k N(x_t) less c·R
    resp = 2^(L - max_k L), 0 below 2^-82           (K, n), column t summing to Σ_t
    [n, first, second] += resp @ (R / Σ_t)ᵀ         (K, P)

two matrix products and one ``exp2`` per frame and component. The products run in the
kernel's dtype (float64 by default; float32 is the fast path); statistics are always
accumulated in float64. Hard assignments (k-means) replace the posteriors by the best
component and sum each component's frames directly (no K-wide product). Chunks are cut from
the stream of frames pushed into an :class:`Accumulator`, so the result does not depend on
how the frames were split into utterances, shards are read from disk or from memory, or
which worker ran.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from emdist.models.gmm import GMM
from emdist.models.kernel import (
    LN2,
    Kernel,
    Rows,
    check_finite,
    expanded_width,
    grid_shift,
    packed_indices,
    posteriors,
)
from emdist.models.stats import GmmStats

DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class EStepOptions:
    """How the E-step computes.

    Attributes
    ----------
    dtype : {"float64", "float32"}
        Precision of the matrix products (statistics are float64 either way).
    chunk_size : int
        Frames per product; bounds memory at about ``chunk_size * (P + K)`` values.
    """

    dtype: str = "float64"
    chunk_size: int = DEFAULT_CHUNK_SIZE


_KERNELS: weakref.WeakKeyDictionary[GMM, dict[str, Kernel]] = weakref.WeakKeyDictionary()


def make_kernel(model: GMM, options: EStepOptions) -> Kernel:
    """The model's kernel in the options' precision, built once per model and precision.

    In float32 the frames are centred near the model's mean (``Σ w_k μ_k`` on a grid of
    2⁻¹⁰, see :func:`emdist.models.kernel.grid_shift`) and a common offset is taken out of the
    constants, so that the expanded products do not cancel; in float64 the plain products
    are used.

    Models are immutable (read-only arrays), so a kernel is kept while its model lives:
    the shards of one pass that a process runs share it (one Cholesky factorisation per
    Gaussian and pass, not one per shard).
    """
    kernels = _KERNELS.setdefault(model, {})
    kernel = kernels.get(options.dtype)
    if kernel is None:
        if options.dtype == "float64":
            kernel = model.kernel(np.float64)
        else:
            kernel = Kernel.from_gmm(model, np.float32, common_offset=True,
                                     shift=grid_shift(model.weights @ model.means))
        kernels[options.dtype] = kernel
    return kernel


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
    count_flushed : bool
        Count the posteriors set to zero by the flush (a diagnostic; one more pass).
    """

    def __init__(self, kernel: Kernel, dim: int, chunk_size: int, hard: bool = False,
                 count_flushed: bool = False):
        self.kernel = kernel
        self.hard = hard
        self.count_flushed = count_flushed
        self.chunk_size = chunk_size
        # Buffers for as many frames as were pushed, up to a chunk: a model that sees a few
        # hundred frames (a word of a small shard) does not allocate and zero a whole chunk.
        self._rows = Rows(kernel, min(chunk_size, 64))
        self._log_like = self._scores(self._rows.capacity)
        self._fill = 0
        # (K, P), or (P, K) when P >= K: the orientation in which the product runs faster
        self._wide = kernel.width >= kernel.n_components and not hard
        wide = (kernel.width, kernel.n_components)
        self._moments = np.zeros(wide if self._wide else wide[::-1])
        self._loglike = 0.0
        self._frames = 0
        self.flushed = 0
        """Posteriors flushed to zero so far (with ``count_flushed``)."""

    def _scores(self, capacity: int) -> np.ndarray:
        k = self.kernel.n_components  # hard: (n, K), argmax along contiguous rows
        return np.empty((capacity, k) if self.hard else (k, capacity), dtype=self.kernel.dtype)

    def _grow(self, frames: int) -> None:
        """Room for ``frames`` buffered frames (at most a chunk), keeping those buffered."""
        capacity = min(self.chunk_size, max(frames, 2 * self._rows.capacity))
        rows = Rows(self.kernel, capacity)
        rows.data[:, : self._fill] = self._rows.data[:, : self._fill]
        self._rows, self._log_like = rows, self._scores(capacity)

    def push(self, frames: np.ndarray) -> None:
        """Add frames of shape (N, D); full chunks are processed at once."""
        pos = 0
        n = len(frames)
        while pos < n:
            take = min(self.chunk_size - self._fill, n - pos)
            if self._fill + take > self._rows.capacity:
                self._grow(self._fill + take)
            block = self._rows.data[1 : 1 + self.kernel.dim, self._fill : self._fill + take]
            block[...] = frames[pos : pos + take].T
            self._fill += take
            pos += take
            if self._fill == self.chunk_size:
                self._process(self._fill)

    def finish(self) -> GmmStats:
        """Process what is buffered and return the statistics (uncentred, float64)."""
        if self._fill:
            self._process(self._fill)
        e = expanded_width(self.kernel.dim, self.kernel.covariance_type)
        m = self._moments.T if self._wide else self._moments
        return stats_from_moments(m[:, : 1 + e], self.kernel, self._loglike, self._frames)

    def _process(self, n: int) -> None:
        self._rows.expand(n)
        rows = self._rows.block(n)
        self._loglike += self._rows.offset_sum(n)
        if self.hard:
            self._hard(rows, n)
        else:
            self._soft(rows, n)
        self._frames += n
        self._fill = 0

    def _soft(self, rows: np.ndarray, n: int) -> None:
        resp = self._log_like[:, :n]
        top, total = posteriors(self.kernel, rows, resp)
        self._loglike += LN2 * float(top.sum(dtype=np.float64) +
                                     np.log2(total, dtype=np.float64).sum())
        if self.count_flushed:
            self.flushed += resp.size - int(np.count_nonzero(resp))
        norm = np.reciprocal(total)  # γ = resp / Σ: scale whichever of the two is smaller
        if self._wide:
            resp *= norm
            self._moments += np.matmul(rows, resp.T)
        else:
            rows *= norm
            self._moments += np.matmul(resp, rows.T)

    def _hard(self, rows: np.ndarray, n: int) -> None:
        log_like = np.matmul(rows.T, self.kernel.fast.T, out=self._log_like[:n])
        best = log_like.argmax(axis=1)
        best_ll = log_like[np.arange(n), best]
        check_finite(best_ll)
        self._loglike += LN2 * float(best_ll.sum(dtype=np.float64))
        # Σ of each component's frames: sort by component, add runs (no K-wide product)
        order = np.argsort(best, kind="stable")
        counts = np.bincount(best, minlength=self.kernel.n_components)
        used = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[used])[:-1]])
        sorted_rows = rows.T[order].astype(np.float64)
        self._moments[used] += np.add.reduceat(sorted_rows, starts, axis=0)


def stats_from_moments(moments, kernel: Kernel, loglike: float, frames: int) -> GmmStats:
    """Statistics from moments ``[1, x, x² or vech(x xᵀ)]`` (K, 1 + E) of centred frames:
    split them and undo the kernel's shift, in float64."""
    d = kernel.dim
    zeroth, moments = moments[:, 0], moments[:, 1:]
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
    "stats_from_moments",
]
