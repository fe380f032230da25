"""Left-to-right GMM-HMMs: forward-backward, Viterbi, statistics and updates, in numpy.

An :class:`HMM` has S emitting states, each a :class:`~emdist.models.gmm.GMM`, and is always
entered in state 0; ``transitions[s, j]`` is the probability of going from state s to state
j, column S that of leaving the model (the exit transition of Kaldi and HTK). A model with
no exit transition at all lets an utterance end in any state (as hmmlearn does).

The E-step scores all frames of a batch of utterances under all Gaussians of all states with
one matrix product (the stacked GMM, :meth:`HMM.stacked`), reduces them to per-state
log-emissions, runs forward-backward (or Viterbi) in the log domain on the padded batch -- a
Python loop over time only, vectorised over utterances and states -- and turns the component
posteriors into moments ``[1, x, x² | vech(x xᵀ)]`` with one more product. An utterance that
no path can align (too short for the topology) scores ``-inf``, adds nothing to the
statistics and is counted in :attr:`HmmStats.unaligned` (Kaldi's "no path").
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from emdist.errors import UserError
from emdist.models.estep import stats_from_moments
from emdist.models.gmm import GMM
from emdist.models.initialize import split
from emdist.models.kernel import Kernel, check_finite, expand_features, expanded_width
from emdist.models.mstep import MStepOptions, UpdateReport, m_step
from emdist.models.stats import GmmStats

FLAT_START_FLOOR = 0.01
"""The least probability of an allowed transition in a flat-start model (Kaldi's default
``--transition-floor``)."""

DEFAULT_BATCH_FRAMES = 16384
"""Padded frames (utterances x longest utterance) per batch of the E-step."""


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
# forward-backward and Viterbi on padded batches


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """``log Σ exp`` along ``axis``; ``-inf`` where every entry is ``-inf``, never NaN."""
    top = x.max(axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return np.log(np.exp(x - top).sum(axis=axis)) + top.squeeze(axis)


def _prepare(log_b, lengths, log_trans):
    """Checked arrays: emissions with 0 on padding, lengths, (B, S, S) transitions, (B, S)
    log end weights (the exit column, or 0 for "end anywhere") and which rows have an exit."""
    log_b = np.asarray(log_b, dtype=np.float64)
    b, t, s = log_b.shape
    if t == 0:
        raise ValueError("a batch needs at least one frame slot (T >= 1)")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (b,) or np.any(lengths < 0) or np.any(lengths > t):
        raise ValueError(f"lengths must be {b} values in [0, {t}]")
    log_b = np.where(np.arange(t)[None, :, None] < lengths[:, None, None], log_b, 0.0)
    log_trans = np.broadcast_to(np.asarray(log_trans, dtype=np.float64), (b, s, s + 1))
    has_exit = np.isfinite(log_trans[..., s]).any(axis=1)
    end = np.where(has_exit[:, None], log_trans[..., s], 0.0)
    return log_b, lengths, log_trans[..., :s], end, has_exit


def _last(scores: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each utterance's scores (B, S) at its last frame (garbage for empty ones)."""
    return scores[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]


