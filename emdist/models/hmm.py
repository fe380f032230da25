"""Left-to-right GMM-HMMs: forward-backward, Viterbi, statistics and updates.

An :class:`HMM` has S emitting states, each a :class:`~emdist.models.gmm.GMM`, and is always
entered in state 0; ``transitions[s, j]`` is the probability of going from state s to state
j, column S that of leaving the model (the exit transition of Kaldi and HTK). A model with
no exit transition at all lets an utterance end in any state (as hmmlearn does).

The E-step takes a batch of one model's utterances laid end to end (no padding): one matrix
product scores every frame under every Gaussian of every state (the stacked GMM,
:meth:`HMM.stacked`, through the GMM's :class:`~emdist.models.kernel.Kernel`; float64 by
default), compiled loops (:mod:`emdist.models.hmm_kernels`, numba) reduce the scores to
per-state log-emissions and within-state posteriors, run forward-backward (or Viterbi) in
the log domain and weigh each Gaussian's posterior by its state's, and more products (in
float64 or float32, as the GMM's E-step) turn them into the moments ``[1, x, x² | vech(x
xᵀ)]``, summed in float64. An utterance that no path can align (too short for the
topology) scores ``-inf``, adds nothing to the statistics and is counted in
:attr:`HmmStats.unaligned` (Kaldi's "no path").
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from emdist.errors import UserError
from emdist.models import hmm_kernels as kernels
from emdist.models.estep import DEFAULT_CHUNK_SIZE, stats_from_moments
from emdist.models.gmm import GMM
from emdist.models.initialize import split
from emdist.models.kernel import (
    LN2,
    LOG2E,
    Kernel,
    check_finite,
    expand_features,
    expand_rows,
    expanded_width,
    grid_shift,
)
from emdist.models.mstep import MStepOptions, UpdateReport, m_step
from emdist.models.stats import GmmStats

FLAT_START_FLOOR = 0.01
"""The least probability of an allowed transition in a flat-start model (Kaldi's default
``--transition-floor``)."""

DEFAULT_BATCH_FRAMES = 16384
"""Frames per batch of the E-step (a longer utterance is a batch of its own)."""

ROWS_CHUNK = DEFAULT_CHUNK_SIZE
"""Expanded frames made at a time (for the products of the Gaussians' scores, and again
for those of the moments): few enough to stay in the CPU's cache."""


@dataclass(frozen=True, eq=False)
class HMM:
    """A left-to-right HMM whose emitting states are GMMs.

    Parameters
    ----------
    states : tuple of GMM
        S states of one dimension and covariance type; each state's weights sum to one.
    transitions : ndarray of shape (S, S + 1)
        Row s: probabilities from state s to states 0..S-1, then to the exit. Rows sum to one.
    """

    states: tuple[GMM, ...]
    transitions: np.ndarray

    kind = "hmm"  # the model kind (emdist.models.kind), not a field

    def __post_init__(self) -> None:
        states = tuple(self.states)
        if not states or not all(isinstance(g, GMM) and g.n_components for g in states):
            raise ValueError("an HMM needs at least one state, each a GMM with a Gaussian")
        first = states[0]
        if any((g.dim, g.covariance_type) != (first.dim, first.covariance_type) for g in states):
            raise ValueError("all states must share their dimension and covariance type")
        if not np.allclose([g.weights.sum() for g in states], 1.0, rtol=0, atol=1e-6):
            raise ValueError("the weights of each state must sum to one")
        trans = np.array(self.transitions, dtype=np.float64)
        s = len(states)
        if trans.shape != (s, s + 1):
            raise ValueError(f"transitions of {s} states must have shape {(s, s + 1)}, "
                             f"not {trans.shape}")
        if (not np.all(np.isfinite(trans)) or np.any(trans < 0)
                or not np.allclose(trans.sum(axis=1), 1.0, rtol=0, atol=1e-6)):
            raise ValueError("transition probabilities must be >= 0 with rows summing to one")
        trans.setflags(write=False)
        object.__setattr__(self, "states", states)
        object.__setattr__(self, "transitions", trans)

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def dim(self) -> int:
        return self.states[0].dim

    @property
    def covariance_type(self) -> str:
        return self.states[0].covariance_type

    @property
    def state_sizes(self) -> np.ndarray:
        """Gaussians per state K_s, shape (S,)."""
        return np.array([g.n_components for g in self.states], dtype=np.intp)

    @property
    def n_components(self) -> int:
        """Total number of Gaussians Σ K_s."""
        return int(self.state_sizes.sum())

    @property
    def has_exit(self) -> bool:
        return bool(self.transitions[:, self.n_states].any())

    def stacked(self) -> GMM:
        """All Gaussians in state order, each with its within-state weight (they sum to S)."""
        parts = [np.concatenate([getattr(g, name) for g in self.states])
                 for name in ("weights", "means", "covariances")]
        return GMM(*parts, self.covariance_type)

    def component_state(self) -> np.ndarray:
        """The state of each stacked Gaussian, shape (Σ K_s,)."""
        return np.repeat(np.arange(self.n_states), self.state_sizes)

    def log_likelihood(self, frames: np.ndarray, viterbi: bool = False) -> float:
        """Total forward (or best-path) log-likelihood of one utterance (N, D)."""
        return float(score_utterances(self, [frames], viterbi=viterbi)[0])

    def __repr__(self) -> str:
        return (f"HMM(S={self.n_states}, K={self.state_sizes.tolist()}, D={self.dim}, "
                f"covariance_type={self.covariance_type!r}, exit={self.has_exit})")


