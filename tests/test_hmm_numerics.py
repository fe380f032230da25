"""Left-to-right GMM-HMM numerics against independent references.

* forward-backward and Viterbi against brute-force enumeration of every state path;
* one Baum-Welch iteration against hmmlearn, its priors set to make its M-step plain
  maximum likelihood (see :func:`test_one_iteration_matches_hmmlearn`);
* uniform segmentation against a hand-computed example;
* properties: batching independence, additivity, monotone likelihood under EM, 0/1
  occupancies of Viterbi training, no NaN from utterances that no path aligns.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

import emdist
from emdist.data.datadir import load_feats
from emdist.errors import UserError
from emdist.models.gmm import GMM
from emdist.models.hmm import (
    HMM,
    HmmStats,
    accumulate_hmm,
    forward_backward,
    hmm_from_segmentation,
    initial_transitions,
    path_counts,
    score_utterances,
    split_states,
    topology,
    uniform_segmentation_stats,
    update_hmm,
    viterbi,
)
from emdist.models.mstep import MStepOptions
from emdist.models.stats import GmmStats

pytestmark = pytest.mark.usefixtures("one_blas_thread")

MLE = MStepOptions(style="kaldi", min_variance=0.0, variance_floor=0.0, max_condition=np.inf,
                   min_gaussian_occupancy=0.0, min_gaussian_weight=0.0,
                   remove_low_count_gaussians=False)
"""Plain maximum likelihood: the Kaldi-style update with every floor and threshold off
(``style="sklearn", reg_covar=0`` is MLE too but adds 10·eps to each occupancy, a relative
change of 1e-10 for a Gaussian with an occupancy of 1e-5)."""
TOPOLOGIES = list(itertools.product((False, True), (False, True)))  # (skip, exit)


def random_transitions(rng, mask) -> np.ndarray:
    probs = np.zeros(mask.shape)
    for s, row in enumerate(mask):
        probs[s, row] = rng.dirichlet(np.full(row.sum(), 2.0))
    return probs


def random_gmm(rng, k: int, d: int, cov_type: str, spread: float = 2.0) -> GMM:
    means = rng.normal(0.0, spread, (k, d))
    if cov_type == "diag":
        cov = rng.uniform(0.5, 2.0, (k, d))
    else:
        a = rng.normal(size=(k, d, d)) / np.sqrt(d)
        cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    return GMM(rng.dirichlet(np.full(k, 3.0)), means, cov, cov_type)


def random_hmm(rng, n_states=3, k=2, d=3, cov_type="diag", skip=False, exit=True) -> HMM:
    states = tuple(random_gmm(rng, k, d, cov_type) for _ in range(n_states))
    return HMM(states, random_transitions(rng, topology(n_states, skip, exit)))


def sample(model: HMM, rng, n_utts: int, max_frames: int = 200) -> list[np.ndarray]:
    """Utterances drawn from ``model`` (a loop per frame: a test reference only)."""
    s, out = model.n_states, []
    while len(out) < n_utts:
        frames, state, limit = [], 0, rng.integers(max_frames // 2, max_frames + 1)
        while state < s and len(frames) < limit:
            g = model.states[state]
            k = rng.choice(g.n_components, p=g.weights)
            cov = g.covariances[k] if g.covariance_type == "full" else np.diag(g.covariances[k])
            frames.append(rng.multivariate_normal(g.means[k], cov))
            state = rng.choice(s + 1, p=model.transitions[state])
            if state == s and not model.has_exit:
                break
        if state == s or not model.has_exit:
            out.append(np.array(frames))
    return out


def brute_force(log_b: np.ndarray, log_trans: np.ndarray):
    """Total, γ (T, S), transition counts (S, S + 1), best score and best path of one
    utterance, by enumerating every state sequence that starts in state 0."""
    t, s = log_b.shape
    exit = np.isfinite(log_trans[:, s]).any()
    paths = [p for p in itertools.product(range(s), repeat=t) if p[0] == 0]
    scores = np.array([
        log_b[0, 0] + sum(log_trans[p[i - 1], p[i]] + log_b[i, p[i]] for i in range(1, t))
        + (log_trans[p[-1], s] if exit else 0.0) for p in paths])
    total = logsumexp(scores)
    gamma, counts = np.zeros((t, s)), np.zeros((s, s + 1))
    if np.isfinite(total):
        for p, score in zip(paths, scores, strict=True):
            w = np.exp(score - total)
            gamma[np.arange(t), p] += w
            for i in range(1, t):
                counts[p[i - 1], p[i]] += w
            if exit:
                counts[p[-1], s] += w
    best = int(np.argmax(scores))
    return total, gamma, counts, scores[best], np.array(paths[best])


# ---------------------------------------------------------------------------------------
# topology and the model


def test_topology_masks():
    assert topology(3, skip=False, exit=True).astype(int).tolist() == [
        [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert topology(3, skip=True, exit=True).astype(int).tolist() == [
        [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert topology(3, skip=False, exit=False).astype(int).tolist() == [
        [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
    assert topology(3, skip=True, exit=False).astype(int).tolist() == [
        [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
    np.testing.assert_array_equal(initial_transitions(topology(2, True, True)),
                                  [[1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5]])


def test_model_validation_and_stacking():
    rng = np.random.default_rng(0)
    a, b = random_gmm(rng, 2, 3, "diag"), random_gmm(rng, 3, 3, "diag")
    model = HMM((a, b), initial_transitions(topology(2)))
    assert (model.n_states, model.dim, model.n_components, model.has_exit) == (2, 3, 5, True)
    assert repr(model) == "HMM(S=2, K=[2, 3], D=3, covariance_type='diag', exit=True)"
    stacked = model.stacked()
    assert stacked.weights.sum() == pytest.approx(2.0)
    np.testing.assert_array_equal(stacked.means, np.vstack([a.means, b.means]))
    np.testing.assert_array_equal(model.component_state(), [0, 0, 1, 1, 1])
    assert not model.transitions.flags.writeable
    with pytest.raises(ValueError, match="shape"):
        HMM((a, b), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="rows summing"):
        HMM((a, b), np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="dimension"):
        HMM((a, random_gmm(rng, 2, 4, "diag")), initial_transitions(topology(2)))
    with pytest.raises(ValueError, match="weights"):
        HMM((GMM(a.weights * 2, a.means, a.covariances, "diag"), b), model.transitions)


# ---------------------------------------------------------------------------------------
# forward-backward and Viterbi against brute force


@pytest.mark.parametrize("n_states", [2, 3])
@pytest.mark.parametrize(("skip", "exit"), TOPOLOGIES)
def test_forward_backward_and_viterbi_match_brute_force(n_states, skip, exit):
    rng = np.random.default_rng(10 * n_states + 2 * skip + exit)
    with np.errstate(divide="ignore"):
        log_trans = np.log(random_transitions(rng, topology(n_states, skip, exit)))
    lengths = np.array([1, 2, 3, 4, 5, 6, 6, 3])
    log_b = rng.normal(0.0, 3.0, (len(lengths), 6, n_states))
    log_b[-2][rng.random((6, n_states)) < 0.3] = -np.inf  # impossible emissions too
    for b, n in enumerate(lengths):
        log_b[b, n:] = np.nan  # padding is ignored, whatever it holds
    gamma, counts, total = forward_backward(log_b, lengths, log_trans)
    best, paths = viterbi(log_b, lengths, log_trans)
    for arr in (gamma, counts):
        assert not np.isnan(arr).any()
    for b, n in enumerate(lengths):
        ref_total, ref_gamma, ref_counts, ref_best, ref_path = brute_force(log_b[b, :n], log_trans)
        if not np.isfinite(ref_total):
            assert total[b] == best[b] == -np.inf
            assert not gamma[b].any() and not counts[b].any() and (paths[b] == -1).all()
            continue
        np.testing.assert_allclose(total[b], ref_total, rtol=1e-12)
        np.testing.assert_allclose(gamma[b, :n], ref_gamma, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(counts[b], ref_counts, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(best[b], ref_best, rtol=1e-12)
        np.testing.assert_array_equal(paths[b, :n], ref_path)
        assert (gamma[b, n:] == 0).all() and (paths[b, n:] == -1).all()
        np.testing.assert_allclose(gamma[b, :n].sum(axis=1), 1.0, rtol=1e-12)
        one = forward_backward(log_b[b : b + 1, :n], [n], log_trans)  # alone, unpadded
        np.testing.assert_allclose(one[0][0], gamma[b, :n], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(one[1][0], counts[b], rtol=1e-12, atol=1e-300)
        assert one[2][0] == pytest.approx(total[b], rel=1e-14)


@pytest.mark.parametrize("exit", [False, True])
def test_any_topology_matches_brute_force(exit):
    """A model that is not left-to-right (every transition allowed, backwards too): the
    compiled loops run on lists of allowed transitions instead of bands."""
    rng = np.random.default_rng(7 + exit)
    s = 3
    mask = np.ones((s, s + 1), dtype=bool)
    mask[:, s] = exit
    mask[1, 0] = False  # and one transition not allowed
    with np.errstate(divide="ignore"):
        log_trans = np.log(random_transitions(rng, mask))
    lengths = np.array([1, 2, 4, 5, 6])
    log_b = rng.normal(0.0, 3.0, (len(lengths), 6, s))
    gamma, counts, total = forward_backward(log_b, lengths, log_trans)
    best, paths = viterbi(log_b, lengths, log_trans)
    for b, n in enumerate(lengths):
        ref_total, ref_gamma, ref_counts, ref_best, ref_path = brute_force(log_b[b, :n], log_trans)
        np.testing.assert_allclose(total[b], ref_total, rtol=1e-12)
        np.testing.assert_allclose(gamma[b, :n], ref_gamma, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(counts[b], ref_counts, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(best[b], ref_best, rtol=1e-12)
        np.testing.assert_array_equal(paths[b, :n], ref_path)
    assert (counts[:, 1, 0] == 0).all()


@pytest.mark.parametrize("hard", [False, True])
def test_float32_products_give_nearly_the_float64_statistics(hard):
    """float32 moments' products (``moments_dtype``, what ``--precision float32`` gives
    the HMM) leave the log-likelihood as it is and the statistics within float32 rounding;
    float32 Gaussian scores too (``dtype``), the log-likelihood then to 1e-6. Recursions
    and sums stay float64."""
    rng = np.random.default_rng(8)
    model = random_hmm(rng, n_states=3, k=2, d=4, skip=True)
    utts = sample(model, rng, 12)
    ref = accumulate_hmm(model, utts, hard=hard)
    mixed = accumulate_hmm(model, utts, hard=hard, moments_dtype="float32")
    single = accumulate_hmm(model, utts, hard=hard, dtype="float32")
    assert mixed.loglike == ref.loglike
    np.testing.assert_array_equal(mixed.transitions, ref.transitions)
    assert single.loglike == pytest.approx(ref.loglike, rel=1e-6)
    for got in (mixed, single):
        assert (got.frames, got.utts) == (ref.frames, ref.utts)
        for name, want in ref.to_arrays().items():
            np.testing.assert_allclose(got.to_arrays()[name], want, rtol=1e-4,
                                       atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_too_short_utterances_score_minus_inf_and_are_skipped():
    rng = np.random.default_rng(1)
    model = random_hmm(rng, n_states=3, exit=True, skip=False)  # at least 3 frames
    utts = [rng.normal(size=(n, 3)) for n in (2, 5, 1, 3, 0)]
    scores = score_utterances(model, utts)
    assert np.isneginf(scores[[0, 2, 4]]).all() and np.isfinite(scores[[1, 3]]).all()
    assert np.isneginf(score_utterances(model, utts, viterbi=True)[[0, 2, 4]]).all()
    stats = accumulate_hmm(model, utts)
    assert (stats.utts, stats.unaligned, stats.frames) == (2, 3, 8)
    ref = accumulate_hmm(model, [utts[1], utts[3]])
    for name, want in ref.to_arrays().items():
        got = stats.to_arrays()[name]
        assert not np.isnan(got).any()
        if name != "unaligned":
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)
    assert stats.loglike == pytest.approx(scores[[1, 3]].sum(), rel=1e-12)
    assert accumulate_hmm(model, [utts[0]], hard=True).unaligned == 1
    skip_model = random_hmm(rng, n_states=3, exit=True, skip=True)  # 0 -> 2 -> exit: 2 frames
    assert np.isfinite(score_utterances(skip_model, utts[:2])).all()
    open_end = random_hmm(rng, n_states=3, exit=False)  # may end anywhere: 1 frame is enough
    assert np.isfinite(score_utterances(open_end, utts[:4])).all()


def test_nan_features_are_an_error():
    rng = np.random.default_rng(2)
    model = random_hmm(rng)
    frames = rng.normal(size=(10, 3))
    frames[4, 1] = np.nan
    with pytest.raises(FloatingPointError):
        accumulate_hmm(model, [frames])


# ---------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_statistics_do_not_depend_on_batching_and_add_up(cov_type):
    rng = np.random.default_rng(3)
    model = random_hmm(rng, n_states=3, k=2, d=4, cov_type=cov_type, skip=True)
    utts = [rng.normal(0.0, 2.0, (n, 4)) for n in rng.integers(3, 60, size=24)]
    whole = accumulate_hmm(model, utts)
    again = accumulate_hmm(model, utts)
    for a, b in zip(whole.to_arrays().values(), again.to_arrays().values(), strict=True):
        assert np.array_equal(a, b)  # bitwise deterministic
    halves = accumulate_hmm(model, utts[:10]) + accumulate_hmm(model, utts[10:])
    for batch_frames, other in [(1, None), (200, None), (16384, halves)]:
        other = other or accumulate_hmm(model, utts, batch_frames=batch_frames)
        assert (other.frames, other.utts, other.unaligned) == (whole.frames, 24, 0)
        for name, a in whole.to_arrays().items():
            np.testing.assert_allclose(other.to_arrays()[name], a, rtol=1e-10, err_msg=name)
    np.testing.assert_allclose(score_utterances(model, utts, batch_frames=1),
                               score_utterances(model, utts), rtol=1e-12)
    occ = whole.gmm.zeroth.reshape(3, 2).sum(axis=1)  # frames per state
    np.testing.assert_allclose(occ.sum(), whole.frames, rtol=1e-12)
    # what leaves a state (transitions and exits) is what occupies it, less the entries
    np.testing.assert_allclose(whole.transitions.sum(axis=1), occ, rtol=1e-10)


def test_stats_arrays_round_trip_and_shape_checks():
    rng = np.random.default_rng(4)
    model = random_hmm(rng, cov_type="full")
    stats = accumulate_hmm(model, sample(model, rng, 3))
    buf = io.BytesIO()
    np.savez(buf, **stats.to_arrays("acc/"))
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        assert all(npz[k].dtype in (np.float64, np.int64) for k in npz.files)
        back = HmmStats.from_arrays(npz, "acc/")
    for name, a in stats.to_arrays().items():
        assert np.array_equal(back.to_arrays()[name], a), name
    assert (back.n_components, back.dim, back.covariance_type) == (6, 3, "full")
    zero = HmmStats.zero(model) + stats
    np.testing.assert_array_equal(zero.gmm.second, stats.gmm.second)
    with pytest.raises(ValueError):
        stats + HmmStats.zero(random_hmm(rng, n_states=2, cov_type="full"))


def test_viterbi_training_counts_the_best_path():
    rng = np.random.default_rng(5)
    model = random_hmm(rng, n_states=3, k=2, skip=True)
    utt = sample(model, rng, 1)[0]
    stats = accumulate_hmm(model, [utt], hard=True)
    with np.errstate(divide="ignore"):
        log_trans = np.log(model.transitions)
    best, paths = viterbi(_state_log_emissions(model, utt)[None], [len(utt)], log_trans)
    path = paths[0]
    per_state = stats.gmm.zeroth.reshape(3, 2).sum(axis=1)
    np.testing.assert_allclose(per_state, np.bincount(path, minlength=3), rtol=1e-12)
    np.testing.assert_array_equal(stats.transitions,
                                  path_counts(paths, np.array([len(utt)]), 3, True)[0])
    assert stats.transitions.sum() == len(utt)  # one transition per frame, the exit included
    assert stats.loglike == pytest.approx(best[0], rel=1e-10)
    assert stats.loglike == pytest.approx(model.log_likelihood(utt, viterbi=True), rel=1e-12)
    assert stats.loglike <= model.log_likelihood(utt)
    assert not np.allclose(stats.gmm.zeroth, np.round(stats.gmm.zeroth))  # soft within states


def _state_log_emissions(model: HMM, frames: np.ndarray) -> np.ndarray:
    """log b_s(x_t) (T, S) from the GMMs' own scoring (an independent route)."""
    return np.stack([g.log_likelihood(frames) for g in model.states], axis=1)


