"""Compiled (numba) loops of the HMM E-step: per-state emissions, forward-backward and
Viterbi in the log domain, over the utterances of a batch laid end to end (no padding).

Every function here is ``@njit(cache=True, nogil=True)``: compiled once per argument type
(float32 or float64 Gaussian scores) and machine, the machine code kept in numba's cache
(``__pycache__`` next to this file, or numba's user-wide cache when that is read-only), so
a process loads it at its first call instead of compiling; ``nogil`` lets the threads of a
Dask worker run them side by side. numba is a required dependency: every process runs this
one code path and computes the same bits.

Layout. A batch of B utterances holds N frames in utterance order; utterance u has frames
``bounds[u]:bounds[u + 1]``. Everything is in log2 units (``exp2`` and ``log2`` are the
cheaper pair; the Gaussians' scores come in log2 units already): ``log_b`` (N, S) holds the
log2-emissions, and ``topo`` (:class:`emdist.models.hmm._Topology`) the log2 transitions of
M models (``tidx[u]`` is utterance u's) between emitting states, their end weights (the exit
column, or 0 for a model without an exit: it may end in any state), and the allowed
transitions. A left-to-right model (self-loops, next state, optional skips) runs on the
2 or 3 bands of its transition matrix; any other on lists of predecessors.
A model is entered in state 0.

The forward recursion stays in the log domain (no scaling): each ``log Σ exp`` takes out
its largest term, so a sum of two terms costs one ``exp2`` and one ``log2`` (and a "sum" of
one term, as state 0's entry, none). It also keeps the share of each state's forward mass
that comes from each predecessor; the backward pass turns them into the state posteriors
and expected transition counts with products and sums of probabilities, no ``exp`` or
``log`` at all (see :func:`forward_backward`). Terms below 2^-1000 of a sum's largest, and
posteriors below 2^-1000, are exact zeros (:data:`EXP2_LOW`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
FLUSH_BITS = 82.0  # as emdist.models.kernel.FLUSH_BITS: posteriors below 2^-82 are zeros

EXP2_LOW = -1000.0
"""``2^d`` for ``d < EXP2_LOW`` is taken as 0 in the recursions: below 2^-1000 (1e-301) of
the largest term of a sum, a term is far below float64 resolution, and ``exp2`` never
takes its slow underflow path (a subnormal result) nor sees ``-inf``."""

TINY = 2.0 ** EXP2_LOW
"""Posteriors below this (2^-1000) are exact zeros in the backward pass (no subnormal
number, which many CPUs process 10-100x slower)."""

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}


@njit(**_OPTS)
def load_frames(frames, start, stop, shift, rows, squares):
    """Frames ``start:stop`` of ``frames`` (D, N) (as columns) into ``rows`` (P, ≥ stop -
    start), in its dtype: ``rows[0] = 1``, ``rows[1 + d] = x = frames[d] - shift[d]`` and,
    with ``squares``, ``rows[1 + D + d] = x²`` (the diagonal expansion). As
    :class:`emdist.models.kernel.Rows` does with numpy passes (a frame converted to the
    compute dtype, then centred, then squared), in one pass."""
    dim = frames.shape[0]
    n = stop - start
    cast = rows.dtype.type
    for t in range(n):
        rows[0, t] = 1.0
    for d in range(dim):
        c = cast(shift[d])
        src = frames[d, start:stop]
        x = rows[1 + d, :n]
        for t in range(n):
            x[t] = cast(src[t]) - c
        if squares:
            sq = rows[1 + dim + d, :n]
            for t in range(n):
                sq[t] = x[t] * x[t]


@njit(**_OPTS)
def frame_offsets(rows, n, offset, out):
    """``out[t] = Σ_p offset[p] · rows[p, t]`` over the first ``len(offset)`` rows and
    ``n`` columns, in float64: the common offset of a frame (taken out of the float32
    kernel's constants), exactly up to float64 rounding (the rows hold float32 values)."""
    for t in range(n):
        out[t] = 0.0
    for p in range(len(offset)):
        c = offset[p]
        if c == 0.0:
            continue
        for t in range(n):
            out[t] += c * np.float64(rows[p, t])


@njit(**_OPTS)
def state_tops(ll, starts, tops):
    """First step of the per-state emissions of N frames: ``tops[s, t]`` (S, N) the best
    score of state s's Gaussians (rows ``starts[s]:starts[s + 1]`` of ``ll`` (ΣK, N),
    log2-likelihoods less the frame's common offset), and ``ll`` replaced in place by
    ``max(ll - top, -82)``, ready for one vectorised ``exp2`` (as the GMM's E-step,
    :func:`emdist.models.kernel.posteriors_of`). Returns the number of frames whose best
    score is not finite (NaN or ±inf features)."""
    s_count, n = tops.shape
    floor = ll.dtype.type(-FLUSH_BITS)
    for s in range(s_count):
        lo, hi = starts[s], starts[s + 1]
        for t in range(n):
            tops[s, t] = ll[lo, t]
        for k in range(lo + 1, hi):
            for t in range(n):
                tops[s, t] = max(tops[s, t], np.float64(ll[k, t]))
        for k in range(lo, hi):
            for t in range(n):
                d = ll[k, t] - tops[s, t]  # NaN for a state of no weight (-inf - -inf)
                ll[k, t] = d if d > floor else floor
    bad = 0
    for t in range(n):
        frame_top = tops[0, t]
        for s in range(1, s_count):
            frame_top = max(frame_top, tops[s, t])
        bad += not (frame_top < np.inf and frame_top > -np.inf)
    return bad


@njit(**_OPTS)
def state_totals(ll, starts, totals, norm):
    """Second step, after ``ll = 2^ll``: entries of exactly 2^-82 become exact zeros (the
    flushed posteriors), ``totals[s, t] = Σ_k ll[k, t]`` over state s's Gaussians and
    ``norm[s, t] = 1 / totals[s, t]`` (0 for a state of no weight): the within-state
    posteriors are ``ll · norm``."""
    s_count, n = totals.shape
    flushed = ll.dtype.type(2.0 ** -FLUSH_BITS)
    for s in range(s_count):
        for t in range(n):
            totals[s, t] = 0.0
        for k in range(starts[s], starts[s + 1]):
            for t in range(n):
                e = ll[k, t] - flushed
                ll[k, t] = e
                totals[s, t] += e
        for t in range(n):
            total = totals[s, t]
            norm[s, t] = 1.0 / total if total > 0.0 else 0.0


@njit(**_OPTS)
def _exp2(d):
    """``2^d`` for ``d <= 0``, exactly 0 below :data:`EXP2_LOW` (and for ``-inf``)."""
    e = np.exp2(max(d, EXP2_LOW))
    return e if d >= EXP2_LOW else 0.0


@njit(**_OPTS)
def _lse2(a, b):
    """``log2(2^a + 2^b)``."""
    top = max(a, b)
    low = min(a, b)
    if low == -np.inf:  # one term (or none): state 0's entry, the last state's exit
        return top
    return top + np.log2(1.0 + _exp2(low - top))


@njit(**_OPTS)
def _lse3(a, b, c):
    """``log2(2^a + 2^b + 2^c)``."""
    top = max(max(a, b), c)
    if top == -np.inf:
        return -np.inf
    return top + np.log2(_exp2(a - top) + _exp2(b - top) + _exp2(c - top))


@njit(**_OPTS)
def _end_total(alpha, last, end):
    """``log2 Σ_i 2^(α_last(i) + end_i)``."""
    top = -np.inf
    for i in range(alpha.shape[1]):
        top = max(top, alpha[last, i] + end[i])
    if top == -np.inf:
        return -np.inf
    total = 0.0
    for i in range(alpha.shape[1]):
        total += _exp2(alpha[last, i] + end[i] - top)  # the largest term adds exactly 1
    return top + np.log2(total)


@njit(**_OPTS)
def _forward_band(log_b, t0, t1, band, n_bands, end, alpha, prev, frac, keep):
    """α of one utterance (frames t0..t1-1) of a left-to-right model; returns its total.
    ``band[d, j]`` is log2 a(j - d, j) (-inf past the ends); ``prev`` (S + 2) scratch. With
    ``keep``, ``frac[d, t, j]`` receives the share of α_t(j)'s paths that come from state
    j - d (the predecessor posteriors, :func:`forward_backward`)."""
    s_count = log_b.shape[1]
    prev[0] = prev[1] = -np.inf
    for j in range(s_count):
        v = log_b[t0, 0] if j == 0 else -np.inf
        prev[j + 2] = v
        alpha[t0, j] = v
    for t in range(t0 + 1, t1):
        for j in range(s_count):
            a = prev[j + 2] + band[0, j]
            b = prev[j + 1] + band[1, j]
            if n_bands == 3:
                c = prev[j] + band[2, j]
                top = max(max(a, b), c)
                if top == -np.inf:
                    v, fa, fb, fc = -np.inf, 0.0, 0.0, 0.0
                else:
                    ea, eb, ec = _exp2(a - top), _exp2(b - top), _exp2(c - top)
                    norm = ea + eb + ec
                    v = top + np.log2(norm)
                    inv = 1.0 / norm
                    fa, fb, fc = ea * inv, eb * inv, ec * inv
                if keep:
                    frac[2, t, j] = fc
            else:
                top = max(a, b)
                low = min(a, b)
                if top == -np.inf:
                    v, fa, fb = -np.inf, 0.0, 0.0
                elif low == -np.inf:  # one way in: state 0's self-loop, or a closed one
                    v = top
                    fa = 1.0 if a >= b else 0.0
                    fb = 1.0 - fa
                else:
                    e = _exp2(low - top)
                    norm = 1.0 + e
                    v = top + np.log2(norm)
                    big = 1.0 / norm
                    small = e * big
                    fa = big if a >= b else small
                    fb = small if a >= b else big
            if keep:
                frac[0, t, j] = fa
                frac[1, t, j] = fb
            alpha[t, j] = v + log_b[t, j]
        for j in range(s_count):
            prev[j + 2] = alpha[t, j]
    return _end_total(alpha, t1 - 1, end)


@njit(**_OPTS)
def _forward_dense(log_b, t0, t1, trans, end, pred_ptr, pred, alpha, frac, keep):
    """α of one utterance under any topology (predecessor lists); returns its total. With
    ``keep``, ``frac[k, t, j]`` receives the share of α_t(j)'s paths that come from its
    k-th predecessor ``pred[pred_ptr[j] + k]``."""
    s_count = log_b.shape[1]
    for j in range(s_count):
        alpha[t0, j] = log_b[t0, 0] if j == 0 else -np.inf
    for t in range(t0 + 1, t1):
        for j in range(s_count):
            lo, hi = pred_ptr[j], pred_ptr[j + 1]
            top = -np.inf
            for e in range(lo, hi):
                top = max(top, alpha[t - 1, pred[e]] + trans[pred[e], j])
            if top == -np.inf:
                alpha[t, j] = -np.inf
                if keep:
                    for e in range(lo, hi):
                        frac[e - lo, t, j] = 0.0
                continue
            total = 0.0
            for e in range(lo, hi):
                x = _exp2(alpha[t - 1, pred[e]] + trans[pred[e], j] - top)
                total += x
                if keep:
                    frac[e - lo, t, j] = x
            if keep:
                inv = 1.0 / total
                for e in range(lo, hi):
                    frac[e - lo, t, j] *= inv
            alpha[t, j] = top + np.log2(total) + log_b[t, j]
    return _end_total(alpha, t1 - 1, end)


@njit(**_OPTS)
def _forward(log_b, bounds, tidx, topo, alpha, totals, frac, keep):
    trans, band, n_bands, end, _, pred_ptr, pred = topo
    prev = np.empty(log_b.shape[1] + 2)
    for u in range(len(bounds) - 1):
        t0, t1 = bounds[u], bounds[u + 1]
        if t1 <= t0:
            totals[u] = -np.inf
            continue
        m = tidx[u]
        if n_bands:
            totals[u] = _forward_band(log_b, t0, t1, band[m], n_bands, end[m], alpha, prev,
                                      frac, keep)
        else:
            totals[u] = _forward_dense(log_b, t0, t1, trans[m], end[m], pred_ptr, pred,
                                       alpha, frac, keep)


@njit(**_OPTS)
def forward(log_b, bounds, tidx, topo, alpha, totals):
    """Forward scores ``alpha`` (N, S) and each utterance's total log2-likelihood
    (``-inf`` if no path, or no frame). ``topo``: see :func:`forward_backward`."""
    _forward(log_b, bounds, tidx, topo, alpha, totals, np.empty((0, 0, 0)), False)


@njit(**_OPTS)
def _backward_band(t0, t1, n_bands, gamma, counts, acc, frac):
    """γ of frames t1-2..t0 and the transition counts of one utterance of a left-to-right
    model, from γ of its last frame and the predecessor posteriors ``frac``."""
    s_count = gamma.shape[1]
    acc[...] = 0.0
    for t in range(t1 - 2, t0 - 1, -1):
        for i in range(s_count):
            x0 = gamma[t + 1, i] * frac[0, t + 1, i]
            x1 = gamma[t + 1, i + 1] * frac[1, t + 1, i + 1] if i + 1 < s_count else 0.0
            x2 = 0.0
            if n_bands == 3 and i + 2 < s_count:
                x2 = gamma[t + 1, i + 2] * frac[2, t + 1, i + 2]
            x0 = x0 if x0 >= TINY else 0.0
            x1 = x1 if x1 >= TINY else 0.0
            x2 = x2 if x2 >= TINY else 0.0
            gamma[t, i] = x0 + x1 + x2
            acc[0, i] += x0
            acc[1, i] += x1
            acc[2, i] += x2
    for d in range(n_bands):
        for i in range(s_count - d):
            counts[i, i + d] = acc[d, i]


@njit(**_OPTS)
def _backward_dense(t0, t1, pred_ptr, pred, gamma, counts, frac):
    """γ of frames t1-2..t0 and the transition counts of one utterance under any topology,
    from γ of its last frame and the predecessor posteriors ``frac``."""
    s_count = gamma.shape[1]
    for t in range(t1 - 2, t0 - 1, -1):
        for i in range(s_count):
            gamma[t, i] = 0.0
        for j in range(s_count):
            lo = pred_ptr[j]
            for e in range(lo, pred_ptr[j + 1]):
                x = gamma[t + 1, j] * frac[e - lo, t + 1, j]
                if x >= TINY:
                    gamma[t, pred[e]] += x
                    counts[pred[e], j] += x


@njit(**_OPTS)
def forward_backward(log_b, bounds, tidx, topo, alpha, gamma, counts, totals):
    """State posteriors ``gamma`` (N, S), expected transition counts ``counts`` (B, S,
    S + 1) (exits in column S) and total log2-likelihoods (B,) of every utterance; an
    utterance that no path aligns gets ``-inf`` and zeros. ``alpha`` (N, S) is scratch.

    ``topo`` = (trans (M, S, S), band (M, 3, S + 2), n_bands, end (M, S), has_exit (M,),
    pred_ptr, pred), all log2 (:class:`emdist.models.hmm._Topology`):
    with ``n_bands`` (2, or 3 with skips) the left-to-right loops run on the bands, else
    on the lists of allowed transitions.

    The forward pass keeps, for every frame t and state j, the share of α_t(j) that comes
    from each predecessor i: ``p_t(i → j) = 2^(α_t-1(i) + a_ij - (α_t(j) - b_t(j)))``, the
    posterior of being in i at t - 1 given state j at t (and the frames to t - 1, which is
    all that matters in a Markov chain). The backward pass then needs no β: from γ at the
    last frame (``2^(α + end - total)``), ``ξ_t-1(i, j) = γ_t(j) · p_t(i → j)`` and ``γ_t-1(i)
    = Σ_j ξ_t-1(i, j)``, sums of products of probabilities in [0, 1], which neither
    underflow (terms below 2^-1000 are exact zeros) nor need scaling.
    """
    trans, band, n_bands, end, has_exit, pred_ptr, pred = topo
    s_count = log_b.shape[1]
    slots = n_bands
    if not n_bands:
        for j in range(s_count):
            slots = max(slots, pred_ptr[j + 1] - pred_ptr[j])
    frac = np.empty((max(slots, 1), log_b.shape[0], s_count))
    acc = np.empty((3, s_count))
    _forward(log_b, bounds, tidx, topo, alpha, totals, frac, True)
    for u in range(len(bounds) - 1):
        t0, t1 = bounds[u], bounds[u + 1]
        counts[u] = 0.0
        total = totals[u]
        if total == -np.inf:
            gamma[t0:t1] = 0.0
            continue
        m = tidx[u]
        last = t1 - 1
        for i in range(s_count):
            g = _exp2(alpha[last, i] + end[m, i] - total)
            gamma[last, i] = g
            if has_exit[m]:
                counts[u, i, s_count] = g
        if n_bands:
            _backward_band(t0, t1, n_bands, gamma, counts[u], acc, frac)
        else:
            _backward_dense(t0, t1, pred_ptr, pred, gamma, counts[u], frac)


@njit(**_OPTS)
def viterbi(log_b, bounds, tidx, topo, delta, back, best, paths):
    """Best paths: ``paths`` (N,) the state of each frame (-1 for an utterance with no path)
    and ``best`` (B,) their log2-likelihoods. ``delta`` (N, S) and ``back`` (N, S) are
    scratch. Ties go to the lowest predecessor and the lowest final state."""
    trans, _, _, end, _, pred_ptr, pred = topo
    s_count = log_b.shape[1]
    for u in range(len(bounds) - 1):
        t0, t1 = bounds[u], bounds[u + 1]
        if t1 <= t0:
            best[u] = -np.inf
            continue
        m = tidx[u]
        for j in range(s_count):
            delta[t0, j] = log_b[t0, 0] if j == 0 else -np.inf
        for t in range(t0 + 1, t1):
            for j in range(s_count):
                top = -np.inf
                arg = j
                for e in range(pred_ptr[j], pred_ptr[j + 1]):
                    v = delta[t - 1, pred[e]] + trans[m, pred[e], j]
                    if v > top:
                        top = v
                        arg = pred[e]
                delta[t, j] = top + log_b[t, j]
                back[t, j] = arg
        top = -np.inf
        state = 0
        for i in range(s_count):
            v = delta[t1 - 1, i] + end[m, i]
            if v > top:
                top = v
                state = i
        best[u] = top
        if top == -np.inf:
            paths[t0:t1] = -1
            continue
        for t in range(t1 - 1, t0 - 1, -1):
            paths[t] = state
            state = back[t, state]


@njit(**_OPTS)
def path_counts(paths, bounds, has_exit, tidx, counts):
    """Transition counts (B, S, S + 1) of best paths (N,) (-1: no path)."""
    s_count = counts.shape[1]
    for u in range(len(bounds) - 1):
        t0, t1 = bounds[u], bounds[u + 1]
        for i in range(s_count):
            for j in range(s_count + 1):
                counts[u, i, j] = 0.0
        if t1 <= t0 or paths[t0] < 0:
            continue
        for t in range(t0 + 1, t1):
            counts[u, paths[t - 1], paths[t]] += 1.0
        if has_exit[tidx[u]]:
            counts[u, paths[t1 - 1], s_count] += 1.0


@njit(**_OPTS)
def weigh_by_state(scores, owner, weight, resp):
    """``resp[k, t] = scores[k, t] · weight[owner[k], t]`` (``weight``: the state posterior
    over the state's total): the Gaussians' posteriors, in the dtype of ``resp`` (which may
    be ``scores``); those below 2^-82 are exact zeros (no subnormal number in the moments'
    products)."""
    k_count, n = scores.shape
    floor = 2.0 ** -FLUSH_BITS
    for k in range(k_count):
        s = owner[k]
        for t in range(n):
            r = scores[k, t] * weight[s, t]
            resp[k, t] = r if r >= floor else 0.0


@njit(**_OPTS)
def keep_path_state(scores, owner, paths, norm, resp):
    """``resp[k, t] = scores[k, t] · norm[s, t]`` if Gaussian k belongs to the state ``s =
    paths[t]``, else 0."""
    k_count, n = scores.shape
    for k in range(k_count):
        s = owner[k]
        for t in range(n):
            resp[k, t] = scores[k, t] * norm[s, t] if s == paths[t] else 0.0