def topology(n_states: int, skip: bool = False, exit: bool = True) -> np.ndarray:
    """Allowed transitions of a left-to-right model, a bool mask of shape (S, S + 1).

    Self-loops, s -> s + 1 and, with ``skip``, s -> s + 2; column S is the exit, reached from
    the last state (and by a skip from the one before) only with ``exit``. Without ``exit``
    an utterance may end in any state.
    """
    s = np.arange(n_states)
    mask = np.zeros((n_states, n_states + 1), dtype=bool)
    mask[s, s] = True
    for step in (1, 2) if skip else (1,):
        to = s + step
        ok = to < n_states + int(exit)
        mask[s[ok], to[ok]] = True
    return mask


def initial_transitions(mask: np.ndarray) -> np.ndarray:
    """Uniform probabilities over each row's allowed entries of ``mask`` (S, S + 1)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any(axis=1).all():
        raise ValueError("every state needs an allowed transition")
    return mask / mask.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------
# forward-backward and Viterbi (the loops are compiled: emdist.models.hmm_kernels)


@dataclass(frozen=True, eq=False)
class _Topology:
    """What the compiled loops need of M models' log transitions (M, S, S + 1), in log2
    units: those between emitting states (M, S, S), the same as bands ``band[m, d, j] =
    log2 a(j - d, j)`` (M, 3, S + 2; -inf outside), how many bands a left-to-right model
    uses (2, or 3 with skips; 0 if another transition is allowed: then the loops run on
    lists), the log2 end weights (M, S) (the exit column, or 0 for "end anywhere"), which
    models have an exit, and the allowed transitions (finite in any model) as lists of
    predecessors: those of state j are ``pred[pred_ptr[j] : pred_ptr[j + 1]]``."""

    trans: np.ndarray
    band: np.ndarray
    n_bands: int
    end: np.ndarray
    has_exit: np.ndarray
    pred_ptr: np.ndarray
    pred: np.ndarray

    @classmethod
    def of(cls, log_trans: np.ndarray) -> _Topology:
        log_trans = np.asarray(log_trans, dtype=np.float64)
        s = log_trans.shape[-2]
        if log_trans.ndim != 3 or log_trans.shape[-1] != s + 1:
            raise ValueError(f"log transitions must have shape (M, S, S + 1), "
                             f"not {log_trans.shape}")
        trans = np.ascontiguousarray(log_trans[..., :s] * LOG2E)
        has_exit = np.isfinite(log_trans[..., s]).any(axis=1)
        end = np.ascontiguousarray(np.where(has_exit[:, None], log_trans[..., s] * LOG2E, 0.0))
        allowed = np.isfinite(trans).any(axis=0)  # (S, S)
        steps = np.subtract.outer(-np.arange(s), -np.arange(s))[allowed]  # j - i, allowed
        n_bands = 0
        if steps.size and steps.min() >= 0 and steps.max() <= 2 and allowed.diagonal().all():
            n_bands = 3 if steps.max() == 2 else 2
        band = np.full((len(trans), 3, s + 2), -np.inf)
        for d in range(3):
            band[:, d, d:s] = np.diagonal(trans, offset=d, axis1=1, axis2=2)
        to_j, from_i = np.nonzero(allowed.T)  # predecessors of each j, i ascending
        pred_ptr = np.searchsorted(to_j, np.arange(s + 1)).astype(np.int64)
        return cls(trans, band, n_bands, end, has_exit, pred_ptr, from_i.astype(np.int64))

    def arrays(self) -> tuple:
        return (self.trans, self.band, self.n_bands, self.end, self.has_exit, self.pred_ptr,
                self.pred)


def _flatten(log_b, lengths, log_trans):
    """A padded batch laid end to end: log2-emissions (N, S), bounds (B + 1,), the frames'
    mask (B, T), per-utterance topology indices and the topology."""
    log_b = np.asarray(log_b, dtype=np.float64)
    b, t, s = log_b.shape
    if t == 0:
        raise ValueError("a batch needs at least one frame slot (T >= 1)")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (b,) or np.any(lengths < 0) or np.any(lengths > t):
        raise ValueError(f"lengths must be {b} values in [0, {t}]")
    live = np.arange(t) < lengths[:, None]
    flat = np.ascontiguousarray(log_b[live] * LOG2E)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    log_trans = np.asarray(log_trans, dtype=np.float64)
    if log_trans.ndim == 2:  # one model for all: one topology
        return flat, bounds, live, np.zeros(b, dtype=np.int64), _Topology.of(log_trans[None])
    topo = _Topology.of(np.broadcast_to(log_trans, (b, s, s + 1)))
    return flat, bounds, live, np.arange(b, dtype=np.int64), topo


def forward_backward(log_b: np.ndarray, lengths: np.ndarray, log_trans: np.ndarray):
    """Posteriors of a padded batch of utterances, in the log domain.

    Parameters
    ----------
    log_b : ndarray of shape (B, T, S)
        Log-emissions of each state; entries past an utterance's length are ignored.
    lengths : ndarray of shape (B,)
    log_trans : ndarray of shape (S, S + 1) or (B, S, S + 1)
        Log transition probabilities, exit column last (all ``-inf``: end in any state).

    Returns
    -------
    gamma : ndarray of shape (B, T, S)
        State posteriors, zero on padding and for utterances with no path.
    trans_counts : ndarray of shape (B, S, S + 1)
        Expected transition counts, exits in column S.
    loglike : ndarray of shape (B,)
        Total log-likelihoods, ``-inf`` for utterances that no path can align.
    """
    flat, bounds, live, tidx, topo = _flatten(log_b, lengths, log_trans)
    b, t, s = live.shape + (flat.shape[1],)
    gamma = np.empty_like(flat)
    counts = np.empty((b, s, s + 1))
    totals = np.empty(b)
    _fb(flat, bounds, tidx, topo, gamma, counts, totals)
    out = np.zeros((b, t, s))
    out[live] = gamma
    return out, counts, totals * LN2


def _fb(log_b, bounds, tidx, topo: _Topology, gamma, counts, totals) -> None:
    """:func:`~emdist.models.hmm_kernels.forward_backward` (log2 units)."""
    kernels.forward_backward(log_b, bounds, tidx, topo.arrays(), np.empty_like(log_b),
                             gamma, counts, totals)


def _viterbi(log_b, bounds, tidx, topo: _Topology, best, paths) -> None:
    """:func:`~emdist.models.hmm_kernels.viterbi` (log2 units)."""
    kernels.viterbi(log_b, bounds, tidx, topo.arrays(), np.empty_like(log_b),
                    np.empty(log_b.shape, dtype=np.int64), best, paths)


def viterbi(log_b: np.ndarray, lengths: np.ndarray, log_trans: np.ndarray):
    """Best paths of a padded batch (arguments as :func:`forward_backward`).

    Returns
    -------
    loglike : ndarray of shape (B,)
        Best-path log-likelihoods, ``-inf`` where there is no path.
    paths : ndarray of shape (B, T), int
        States of the best paths; -1 on padding and for utterances with no path.
    """
    flat, bounds, live, tidx, topo = _flatten(log_b, lengths, log_trans)
    best = np.empty(live.shape[0])
    flat_paths = np.empty(len(flat), dtype=np.int64)
    _viterbi(flat, bounds, tidx, topo, best, flat_paths)
    paths = np.full(live.shape, -1, dtype=np.intp)
    paths[live] = flat_paths
    return best * LN2, paths


def path_counts(paths: np.ndarray, lengths: np.ndarray, n_states: int,
                exit: bool) -> np.ndarray:
    """Transition counts of Viterbi paths (B, T) (-1 = none), shape (B, S, S + 1)."""
    b, s = len(paths), n_states
    src, dst = paths[:, :-1], paths[:, 1:]
    ok = (src >= 0) & (dst >= 0)
    utt = np.broadcast_to(np.arange(b)[:, None], src.shape)[ok]
    flat = (utt * s + src[ok]) * (s + 1) + dst[ok]
    counts = np.bincount(flat, minlength=b * s * (s + 1)).reshape(b, s, s + 1).astype(float)
    if exit:
        ends = np.flatnonzero(paths[:, 0] >= 0)
        counts[ends, paths[ends, lengths[ends] - 1], s] += 1.0
    return counts


# --------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True, eq=False)
class HmmStats:
    """Additive statistics of an HMM.

    Parameters
    ----------
    gmm : GmmStats
        Statistics of the stacked Gaussians, in state order.
    transitions : ndarray of shape (S, S + 1)
        Expected transition counts, exits in column S.
    loglike : float
        Total log-likelihood of the aligned utterances.
    frames, utts : int
        Frames and utterances that were aligned (and counted).
    unaligned : int
        Utterances skipped because no path could align them.
    """

    gmm: GmmStats
    transitions: np.ndarray
    loglike: float = 0.0
    frames: int = 0
    utts: int = 0
    unaligned: int = 0

    def __post_init__(self) -> None:
        trans = np.ascontiguousarray(self.transitions, dtype=np.float64)
        if trans.ndim != 2 or trans.shape[1] != trans.shape[0] + 1:
            raise ValueError(f"transition counts must have shape (S, S + 1), not {trans.shape}")
        object.__setattr__(self, "transitions", trans)
        object.__setattr__(self, "loglike", float(self.loglike))
        for name in ("frames", "utts", "unaligned"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def zero(cls, model: HMM) -> HmmStats:
        """The neutral element of ``+`` for ``model``."""
        gmm = GmmStats.zero(model.n_components, model.dim, model.covariance_type)
        return cls(gmm, np.zeros(model.transitions.shape))

    @property
    def n_components(self) -> int:
        return self.gmm.n_components

    @property
    def occupancy(self) -> float:
        """Total state occupancy (the frames aligned)."""
        return self.gmm.occupancy

    @property
    def dim(self) -> int:
        return self.gmm.dim

    @property
    def covariance_type(self) -> str:
        return self.gmm.covariance_type

    def __add__(self, other: HmmStats) -> HmmStats:
        if not isinstance(other, HmmStats):
            return NotImplemented
        if other.transitions.shape != self.transitions.shape:
            raise ValueError(f"cannot add statistics of {self.transitions.shape[0]} and "
                             f"{other.transitions.shape[0]} states")
        return HmmStats(self.gmm + other.gmm, self.transitions + other.transitions,
                        self.loglike + other.loglike, self.frames + other.frames,
                        self.utts + other.utts, self.unaligned + other.unaligned)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """float64 and int64 arrays for an ``.npz`` file (no pickle)."""
        out = self.gmm.to_arrays(prefix + "gmm_")
        out[prefix + "transitions"] = self.transitions
        out[prefix + "loglike"] = np.array(self.loglike)
        for name in ("frames", "utts", "unaligned"):
            out[prefix + name] = np.array(getattr(self, name), dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> HmmStats:
        return cls(GmmStats.from_arrays(arrays, prefix + "gmm_"), arrays[prefix + "transitions"],
                   *(arrays[prefix + name][()]
                     for name in ("loglike", "frames", "utts", "unaligned")))


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the E-step of one model needs, built once per model and precision: the stacked
    GMM's kernel, each state's first Gaussian (S + 1,), each Gaussian's state, the topology
    and the expansion's width."""

    kernel: Kernel
    starts: np.ndarray
    owner: np.ndarray
    topology: _Topology
    width: int

    @property
    def n_states(self) -> int:
        return len(self.starts) - 1