def _totals(alpha: np.ndarray, lengths: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Total log-likelihoods from the forward scores: ``-inf`` for empty utterances."""
    return np.where(lengths > 0, _logsumexp(_last(alpha, lengths) + end, axis=1), -np.inf)


def _bands(trans: np.ndarray) -> list[tuple[int, np.ndarray]] | None:
    """The diagonals ``d >= 0`` of (B, S, S) log transitions that hold a finite entry, as
    (d, (B, S - d) values), for the banded recursions of a left-to-right model; None when
    an entry below the diagonal is finite (then the dense recursions run)."""
    s = trans.shape[-1]
    if np.isfinite(trans[:, np.tril_indices(s, -1)[0], np.tril_indices(s, -1)[1]]).any():
        return None
    out = []
    for d in range(s):
        diag = np.ascontiguousarray(np.diagonal(trans, offset=d, axis1=1, axis2=2))
        if d == 0 or np.isfinite(diag).any():
            out.append((d, diag))
    return out


def _forward(log_b: np.ndarray, trans: np.ndarray) -> np.ndarray:
    alpha = np.empty_like(log_b)
    alpha[:, 0] = np.where(np.arange(log_b.shape[2]) == 0, log_b[:, 0], -np.inf)  # entry: 0
    bands = _bands(trans)
    for t in range(1, log_b.shape[1]):
        prev = alpha[:, t - 1]
        if bands is None:
            alpha[:, t] = _logsumexp(prev[:, :, None] + trans, axis=1) + log_b[:, t]
            continue
        new = alpha[:, t]
        np.add(prev, bands[0][1], out=new)  # self-loops, then each further diagonal
        for d, diag in bands[1:]:
            np.logaddexp(new[:, d:], prev[:, :-d] + diag, out=new[:, d:])
        new += log_b[:, t]
    return alpha


def _backward(log_b: np.ndarray, trans: np.ndarray, lengths: np.ndarray,
              end: np.ndarray) -> np.ndarray:
    b, t, s = log_b.shape
    beta = np.empty_like(log_b)
    beta[:, t - 1] = end
    bands = _bands(trans)
    trans_t = trans.transpose(0, 2, 1)
    for step in range(t - 2, -1, -1):
        after = log_b[:, step + 1] + beta[:, step + 1]
        if bands is None:
            new = _logsumexp(after[:, :, None] + trans_t, axis=1)
        else:
            new = after + bands[0][1]
            for d, diag in bands[1:]:
                np.logaddexp(new[:, :-d], after[:, d:] + diag, out=new[:, :-d])
        beta[:, step] = np.where((step >= lengths - 1)[:, None], end, new)
    return beta


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
    log_b, lengths, trans, end, has_exit = _prepare(log_b, lengths, log_trans)
    b, t, s = log_b.shape
    alpha = _forward(log_b, trans)
    total = _totals(alpha, lengths, end)
    beta = _backward(log_b, trans, lengths, end)
    ok = np.isfinite(total)
    norm = np.where(ok, total, 0.0)[:, None, None]
    live = (np.arange(t) < lengths[:, None]) & ok[:, None]
    with np.errstate(under="ignore"):
        gamma = np.exp(np.where(live[..., None], alpha + beta - norm, -np.inf))
        counts = np.zeros((b, s, s + 1))
        if t > 1:
            _expected_transitions(alpha, log_b + beta, trans, norm, live, counts)
        final = _last(alpha, lengths) + end - norm[:, 0]
        counts[..., s] = np.exp(np.where((ok & has_exit)[:, None], final, -np.inf))
    return gamma, counts, total


def _expected_transitions(alpha, after, trans, norm, live, counts) -> None:
    """``counts[..., :S] = Σ_t ξ_t(i, j)``, ``ξ_t(i, j) = exp(α_t(i) + a_ij + b_t+1(j) +
    β_t+1(j) − total)``, over the transitions between live frames; by diagonal for a
    left-to-right model (2 or 3 of the S² pairs)."""
    inner = live[:, 1:] & live[:, :-1]  # (B, T - 1)
    bands = _bands(trans)
    if bands is None:
        log_xi = alpha[:, :-1, :, None] + trans[:, None] + after[:, 1:, None, :] - norm[..., None]
        counts[..., : trans.shape[-1]] = np.exp(
            np.where(inner[..., None, None], log_xi, -np.inf)).sum(axis=1)
        return
    s = trans.shape[-1]
    rows = np.arange(s)
    for d, diag in bands:
        log_xi = alpha[:, :-1, : s - d] + diag[:, None, :] + after[:, 1:, d:] - norm
        log_xi[~inner] = -np.inf
        counts[:, rows[: s - d], rows[d:]] = np.exp(log_xi).sum(axis=1)


def viterbi(log_b: np.ndarray, lengths: np.ndarray, log_trans: np.ndarray):
    """Best paths of a padded batch (arguments as :func:`forward_backward`).

    Returns
    -------
    loglike : ndarray of shape (B,)
        Best-path log-likelihoods, ``-inf`` where there is no path.
    paths : ndarray of shape (B, T), int
        States of the best paths; -1 on padding and for utterances with no path.
    """
    log_b, lengths, trans, end, _ = _prepare(log_b, lengths, log_trans)
    b, t, s = log_b.shape
    delta = np.empty_like(log_b)
    back = np.zeros((b, t, s), dtype=np.intp)
    delta[:, 0] = np.where(np.arange(s) == 0, log_b[:, 0], -np.inf)
    bands = _bands(trans)
    if bands is not None:  # candidates per diagonal d: from state j - d to j
        offsets = np.array([d for d, _ in bands])
        cand = np.full((len(bands), b, s), -np.inf)
    for step in range(1, t):
        prev = delta[:, step - 1]
        if bands is None:
            full = prev[:, :, None] + trans
            back[:, step] = full.argmax(axis=1)
            delta[:, step] = full.max(axis=1) + log_b[:, step]
            continue
        for k, (d, diag) in enumerate(bands):
            np.add(prev[:, : s - d], diag, out=cand[k][:, d:])
        best = cand.argmax(axis=0)
        back[:, step] = np.arange(s) - offsets[best]
        delta[:, step] = np.take_along_axis(cand, best[None], axis=0)[0] + log_b[:, step]
    final = _last(delta, lengths) + end
    best = np.where(lengths > 0, final.max(axis=1), -np.inf)
    state = final.argmax(axis=1)
    rows = np.arange(b)
    paths = np.full((b, t), -1, dtype=np.intp)
    aligned = np.isfinite(best)
    for step in range(t - 1, -1, -1):
        prev = back[rows, min(step + 1, t - 1), state]
        state = np.where(step < lengths - 1, prev, state)
        paths[:, step] = np.where(aligned & (step < lengths), state, -1)
    return best, paths


_best_path = viterbi


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


_KERNELS: weakref.WeakKeyDictionary[HMM, Kernel] = weakref.WeakKeyDictionary()


def _kernel(model: HMM) -> Kernel:
    """The stacked GMM's float64 kernel around the mean of its means, kept while ``model``
    lives (one Cholesky factorisation per Gaussian and model, not per batch)."""
    kernel = _KERNELS.get(model)
    if kernel is None:
        stacked = model.stacked()
        shift = stacked.weights @ stacked.means / model.n_states
        kernel = _KERNELS[model] = stacked.kernel(np.float64, shift=shift)
    return kernel


def _batches(utterances: Iterable[np.ndarray], dim: int | None,
             batch_frames: int) -> Iterator[list[np.ndarray]]:
    """Consecutive utterances (N_i, D) in float64, grouped while utterances x longest stays
    within ``batch_frames`` (an utterance longer than that is a batch of its own)."""
    batch: list[np.ndarray] = []
    longest = 0
    for utt in utterances:
        utt = np.asarray(utt, dtype=np.float64)
        if utt.ndim != 2 or (dim is not None and utt.shape[1] != dim):
            raise UserError(f"an utterance has shape {utt.shape}, expected (frames, {dim})")
        dim = utt.shape[1]
        longest_with = max(longest, len(utt))
        if batch and longest_with * (len(batch) + 1) > batch_frames:
            yield batch
            batch, longest_with = [], len(utt)
        batch.append(utt)
        longest = longest_with
    if batch:
        yield batch


def _expanded(frames: np.ndarray, covariance_type: str, shift) -> np.ndarray:
    """``[1, x - shift, (x - shift)² | vech]`` of frames (N, D), shape (N, 1 + E)."""
    n, d = frames.shape
    z = np.empty((n, 1 + expanded_width(d, covariance_type)))
    z[:, 0] = 1.0
    expand_features(frames - shift, covariance_type, out=z[:, 1:])
    return z


class _Batch:
    """Emissions of a batch of utterances: the expanded frames ``z`` (N, 1 + E), the
    within-state posteriors (N, ΣK), per-state log-emissions padded to (B, T, S), lengths,
    and each frame's (utterance, time) position."""

    def __init__(self, model: HMM, kernel: Kernel, batch: list[np.ndarray]) -> None:
        self.lengths = np.array([len(u) for u in batch], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(model.state_sizes)[:-1]])
        self.z = _expanded(np.concatenate(batch), model.covariance_type, kernel.shift)
        ll = kernel.component_log_likelihood(self.z[:, 1:])  # (N, ΣK): one product
        top = np.maximum.reduceat(ll, starts, axis=1)  # best Gaussian of each state
        check_finite(top.max(axis=1, initial=-np.inf))
        top = np.where(np.isfinite(top), top, 0.0)
        owner = model.component_state()
        with np.errstate(under="ignore"):
            post = np.exp(ll - top[:, owner])
        total = np.add.reduceat(post, starts, axis=1)
        with np.errstate(divide="ignore"):
            log_b = np.log(total) + top
        post /= np.where(total > 0, total, 1.0)[:, owner]
        self.within = post
        self.utt = np.repeat(np.arange(len(batch)), self.lengths)
        self.time = np.arange(len(self.utt)) - np.repeat(np.cumsum(self.lengths) - self.lengths,
                                                         self.lengths)
        self.log_b = np.zeros((len(batch), max(1, int(self.lengths.max())), model.n_states))
        self.log_b[self.utt, self.time] = log_b