# ---------------------------------------------------------------------------------------
# flat start and updates


def test_uniform_segmentation_by_hand():
    utts = [np.arange(7.0)[:, None], 10.0 + np.arange(4.0)[:, None], np.zeros((2, 1))]
    mask = topology(3, skip=False, exit=True)
    stats = uniform_segmentation_stats(3, utts, "diag", mask)
    # T=7 -> boundaries 0, 2, 5, 7: [0 1] [2 3 4] [5 6]; T=4 -> 0, 1, 3, 4: [10] [11 12] [13]
    np.testing.assert_array_equal(stats.gmm.zeroth, [3, 5, 3])
    np.testing.assert_array_equal(stats.gmm.first[:, 0], [11, 32, 24])
    np.testing.assert_array_equal(stats.gmm.second[:, 0], [101, 294, 230])
    np.testing.assert_array_equal(stats.transitions, [[1, 2, 0, 0], [0, 3, 2, 0], [0, 0, 1, 2]])
    assert (stats.frames, stats.utts, stats.unaligned) == (11, 2, 1)
    model = hmm_from_segmentation(stats, mask, MLE)
    np.testing.assert_allclose(model.stacked().means[:, 0], [11 / 3, 32 / 5, 8], rtol=1e-12)
    np.testing.assert_allclose(model.transitions, [[1 / 3, 2 / 3, 0, 0], [0, 3 / 5, 2 / 5, 0],
                                                   [0, 0, 1 / 3, 2 / 3]], rtol=1e-12)
    no_exit = uniform_segmentation_stats(3, utts, "diag", topology(3, exit=False))
    assert no_exit.transitions[2].tolist() == [0, 0, 1, 0]
    full = uniform_segmentation_stats(3, utts, "full", mask)
    np.testing.assert_array_equal(full.gmm.second[:, 0, 0], stats.gmm.second[:, 0])
    short = uniform_segmentation_stats(3, utts[2:], "diag", mask)
    with pytest.raises(UserError, match="no frames"):
        hmm_from_segmentation(short, mask, MLE)
    with pytest.raises(UserError, match="no utterances"):
        uniform_segmentation_stats(3, [], "diag", mask)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_uniform_segmentation_boundaries(n_states, lengths):
    """Part s of an utterance of T >= S frames is [b_s, b_(s+1)), b_s = floor(s·T/S + 1/2)."""
    utts = [np.full((n, 1), float(i)) for i, n in enumerate(lengths)]
    stats = uniform_segmentation_stats(n_states, utts, "diag", topology(n_states))
    kept = [(i, n) for i, n in enumerate(lengths) if n >= n_states]
    sizes = np.zeros(n_states)
    first = np.zeros(n_states)
    for i, n in kept:
        bounds = [(2 * k * n + n_states) // (2 * n_states) for k in range(n_states + 1)]
        part = np.diff(bounds)
        assert (part >= 1).all()
        sizes += part
        first += i * part
    np.testing.assert_array_equal(stats.gmm.zeroth, sizes)
    np.testing.assert_array_equal(stats.gmm.first[:, 0], first)
    assert (stats.utts, stats.unaligned) == (len(kept), len(lengths) - len(kept))
    assert stats.transitions.sum() == sum(n for _, n in kept)


def test_update_keeps_topology_and_aggregates_reports():
    rng = np.random.default_rng(6)
    model = random_hmm(rng, n_states=3, k=2, d=2, skip=False, exit=True)
    occ = np.array([50.0, 50.0, 50.0, 1.0, 0.0, 0.0])  # state 2 saw nothing
    means = rng.normal(size=(6, 2))
    gmm = GmmStats(occ, occ[:, None] * means, occ[:, None] * (means**2 + 1.0))
    counts = np.array([[40.0, 9.0, 7.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    new, report = update_hmm(HmmStats(gmm, counts), model, MStepOptions())
    np.testing.assert_allclose(new.transitions[0], [40 / 49, 9 / 49, 0, 0])  # zeros stay
    np.testing.assert_array_equal(new.transitions[1:], model.transitions[1:])  # no counts
    assert new.states[2] is model.states[2]
    assert (report.n_components_in, report.n_components_out) == (6, 5)
    assert report.removed == [3] and report.not_updated == [4, 5]
    floored, _ = update_hmm(HmmStats(gmm, counts), model, MStepOptions(), transition_floor=0.25)
    raised = np.array([40 / 49, 0.25])  # 9/49 floored to 0.25, then renormalised (Kaldi)
    np.testing.assert_allclose(floored.transitions[0], [*raised / raised.sum(), 0, 0])
    with pytest.raises(ValueError):
        update_hmm(HmmStats(gmm, counts), random_hmm(rng, k=3, d=2), MStepOptions())


def test_split_states():
    rng = np.random.default_rng(7)
    model = random_hmm(rng, n_states=3, k=1)
    both = split_states(model, 2, 0.1, np.random.default_rng(0))
    assert both.state_sizes.tolist() == [2, 2, 2]
    assert split_states(model, [1, 3, 2], 0.1, rng).state_sizes.tolist() == [1, 3, 2]
    np.testing.assert_array_equal(both.transitions, model.transitions)


# ---------------------------------------------------------------------------------------
# Baum-Welch against hmmlearn, and monotone likelihood


def _hmmlearn_model(model: HMM, n_mix: int):
    """hmmlearn's copy of ``model`` (no exit: start in state 0, end anywhere), set up for
    one plain maximum-likelihood iteration.

    Priors that make hmmlearn 0.3's M-step exact MLE (hmmlearn/hmm.py, ``_do_mstep``):
    ``startprob_prior = transmat_prior = 1`` and ``weights_prior = 1`` (Dirichlet α - 1 = 0),
    ``means_weight = 0`` (no pull of the means); for GaussianHMM ``covars_prior = 0`` and
    ``covars_weight = 1`` (denominator ``max(w - 1, 0) + n`` for diag, ``max(w - D, 0) + n``
    for full); for GMMHMM ``covars_prior = -1.5, covars_weight = 0`` (diag: denominator
    ``n + 1 + 2(α + 1)``) and ``covars_prior = 0, covars_weight = -(D + 2)`` (full:
    ``n + 1 + ν + D + 1``), its own defaults. One guard remains: GaussianHMM divides the
    covariance sums by ``max(n, 1e-5)``, so a state occupied less than 1e-5 would differ
    (not the case with this test's seed).
    """
    from hmmlearn import hmm

    s, d, ct = model.n_states, model.dim, model.covariance_type
    common = dict(n_components=s, covariance_type=ct, init_params="", n_iter=1, tol=0.0,
                  startprob_prior=1.0, transmat_prior=1.0, means_weight=0.0, means_prior=0.0,
                  implementation="log")
    if n_mix == 1:
        ref = hmm.GaussianHMM(params="stmc", covars_prior=0.0, covars_weight=1.0, **common)
        ref.covars_ = model.stacked().covariances
    else:
        prior = (-1.5, 0.0) if ct == "diag" else (0.0, -(d + 2.0))
        ref = hmm.GMMHMM(n_mix=n_mix, params="stmcw", weights_prior=1.0,
                         covars_prior=prior[0], covars_weight=prior[1], **common)
        ref.weights_ = np.stack([g.weights for g in model.states])
        ref.covars_ = np.stack([g.covariances for g in model.states])
    ref.startprob_ = np.eye(s)[0]
    ref.transmat_ = np.array(model.transitions[:, :s])
    means = np.stack([g.means for g in model.states])  # (S, K, D)
    ref.means_ = means if n_mix > 1 else means[:, 0]
    return ref


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("n_mix", [1, 2])
def test_one_iteration_matches_hmmlearn(cov_type, n_mix):
    """Our E-step and M-step (:data:`MLE`) against one hmmlearn iteration on the same
    no-exit topology, from the same parameters."""
    pytest.importorskip("hmmlearn")
    rng = np.random.default_rng(8)
    truth = random_hmm(rng, n_states=3, k=n_mix, d=3, cov_type=cov_type, skip=True,
                       exit=False)
    utts = sample(truth, rng, 8, max_frames=40)
    start = random_hmm(rng, n_states=3, k=n_mix, d=3, cov_type=cov_type, skip=True,
                       exit=False)
    ref = _hmmlearn_model(start, n_mix)
    x, lengths = np.concatenate(utts), [len(u) for u in utts]
    ref_loglike = ref.score(x, lengths)
    ref.fit(x, lengths)
    stats = accumulate_hmm(start, utts)
    new, _ = update_hmm(stats, start, MLE)
    assert stats.loglike == pytest.approx(ref_loglike, rel=1e-10)
    assert ref.monitor_.history[-1] == pytest.approx(stats.loglike, rel=1e-10)
    np.testing.assert_allclose(new.transitions[:, :3], ref.transmat_, rtol=1e-9, atol=1e-15)
    assert not new.transitions[:, 3].any()
    means = np.stack([g.means for g in new.states])
    cov = np.stack([g.covariances for g in new.states])
    if n_mix == 1:
        ref_cov = ref.covars_ if cov_type == "full" else np.diagonal(ref.covars_, 0, 1, 2)
        np.testing.assert_allclose(means[:, 0], ref.means_, rtol=1e-9)
        np.testing.assert_allclose(cov[:, 0], ref_cov, rtol=1e-9)
        return
    np.testing.assert_allclose(np.stack([g.weights for g in new.states]), ref.weights_,
                               rtol=1e-9)
    np.testing.assert_allclose(means, ref.means_, rtol=1e-9)
    # GMMHMM centres its covariance sums on the *old* means (hmmlearn/hmm.py,
    # _accumulate_sufficient_statistics): it returns Σ_new + (μ_new - μ_old)(μ_new - μ_old)ᵀ
    moved = means - np.stack([g.means for g in start.states])
    shift = moved**2 if cov_type == "diag" else moved[..., :, None] * moved[..., None, :]
    np.testing.assert_allclose(cov + shift, ref.covars_, rtol=1e-9)


def _assert_monotone(loglikes) -> None:
    steps = np.diff(loglikes)
    assert (steps >= -1e-9 * np.abs(loglikes[1:])).all(), loglikes


def test_baum_welch_never_decreases_likelihood():
    rng = np.random.default_rng(9)
    truth = random_hmm(rng, n_states=3, k=2, d=3, skip=True, exit=True)
    utts = sample(truth, rng, 30, max_frames=60)
    mask = topology(3, skip=True, exit=True)
    model = hmm_from_segmentation(uniform_segmentation_stats(3, utts, "diag", mask), mask, MLE)
    model = split_states(model, 2, 0.2, rng)
    loglikes = []
    for _ in range(8):
        stats = accumulate_hmm(model, utts)
        loglikes.append(stats.loglike)
        model, _ = update_hmm(stats, model, MLE)
    _assert_monotone(loglikes)
    assert loglikes[-1] > loglikes[0]


def test_kaldi_style_training_on_digits_never_decreases_likelihood():
    data = emdist.load_data_dir(emdist.digits_dir("train"))
    label = data.utts[0].label
    utts = [load_feats(u.rxfilename) for u in data.utts if u.label == label]
    kaldi = MStepOptions()  # Kaldi's defaults: variance floor, min occupancy 10, removal
    mask = topology(5, skip=False, exit=True)
    model = hmm_from_segmentation(uniform_segmentation_stats(5, utts, "diag", mask), mask, kaldi)
    for targets in (1, 2):
        model = split_states(model, targets, 0.2, np.random.default_rng(0))
        loglikes = []
        for _ in range(4):
            stats = accumulate_hmm(model, utts)
            assert stats.unaligned == 0
            loglikes.append(stats.loglike)
            model, report = update_hmm(stats, model, kaldi)
            assert report.removed == [] and report.floored_elements == 0
        _assert_monotone(loglikes)
    hard = accumulate_hmm(model, utts, hard=True)
    assert hard.loglike <= accumulate_hmm(model, utts).loglike