_PLANS: weakref.WeakKeyDictionary[HMM, dict[str, _Plan]] = weakref.WeakKeyDictionary()


def _plan(model: HMM, dtype: str = "float64") -> _Plan:
    """The model's :class:`_Plan` in ``dtype``, kept while ``model`` lives (one Cholesky
    factorisation per Gaussian and model, not per batch).

    The stacked GMM's kernel is centred on the mean of its means (on the 2⁻¹⁰ grid,
    :func:`~emdist.models.kernel.grid_shift`); in float32 a common offset is taken out of
    its constants too, as the GMM's float32 E-step does (:func:`~emdist.models.estep.
    make_kernel`)."""
    plans = _PLANS.setdefault(model, {})
    plan = plans.get(dtype)
    if plan is None:
        stacked = model.stacked()
        shift = grid_shift(stacked.weights @ stacked.means / model.n_states)
        kernel = Kernel.from_gmm(stacked, np.dtype(dtype), shift=shift,
                                 common_offset=dtype != "float64")
        sizes = model.state_sizes
        plan = plans[dtype] = _Plan(
            kernel, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            np.repeat(np.arange(model.n_states), sizes).astype(np.int64),
            _Topology.of(_log(model.transitions)[None]),
            1 + expanded_width(model.dim, model.covariance_type))
    return plan