def accumulate_hmm(model: HMM, utterances: Iterable[np.ndarray], hard: bool = False,
                   batch_frames: int = DEFAULT_BATCH_FRAMES) -> HmmStats:
    """Statistics of utterances (each (N_i, D)) under ``model``.

    With ``hard``, Viterbi training: each frame counts for the state of the best path (0/1
    occupancies and that path's transitions), the Gaussians within the state sharing it by
    their posteriors (Kaldi's ``gmm-acc-stats-ali``); ``loglike`` is then the best paths'.
    The result depends on ``batch_frames`` only through float rounding.
    """
    return accumulate_hmms({"": model}, {"": utterances}, hard, batch_frames)[""]


def accumulate_hmms(models: Mapping[str, HMM], utterances: Mapping[str, Iterable[np.ndarray]],
                    hard: bool = False, batch_frames: int = DEFAULT_BATCH_FRAMES
                    ) -> dict[str, HmmStats]:
    """Statistics of several models, each over its own utterances (a shard's words): the
    utterances of all models go through one forward-backward per group of about
    ``batch_frames`` frames (one loop over time for the group, not one per word)."""
    moments, counts, totals = {}, {}, {}
    for label in utterances:
        m = models[label]
        moments[label] = np.zeros((m.n_components, 1 + expanded_width(m.dim,
                                                                      m.covariance_type)))
        counts[label] = np.zeros(m.transitions.shape)
        totals[label] = [0.0, 0, 0, 0]  # loglike, frames, utts, unaligned
    for group in _groups(models, utterances, batch_frames):
        log_b, lengths, log_trans, rows = _stack(models, group)
        s = log_b.shape[2]
        if hard:
            total, paths = viterbi(log_b, lengths, log_trans)
            trans = path_counts(paths, lengths, s, bool(np.isfinite(log_trans[..., s]).any()))
        else:
            gamma, trans, total = forward_backward(log_b, lengths, log_trans)
        for (label, batch), (lo, hi) in zip(group, rows, strict=True):
            owner = models[label].component_state()
            if hard:
                occ = paths[lo:hi][batch.utt, batch.time][:, None] == np.arange(s)
            else:
                occ = gamma[lo:hi][batch.utt, batch.time]
            moments[label] += (batch.within * occ[:, owner]).T @ batch.z
            counts[label] += trans[lo:hi].sum(axis=0)
            ok = np.isfinite(total[lo:hi])
            sums = totals[label]
            sums[0] += float(total[lo:hi][ok].sum())
            sums[1] += int(batch.lengths[ok].sum())
            sums[2] += int(ok.sum())
            sums[3] += int((~ok).sum())
    out = {}
    for label in sorted(utterances):
        loglike, frames, utts, unaligned = totals[label]
        gmm = stats_from_moments(moments[label], _kernel(models[label]), loglike, frames)
        out[label] = HmmStats(gmm, counts[label], loglike, frames, utts, unaligned)
    return out


