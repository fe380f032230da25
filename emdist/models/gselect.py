"""Gaussian selection (Kaldi's ``gmm-gselect`` and ``--gselect``): the E-step of a large
UBM over each frame's top-N Gaussians only.

Once, with the model EM starts from, every frame gets its N best Gaussians by
log-likelihood (:func:`select`). Each later E-step computes a frame's posteriors over those
N only (renormalised over them, as Kaldi does) and adds its statistics to them only.

To keep that a matter of matrix products, frames are sorted by their best and second-best
Gaussian and cut into blocks of at most ``block_size`` (256) frames that share their best
Gaussian: they share most of their selections, so the union ``U`` of a block's selections
is small (about 110 of 1024 Gaussians on real MFCC with N = 30). Per block, the two
products of the exact E-step run over the columns ``U`` only; each frame's own N entries are
picked out of the block's ``(|U|, B)`` log-likelihoods, and its posteriors are scattered
back before the statistics product. The plan (frame order, blocks, unions, positions) is
computed once with the selection and kept with it, per shard, between passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emdist.models.estep import stats_from_moments
from emdist.models.kernel import LN2, Kernel, Rows, check_finite, expanded_width, posteriors_of

DEFAULT_BLOCK_SIZE = 256
PLAN_CHUNK = 4096
"""Frames of a chunk of the plan, at least (expanded and normalised together): per-chunk
costs (the gather and scatter of each frame's N scores, the posterior passes) are fixed
costs per call, and at 4096 frames a chunk's block matrices still fit in L2."""


@dataclass(frozen=True, eq=False)
class Selection:
    """The top-N Gaussians of every frame of a stream, and the block plan built on them.

    Attributes
    ----------
    n_components : int
        K of the model the selection indexes.
    order : ndarray of shape (T,), int64
        Frames in block order (sorted by best, then second-best Gaussian; stable).
    block_starts : ndarray of shape (B + 1,)
        Block ``b`` holds ``order[block_starts[b]:block_starts[b + 1]]``.
    unions : ndarray
        The blocks' selected Gaussians, sorted and concatenated (``union_starts`` cuts).
    union_starts : ndarray of shape (B + 1,)
    positions : ndarray of shape (T, N), int16 or int32
        For the t-th frame in block order, where each of its N Gaussians sits in its
        block's union: ``unions[union_starts[b] + positions[t]]`` are its Gaussians.
    chunks : ndarray of shape (C + 1,)
        Chunk ``c`` holds blocks ``chunks[c]:chunks[c + 1]`` (at most ``chunk_size`` frames
        or one block): frames expanded and posteriors normalised together.
    stride, column : ndarray of shape (T,), int32
        Where a frame's scores sit in its chunk's stacked ``(|U|, B)`` block matrices: the
        score of its Gaussian at union position ``p`` is element ``p * stride + column``.
    """

    n_components: int
    order: np.ndarray
    block_starts: np.ndarray
    unions: np.ndarray
    union_starts: np.ndarray
    positions: np.ndarray
    chunks: np.ndarray
    stride: np.ndarray
    column: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(len(self.order))

    @property
    def n_select(self) -> int:
        return int(self.positions.shape[1])

    def indices(self) -> np.ndarray:
        """The selected Gaussians of every frame in stream order, best first: (T, N)."""
        out = np.empty_like(self.positions, dtype=np.int64)
        for b in range(len(self.block_starts) - 1):  # once, for reports and tests
            s, e = self.block_starts[b], self.block_starts[b + 1]
            union = self.unions[self.union_starts[b] : self.union_starts[b + 1]]
            out[self.order[s:e]] = union[self.positions[s:e]]
        return out

    @property
    def mean_union(self) -> float:
        """Average number of Gaussians a block computes (the cost, against K for exact EM)."""
        return float(np.mean(np.diff(self.union_starts))) if len(self.union_starts) > 1 else 0.0


def kept_bytes_per_frame(n_select: int, n_components: int) -> int:
    """Memory a kept selection takes per frame: its positions (int16, or int32 past 32767
    Gaussians), its place in block order (int64) and its score stride and column (int32)."""
    position = 2 if n_components <= np.iinfo(np.int16).max else 4
    return n_select * position + 8 + 4 + 4


def top_n(kernel: Kernel, frames: np.ndarray, n_select: int, chunk_size: int) -> np.ndarray:
    """Each frame's ``n_select`` best Gaussians by log-likelihood, best first: (T, N)."""
    k = kernel.n_components
    n_select = min(n_select, k)
    rows = Rows(kernel, chunk_size)
    out = np.empty((len(frames), n_select), dtype=np.int16 if k <= 32767 else np.int32)
    log_like = np.empty((chunk_size, k), dtype=kernel.dtype)
    for start in range(0, len(frames), chunk_size):
        n = rows.load(frames[start : start + chunk_size])
        ll = np.matmul(rows.block(n).T, kernel.fast.T, out=log_like[:n])
        check_finite(ll.max(axis=1))
        best = np.argpartition(ll, k - n_select, axis=1)[:, k - n_select :]
        rank = np.argsort(-np.take_along_axis(ll, best, axis=1), axis=1, kind="stable")
        out[start : start + n] = np.take_along_axis(best, rank, axis=1)
    return out


def selected_log_likelihood(kernel: Kernel, frames: np.ndarray, indices: np.ndarray,
                            chunk_size: int) -> np.ndarray:
    """Each frame's log-likelihood over its selected Gaussians only (``log Σ_{k ∈ S_t} w_k
    N(x_t; μ_k, Σ_k)``, as ``gmm-global-get-frame-likes --gselect`` gives it): (T,),
    float64, for frames (T, D) and their selections ``indices`` (T, N)."""
    rows = Rows(kernel, chunk_size)
    out = np.empty(len(frames))
    log_like = np.empty((chunk_size, kernel.n_components), dtype=kernel.dtype)
    for start in range(0, len(frames), chunk_size):
        n = rows.load(frames[start : start + chunk_size])
        ll = np.matmul(rows.block(n).T, kernel.fast.T, out=log_like[:n])
        chosen = np.take_along_axis(ll, indices[start : start + n], axis=1).T  # (N, n)
        top, total = posteriors_of(np.ascontiguousarray(chosen))
        out[start : start + n] = rows.offsets(n) + LN2 * (top + np.log2(total,
                                                                          dtype=np.float64))
    return out


def plan(indices: np.ndarray, n_components: int, block_size: int = DEFAULT_BLOCK_SIZE,
         chunk_size: int = 1024) -> Selection:
    """The block plan of per-frame selections ``indices`` (T, N), best first."""
    t, n = indices.shape
    keys = (indices[:, 1], indices[:, 0]) if n > 1 else (indices[:, 0],)
    order = np.lexsort(keys) if t else np.zeros(0, dtype=np.int64)
    chosen = indices[order]
    block_starts = _aligned_blocks(chosen[:, 0], block_size) if t else np.zeros(1, np.int64)
    pos_dtype = np.int16 if n_components <= np.iinfo(np.int16).max else np.int32
    positions = np.empty((t, n), dtype=pos_dtype)
    unions, counts = [], []
    per_group = max(1, (1 << 22) // max(n_components, 1))  # blocks per presence bitmap
    for g in range(0, len(block_starts) - 1, per_group):  # a few groups of many blocks
        last = min(g + per_group, len(block_starts) - 1)
        lo, hi = block_starts[g], block_starts[last]
        block = np.repeat(np.arange(last - g, dtype=np.int32), np.diff(block_starts[g:last + 1]))
        flat = (block[:, None] * n_components + chosen[lo:hi]).ravel()  # into (blocks, K) bitmaps
        present = np.zeros((last - g) * n_components, dtype=bool)
        present[flat] = True
        rank = np.cumsum(present.reshape(-1, n_components), axis=1, dtype=np.int32) - 1
        positions[lo:hi] = rank.ravel()[flat].reshape(hi - lo, n)  # place in its union
        present = present.reshape(-1, n_components)
        unions.append(np.nonzero(present)[1])
        counts.append(present.sum(axis=1))
    union_starts = np.concatenate([[0], np.cumsum(np.concatenate(counts))]) if counts else [0]
    union_starts = np.asarray(union_starts, dtype=np.int64)
    flat = (np.concatenate(unions) if unions else np.zeros(0)).astype(np.intp)
    chunks = _chunks(np.diff(block_starts), chunk_size)
    stride, column = _score_layout(block_starts, union_starts, chunks)
    return Selection(n_components, order.astype(np.int64), block_starts.astype(np.int64),
                     flat, union_starts, positions, chunks, stride, column)


def _score_layout(block_starts: np.ndarray, union_starts: np.ndarray, chunks: np.ndarray):
    """Per frame, the stride and column of its scores in its chunk's stacked block matrices
    (block ``j`` is a ``(|U_j|, B_j)`` matrix after the blocks before it in the chunk)."""
    lens = np.diff(block_starts)
    sizes = np.diff(union_starts) * lens
    chunk_of = np.repeat(np.arange(len(chunks) - 1), np.diff(chunks))
    first = chunks[:-1][chunk_of]  # first block of each block's chunk
    area_start = np.cumsum(sizes) - sizes
    base = area_start - area_start[first]  # where block j's matrix starts in its chunk
    frame = np.arange(block_starts[-1])
    block = np.repeat(np.arange(len(lens)), lens)
    column = base[block] + frame - block_starts[block]
    return lens[block].astype(np.int32), column.astype(np.int32)


def _aligned_blocks(best: np.ndarray, block_size: int) -> np.ndarray:
    """Block starts (and the end) over frames sorted by best Gaussian: a block never spans
    two best Gaussians, and a longer run is cut into equal blocks of at most
    ``block_size``, so a block's frames share their best Gaussian and most of the rest."""
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(best)) + 1, [len(best)]])
    lengths = np.diff(bounds)
    pieces = -(-lengths // block_size)
    group = np.repeat(np.arange(len(lengths)), pieces)
    first_piece = np.concatenate([[0], np.cumsum(pieces)[:-1]])
    piece = np.arange(int(pieces.sum())) - first_piece[group]
    starts = bounds[group] + (piece * lengths[group]) // pieces[group]
    return np.concatenate([starts, [len(best)]]).astype(np.int64)


def select(kernel: Kernel, frames: np.ndarray, n_select: int, chunk_size: int = 1024,
           block_size: int = DEFAULT_BLOCK_SIZE) -> Selection:
    """Gaussian selection of ``frames`` (T, D) under ``kernel``'s model, with its plan."""
    indices = top_n(kernel, frames, n_select, chunk_size)
    return plan(indices, kernel.n_components, block_size, max(chunk_size, PLAN_CHUNK))


def accumulate_selected(kernel: Kernel, ordered: np.ndarray, selection: Selection,
                        count_flushed: bool = False):
    """Statistics of frames with posteriors over each frame's selection only.

    Parameters
    ----------
    kernel : Kernel
    ordered : ndarray of shape (T, D)
        The frames in block order: ``frames[selection.order]`` (column-major is fastest).
    selection : Selection
    count_flushed : bool

    Per chunk of the plan, the frames are expanded once and their selected posteriors
    normalised together; per block, the two products run over the block's union.

    Returns
    -------
    stats : GmmStats
        As :func:`emdist.models.estep.accumulate` returns them (uncentred, float64).
    flushed : int
        Selected posteriors flushed to zero (counted with ``count_flushed``).
    """
    if selection.n_frames != len(ordered) or selection.n_components != kernel.n_components:
        raise ValueError(
            f"a selection of {selection.n_frames} frames over {selection.n_components} "
            f"Gaussians does not fit {len(ordered)} frames and {kernel.n_components} Gaussians"
        )
    sel = selection
    starts, ustarts, chunks = sel.block_starts, sel.union_starts, sel.chunks
    unions = np.split(sel.unions, ustarts[1:-1])  # one view per block
    lens = np.diff(starts)
    sizes = np.diff(ustarts) * lens  # each block's (|U|, B) matrix, stacked per chunk
    area = np.cumsum(sizes) - sizes
    spans = [(int(starts[chunks[c + 1]] - starts[chunks[c]]),
              int(sizes[chunks[c] : chunks[c + 1]].sum())) for c in range(len(chunks) - 1)]
    rows = Rows(kernel, max([1, *(f for f, _ in spans)]))
    scores = np.empty(max([1, *(a for _, a in spans)]), kernel.dtype)
    moments = np.zeros((kernel.n_components, kernel.width))
    loglike, flushed = 0.0, 0
    for c in range(len(chunks) - 1):
        first, last = chunks[c], chunks[c + 1]
        s, n = starts[first], starts[last] - starts[first]
        rows.x(n)[...] = ordered[s : s + n].T
        rows.expand(n)
        frames_t = rows.block(n)
        loglike += rows.offset_sum(n)
        blocks = []
        for j in range(first, last):  # per block: the product over its union only
            lo, hi, union = starts[j] - s, starts[j + 1] - s, unions[j]
            at = slice(area[j] - area[first], area[j] - area[first] + sizes[j])
            np.matmul(kernel.fast.take(union, axis=0), frames_t[:, lo:hi],
                      out=scores[at].reshape(len(union), hi - lo))
            blocks.append((len(union), at, lo, hi))
        flat = sel.positions[s : s + n].T.astype(np.intp)  # each frame's N scores
        flat *= sel.stride[s : s + n]  # (intp indices: numpy converts any other kind on
        flat += sel.column[s : s + n]  # every take and store)
        chosen = scores.take(flat)  # (N, n)
        top, total = posteriors_of(chosen)
        loglike += LN2 * float(top.sum(dtype=np.float64) +
                               np.log2(total, dtype=np.float64).sum())
        if count_flushed:
            flushed += chosen.size - int(np.count_nonzero(chosen))
        chosen *= np.reciprocal(total)
        scores[: spans[c][1]] = 0.0  # the block matrices become the posteriors
        scores[flat] = chosen
        for j, (size, at, lo, hi) in zip(range(first, last), blocks, strict=True):
            moments[unions[j]] += np.matmul(scores[at].reshape(size, hi - lo),
                                            frames_t[:, lo:hi].T)
    e = expanded_width(kernel.dim, kernel.covariance_type)
    return stats_from_moments(moments[:, : 1 + e], kernel, loglike, len(ordered)), flushed


def _chunks(lens: np.ndarray, chunk_size: int) -> np.ndarray:
    """Block boundaries of runs of consecutive blocks of at most ``chunk_size`` frames (or
    one longer block): ``[0, ..., len(lens)]``."""
    out, total = [0], 0
    for j, size in enumerate(lens.tolist()):  # once per selection
        if j > out[-1] and total + size > chunk_size:
            out.append(j)
            total = 0
        total += size
    if len(lens):
        out.append(len(lens))
    return np.asarray(out, dtype=np.int64)