def _batches(utterances: Iterable[np.ndarray], dim: int | None,
             batch_frames: int) -> Iterator[list[np.ndarray]]:
    """Consecutive utterances (N_i, D), grouped while the group holds at most
    ``batch_frames`` frames (an utterance longer than that is a batch of its own)."""
    batch: list[np.ndarray] = []
    size = 0
    for utt in utterances:
        if type(utt) is not np.ndarray:
            utt = np.asarray(utt)
        shape = utt.shape
        if len(shape) != 2 or (dim is not None and shape[1] != dim):
            raise UserError(f"an utterance has shape {shape}, expected (frames, {dim})")
        dim = shape[1]
        if batch and size + shape[0] > batch_frames:
            yield batch
            batch, size = [], 0
        batch.append(utt)
        size += shape[0]
    if batch:
        yield batch


def _expanded(frames: np.ndarray, covariance_type: str, shift) -> np.ndarray:
    """``[1, x - shift, (x - shift)² | vech]`` of frames (N, D), shape (N, 1 + E)."""
    n, d = frames.shape
    z = np.empty((n, 1 + expanded_width(d, covariance_type)))
    z[:, 0] = 1.0
    expand_features(frames - shift, covariance_type, out=z[:, 1:])
    return z


class _Emissions:
    """Per-state log-emissions of batches of utterances, with buffers reused from batch to
    batch and from model to model.

    For a batch of N frames under a model's :class:`_Plan`: the expanded frames as columns
    (as :class:`~emdist.models.kernel.Rows`: ``[1; x - shift; (x - shift)² or vech;
    0...]``), made :data:`ROWS_CHUNK` frames at a time (:meth:`rows`), are multiplied by the
    kernel's constants into the stacked Gaussians' log2-scores ``scores`` (ΣK, N); then, as
    in the GMM's E-step, each is taken relative to the best of
    its state, floored at -82 and raised to the power of 2 in one vectorised pass (compiled
    loops around it: :func:`~emdist.models.hmm_kernels.state_tops` and
    :func:`~emdist.models.hmm_kernels.state_totals`). ``log_b`` (N, S) then holds the
    per-state log2-emissions (float64) and ``scores · norm`` the within-state posteriors."""

    def __init__(self) -> None:
        self._rows: dict[tuple, np.ndarray] = {}
        self._flat: dict[tuple, np.ndarray] = {}

    def _array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A C-contiguous ``shape`` array of a buffer kept from call to call."""
        size = int(np.prod(shape))
        buf = self._flat.get((name, dtype))
        if buf is None or buf.size < size:
            buf = self._flat[(name, dtype)] = np.empty(max(size, 1), dtype=dtype)
        return buf[:size].reshape(shape)

    def rows(self, start: int, stop: int, dtype=None) -> np.ndarray:
        """Expanded frames ``start:stop`` of the batch last loaded, as columns (P, stop -
        start), in ``dtype`` (the kernel's by default); valid until the next call."""
        kernel = self._kernel
        dtype = kernel.dtype if dtype is None else np.dtype(dtype)
        key = (dtype, kernel.width)
        data = self._rows.get(key)
        if data is None or data.shape[1] < stop - start:  # rows past the expansion stay 0
            data = self._rows[key] = np.zeros((kernel.width, max(stop - start, ROWS_CHUNK)),
                                              dtype=dtype)
        diag = kernel.covariance_type == "diag"
        kernels.load_frames(self._frames, start, stop, kernel.shift, data, diag)
        if not diag:
            expand_rows(data[:, : stop - start], kernel.dim, kernel.covariance_type)
        return data[:, : stop - start]

    def load(self, plan: _Plan, batch: list[np.ndarray]) -> tuple[int, np.ndarray]:
        """Frames and bounds (B + 1,) of ``batch``; fills ``scores``, ``log_b`` and
        ``norm``. The expanded frames are made chunk by chunk (:meth:`rows`), so that they
        stay in the CPU's cache: for these products and again for the moments."""
        kernel = self._kernel = plan.kernel
        bounds = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum([len(u) for u in batch], out=bounds[1:])
        n = int(bounds[-1])
        d = kernel.dim
        self._frames = self._array("frames", (d, n), np.result_type(*batch))
        if n:
            np.concatenate([u.T for u in batch], axis=1, out=self._frames)
        s = plan.n_states
        totals = self._array("totals", (s, n), np.float64)
        scores = self._array("scores", (kernel.n_components, n), kernel.dtype)
        offset = kernel.offset[: 1 + d]
        if offset.any():  # the common offset c·R of each frame, in float64
            common = self._array("common", (n,), np.float64)
        for start in range(0, n, ROWS_CHUNK):
            stop = min(start + ROWS_CHUNK, n)
            rows = self.rows(start, stop)
            np.matmul(kernel.fast, rows, out=scores[:, start:stop])
            if offset.any():
                kernels.frame_offsets(rows, stop - start, offset, common[start:stop])
        tops = self._array("tops", (s, n), np.float64)
        if kernels.state_tops(scores, plan.starts, tops):
            check_finite(tops.max(axis=0))  # raises: NaN or inf in the features
        np.exp2(scores, out=scores)
        self.norm = self._array("norm", (s, n), np.float64)
        kernels.state_totals(scores, plan.starts, totals, self.norm)
        with np.errstate(divide="ignore"):
            np.log2(totals, out=totals)  # log2 0 = -inf: a state of no weight
        totals += tops
        if offset.any():
            totals += LOG2E * common
        self.log_b = self._array("log_b", (n, s), np.float64)
        np.copyto(self.log_b, totals.T)
        self.scores = scores
        return n, bounds


def accumulate_hmm(model: HMM, utterances: Iterable[np.ndarray], hard: bool = False,
                   batch_frames: int = DEFAULT_BATCH_FRAMES, dtype: str = "float64",
                   chunk_size: int = DEFAULT_CHUNK_SIZE, moments_dtype: str | None = None
                   ) -> HmmStats:
    """Statistics of utterances (each (N_i, D)) under ``model``.

    With ``hard``, Viterbi training: each frame counts for the state of the best path (0/1
    occupancies and that path's transitions), the Gaussians within the state sharing it by
    their posteriors (Kaldi's ``gmm-acc-stats-ali``); ``loglike`` is then the best paths'.
    ``dtype`` is the precision of the Gaussians' scores (which make the per-state
    emissions and the log-likelihood), ``moments_dtype`` (``dtype`` by default) that of the
    moments' products of ``chunk_size`` frames (as the GMM E-step's
    ``EStepOptions.dtype``); the recursions and the sums are float64. The result depends on
    ``batch_frames`` and ``chunk_size`` only through float rounding.
    """
    return accumulate_hmms({"": model}, {"": utterances}, hard, batch_frames, dtype,
                           chunk_size, moments_dtype)[""]


def accumulate_hmms(models: Mapping[str, HMM], utterances: Mapping[str, Iterable[np.ndarray]],
                    hard: bool = False, batch_frames: int = DEFAULT_BATCH_FRAMES,
                    dtype: str = "float64", chunk_size: int = DEFAULT_CHUNK_SIZE,
                    moments_dtype: str | None = None) -> dict[str, HmmStats]:
    """Statistics of several models, each over its own utterances (a shard's words), in
    batches of about ``batch_frames`` frames (see :func:`accumulate_hmm`).

    Per batch: the stacked Gaussians' scores (one product), per-state log-emissions and
    within-state posteriors, forward-backward (or Viterbi) over the batch's utterances, the
    Gaussians' posteriors (within-state posterior x state posterior), all compiled loops
    (:mod:`emdist.models.hmm_kernels`); then the moments ``[1, x, x² | vech]`` by products
    of ``chunk_size`` frames in ``moments_dtype``, each added to float64 sums, as the GMM's
    E-step does.
    """
    out = {}
    emissions = _Emissions()
    moments_dtype = np.dtype(moments_dtype or dtype)
    for label in sorted(utterances):
        model = models[label]
        plan = _plan(model, dtype)
        moments = np.zeros((plan.kernel.width, model.n_components))
        counts = np.zeros(model.transitions.shape)
        loglike, frames, utts, unaligned = 0.0, 0, 0, 0
        for batch in _batches(utterances[label], model.dim, batch_frames):
            n, bounds = emissions.load(plan, batch)
            b = len(batch)
            log_b, scores = emissions.log_b, emissions.scores
            per_utt = np.empty((b, *model.transitions.shape))
            total = np.empty(b)
            tidx = np.zeros(b, dtype=np.int64)
            resp = (scores if scores.dtype == moments_dtype else
                    emissions._array("resp", scores.shape, moments_dtype))
            if hard:
                paths = np.empty(n, dtype=np.int64)
                _viterbi(log_b, bounds, tidx, plan.topology, total, paths)
                kernels.path_counts(paths, bounds, plan.topology.has_exit, tidx, per_utt)
                kernels.keep_path_state(scores, plan.owner, paths, emissions.norm, resp)
            else:
                gamma = np.empty_like(log_b)
                _fb(log_b, bounds, tidx, plan.topology, gamma, per_utt, total)
                weight = np.multiply(gamma.T, emissions.norm, out=emissions.norm)
                kernels.weigh_by_state(scores, plan.owner, weight, resp)
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                rows = emissions.rows(start, stop, moments_dtype)
                moments += np.matmul(rows, resp[:, start:stop].T)
            counts += per_utt.sum(axis=0)
            total *= LN2
            ok = np.isfinite(total)
            loglike += float(total[ok].sum())
            frames += int((bounds[1:] - bounds[:-1])[ok].sum())
            utts += int(ok.sum())
            unaligned += b - int(ok.sum())
        gmm = stats_from_moments(moments[: plan.width].T, plan.kernel, loglike, frames)
        out[label] = HmmStats(gmm, counts, loglike, frames, utts, unaligned)
    return out


def score_utterances(model: HMM, utterances: Iterable[np.ndarray], viterbi: bool = False,
                     batch_frames: int = DEFAULT_BATCH_FRAMES) -> np.ndarray:
    """Total forward (or best-path) log-likelihood of each utterance, ``-inf`` if no path."""
    return score_hmms({"": model}, list(utterances), viterbi, batch_frames)[""]


def score_hmms(models: Mapping[str, HMM], utterances: list[np.ndarray], viterbi: bool = False,
               batch_frames: int = DEFAULT_BATCH_FRAMES, dtype: str = "float64"
               ) -> dict[str, np.ndarray]:
    """Total forward (or best-path) log-likelihood of each utterance under each model
    (Gaussian scores in ``dtype``, float64 by default; the recursions in float64)."""
    batches = list(_batches(utterances, None, batch_frames))
    emissions = _Emissions()
    scores: dict[str, np.ndarray] = {}
    for label, model in models.items():
        plan = _plan(model, dtype)
        parts = []
        for batch in batches:
            n, bounds = emissions.load(plan, batch)
            total = np.empty(len(batch))
            tidx = np.zeros(len(batch), dtype=np.int64)
            if viterbi:
                _viterbi(emissions.log_b, bounds, tidx, plan.topology, total,
                         np.empty(n, dtype=np.int64))
            else:
                kernels.forward(emissions.log_b, bounds, tidx, plan.topology.arrays(),
                                np.empty((n, plan.n_states)), total)
            parts.append(total * LN2)
        scores[label] = np.concatenate(parts) if parts else np.zeros(0)
    return scores


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def uniform_segmentation_stats(n_states: int, utterances: Iterable[np.ndarray],
                               covariance_type: str, mask: np.ndarray,
                               batch_frames: int = DEFAULT_BATCH_FRAMES) -> HmmStats:
    """Statistics of a flat start: each utterance of T >= S frames cut into S parts at
    ``round(s·T/S)`` (halves rounded up), part s counting fully for state s (one Gaussian
    per state), with the transitions of that alignment (an exit at the end if ``mask``
    has exits). Shorter utterances are counted in ``unaligned``."""
    s = n_states
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (s, s + 1):
        raise ValueError(f"the mask of {s} states must have shape {(s, s + 1)}")
    moments, dim, utts, unaligned = 0.0, None, 0, 0
    for batch in _batches(utterances, None, batch_frames):
        dim = batch[0].shape[1]
        kept = [u for u in batch if len(u) >= s]
        utts, unaligned = utts + len(kept), unaligned + len(batch) - len(kept)
        lengths = np.array([len(u) for u in kept], dtype=np.int64)
        size = np.repeat(lengths, lengths)  # T of each frame's utterance
        t = np.arange(len(size)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        state = ((2 * t + 1) * s + 2 * size - 1) // (2 * size) - 1  # largest s: b_s <= t
        z = _expanded(np.concatenate([np.empty((0, dim)), *kept]), covariance_type, 0.0)
        moments = moments + (state[:, None] == np.arange(s)).T.astype(np.float64) @ z
    if dim is None:
        raise UserError("no utterances to segment")
    layout = GMM(np.ones(1), np.zeros((1, dim)), np.ones((1, dim)) if covariance_type == "diag"
                 else np.eye(dim)[None], covariance_type).kernel()  # zero shift: only its layout
    frames = int(round(moments[:, 0].sum()))
    gmm = stats_from_moments(moments, layout, 0.0, frames)
    counts = np.zeros((s, s + 1))
    counts[np.arange(s), np.arange(s)] = gmm.zeroth - utts  # T_s - 1 self-loops per part
    counts[np.arange(s - 1), np.arange(1, s)] = utts
    counts[s - 1, s] = utts if mask[:, s].any() else 0.0
    if np.any(counts[~mask] > 0):
        raise ValueError("the mask does not allow the transitions of a uniform segmentation")
    return HmmStats(gmm, counts, 0.0, frames, utts, unaligned)


# --------------------------------------------------------------------------------------
# updates


def _state_stats(stats: GmmStats, start: int, stop: int) -> GmmStats:
    return GmmStats(stats.zeroth[start:stop], stats.first[start:stop], stats.second[start:stop])


def _normalise(counts: np.ndarray, allowed: np.ndarray, fallback: np.ndarray,
               floor: float = 0.0) -> np.ndarray:
    """Counts normalised over each row's allowed entries; rows with no counts: ``fallback``."""
    counts = np.where(allowed, counts, 0.0)
    total = counts.sum(axis=1, keepdims=True)
    probs = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    if floor > 0:
        probs = np.where(allowed, np.maximum(probs, floor), 0.0)
        probs /= probs.sum(axis=1, keepdims=True)
    return np.where(total > 0, probs, fallback)


def update_hmm(stats: HmmStats, previous: HMM, options: MStepOptions,
               transition_floor: float = 0.0) -> tuple[HMM, UpdateReport]:
    """The M-step: :func:`~emdist.models.mstep.m_step` state by state, transitions by
    normalised counts over the entries ``previous`` allows (zeros stay zeros).

    A state with no occupancy at all keeps its GMM (its Gaussians reported as not updated),
    a row with no counts its probabilities. ``transition_floor`` (Kaldi's
    ``--transition-floor``; 0, plain maximum likelihood, by default) floors allowed
    probabilities before renormalising. Indices in the report are into the stacked Gaussians.
    """
    if (stats.n_components, stats.transitions.shape) != (previous.n_components,
                                                          previous.transitions.shape):
        raise ValueError("statistics and model have different numbers of Gaussians or states")
    bounds = np.concatenate([[0], np.cumsum(previous.state_sizes)])
    states, reports = [], []
    for s, gmm in enumerate(previous.states):  # S updates, each vectorised over Gaussians
        part = _state_stats(stats.gmm, bounds[s], bounds[s + 1])
        if part.zeroth.sum() > 0:
            new, report = m_step(part, options, previous=gmm)
        else:
            k = gmm.n_components
            new, report = gmm, UpdateReport(k, k, not_updated=list(range(k)))
        states.append(new)
        reports.append(report)
    trans = _normalise(stats.transitions, previous.transitions > 0, previous.transitions,
                       transition_floor)
    report = UpdateReport(
        sum(r.n_components_in for r in reports), sum(r.n_components_out for r in reports),
        sum(r.floored_elements for r in reports), sum(r.floored_gaussians for r in reports),
        [int(bounds[s] + c) for s, r in enumerate(reports) for c in r.removed],
        [int(bounds[s] + c) for s, r in enumerate(reports) for c in r.not_updated])
    return HMM(tuple(states), trans), report


def hmm_from_segmentation(stats: HmmStats, mask: np.ndarray, options: MStepOptions) -> HMM:
    """The flat-start model of :func:`uniform_segmentation_stats`: one Gaussian per state,
    transitions normalised over ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    s = mask.shape[0]
    if stats.n_components != s or stats.transitions.shape != mask.shape:
        raise ValueError(f"expected the statistics of {s} single-Gaussian states")
    empty = np.flatnonzero(stats.gmm.zeroth <= 0)
    if empty.size:
        raise UserError(
            f"state(s) {empty.tolist()} got no frames from the uniform segmentation "
            f"({stats.utts} utterances of at least {s} frames, {stats.unaligned} shorter); "
            "use more data or fewer states")
    states = tuple(m_step(_state_stats(stats.gmm, k, k + 1), options)[0] for k in range(s))
    # a uniform segmentation never skips: allowed transitions it did not use (skips) start
    # at FLAT_START_FLOOR, so that Baum-Welch can make use of them (it keeps zeros zero)
    return HMM(states, _normalise(stats.transitions, mask, initial_transitions(mask),
                                  FLAT_START_FLOOR))


def split_states(model: HMM, target, perturb_factor: float,
                 rng: np.random.Generator) -> HMM:
    """Mix-up: split each state's GMM (:func:`~emdist.models.initialize.split`) up to
    ``target`` Gaussians (an int for every state, or one per state), in state order."""
    targets = np.broadcast_to(np.asarray(target, dtype=np.intp), (model.n_states,))
    pairs = zip(model.states, targets, strict=True)
    states = tuple(split(g, int(k), perturb_factor, rng) for g, k in pairs)
    return HMM(states, model.transitions)