def _groups(models: Mapping[str, HMM], utterances: Mapping[str, Iterable[np.ndarray]],
            batch_frames: int) -> Iterator[list[tuple[str, _Batch]]]:
    """Emission batches of every model's utterances, in label order, grouped while the
    group holds at most ``batch_frames`` frames and its models have one number of states."""
    group: list[tuple[str, _Batch]] = []
    size = 0
    for label in utterances:
        model = models[label]
        kernel = _kernel(model)
        for utt_list in _batches(utterances[label], model.dim, batch_frames):
            batch = _Batch(model, kernel, utt_list)
            n = len(batch.utt)
            if group and (size + n > batch_frames
                          or models[group[0][0]].n_states != model.n_states):
                yield group
                group, size = [], 0
            group.append((label, batch))
            size += n
    if group:
        yield group


def _stack(models: Mapping[str, HMM], group: list[tuple[str, _Batch]]):
    """One padded batch of a group: log-emissions (B, T, S), lengths, per-utterance log
    transitions (B, S, S + 1), and each member's rows."""
    b = sum(len(batch.lengths) for _, batch in group)
    t = max(batch.log_b.shape[1] for _, batch in group)
    s = group[0][1].log_b.shape[2]
    log_b = np.zeros((b, t, s))
    log_trans = np.empty((b, s, s + 1))
    lengths = np.empty(b, dtype=np.int64)
    rows, lo = [], 0
    for label, batch in group:
        hi = lo + len(batch.lengths)
        log_b[lo:hi, : batch.log_b.shape[1]] = batch.log_b
        log_trans[lo:hi] = _log(models[label].transitions)
        lengths[lo:hi] = batch.lengths
        rows.append((lo, hi))
        lo = hi
    return log_b, lengths, log_trans, rows


def score_utterances(model: HMM, utterances: Iterable[np.ndarray], viterbi: bool = False,
                     batch_frames: int = DEFAULT_BATCH_FRAMES) -> np.ndarray:
    """Total forward (or best-path) log-likelihood of each utterance, ``-inf`` if no path."""
    return score_hmms({"": model}, list(utterances), viterbi, batch_frames)[""]


def score_hmms(models: Mapping[str, HMM], utterances: list[np.ndarray], viterbi: bool = False,
               batch_frames: int = DEFAULT_BATCH_FRAMES) -> dict[str, np.ndarray]:
    """Total forward (or best-path) log-likelihood of each utterance under each model, all
    models' forward passes of a group of utterances in one loop over time."""
    scores: dict[str, list[np.ndarray]] = {label: [] for label in models}
    for group in _groups(models, {label: utterances for label in models}, batch_frames):
        log_b, lengths, log_trans, rows = _stack(models, group)
        if viterbi:
            total = _best_path(log_b, lengths, log_trans)[0]
        else:
            log_b, lengths, trans, end, _ = _prepare(log_b, lengths, log_trans)
            total = _totals(_forward(log_b, trans), lengths, end)
        for (label, _), (lo, hi) in zip(group, rows, strict=True):
            scores[label].append(total[lo:hi])
    return {label: np.concatenate(v) if v else np.zeros(0) for label, v in scores.items()}


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

