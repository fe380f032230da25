"""Log-densities and E-step statistics against independent references.

The references are scipy's ``multivariate_normal.logpdf`` and ``logsumexp`` and naive numpy
sums over per-frame posteriors; nothing here compares emdist with its own output, except
the float32 fast path, which is measured against emdist's float64 path that the other
tests prove.
"""

from __future__ import annotations

import functools
import gc
import itertools
import weakref

import numpy as np
import pytest
from helpers import KALDI_MODELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kaldi_text import read_gmm
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from emdist.errors import EmdistError
from emdist.models import estep
from emdist.models import kernel as kernel_module
from emdist.models.estep import Accumulator, EStepOptions, accumulate, make_kernel
from emdist.models.gmm import GMM, expand_features
from emdist.models.initialize import centres_model, kmeans_plus_plus
from emdist.models.kernel import Scorer, StackedScorer
from emdist.models.mstep import MStepOptions, m_step
from emdist.models.stats import GmmStats

COV_TYPES = ("diag", "full")


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def random_gmm(rng: np.random.Generator, k: int, d: int, cov_type: str) -> GMM:
    """A well-conditioned random GMM: eigenvalues (or variances) in [0.5, 2]."""
    weights = rng.dirichlet(np.full(k, 3.0))
    means = rng.normal(0.0, 1.5, (k, d))
    if cov_type == "diag":
        cov = rng.uniform(0.5, 2.0, (k, d))
    else:
        cov = np.empty((k, d, d))
        for c in range(k):
            q, _ = np.linalg.qr(rng.normal(size=(d, d)))
            a = (q * rng.uniform(0.5, 2.0, d)) @ q.T
            cov[c] = 0.5 * (a + a.T)
    return GMM(weights, means, cov, cov_type)


def full_covariances(gmm: GMM) -> np.ndarray:
    if gmm.covariance_type == "full":
        return gmm.covariances
    return np.array([np.diag(v) for v in gmm.covariances])


def sample(rng: np.random.Generator, gmm: GMM, n: int) -> np.ndarray:
    """Frames drawn from ``gmm``, plus a few far outliers (posteriors far from uniform)."""
    comp = rng.choice(gmm.n_components, size=n, p=gmm.weights)
    covs = full_covariances(gmm)
    frames = np.array([rng.multivariate_normal(gmm.means[c], covs[c]) for c in comp])
    frames[: max(1, n // 50)] *= 4.0
    return frames


def scipy_component_ll(gmm: GMM, frames: np.ndarray) -> np.ndarray:
    """``log w_k + log N(x_t; μ_k, Σ_k)`` from scipy, shape (N, K)."""
    covs = full_covariances(gmm)
    cols = [
        np.log(w) + multivariate_normal(mean=m, cov=c).logpdf(frames)
        for w, m, c in zip(gmm.weights, gmm.means, covs, strict=True)
    ]
    return np.column_stack(cols)


def naive_stats(resp: np.ndarray, frames: np.ndarray, cov_type: str):
    """Statistics of posteriors ``resp`` (N, K) by plain sums, and the summands' magnitudes.

    The magnitudes (Σγ|x|, Σγ|x xᵀ|) scale the roundoff of a sum whose terms have mixed
    signs: two correct summation orders agree to ``eps·magnitude``, not ``eps·|sum|``.
    """
    zeroth = resp.sum(axis=0)
    first = resp.T @ frames
    first_mag = resp.T @ np.abs(frames)
    if cov_type == "diag":
        second = resp.T @ frames**2
        second_mag = second
    else:
        outer = frames[:, :, None] * frames[:, None, :]
        second = np.einsum("tk,tij->kij", resp, outer)
        second_mag = np.einsum("tk,tij->kij", resp, np.abs(outer))
    return (zeroth, first, second), (zeroth, first_mag, second_mag)


def scipy_reference(gmm: GMM, frames: np.ndarray):
    """(stats arrays, magnitudes, total log-likelihood) from scipy densities."""
    comp_ll = scipy_component_ll(gmm, frames)
    frame_ll = logsumexp(comp_ll, axis=1)
    resp = np.exp(comp_ll - frame_ll[:, None])
    arrays, mags = naive_stats(resp, frames, gmm.covariance_type)
    return arrays, mags, frame_ll.sum()


def assert_stats_close(stats: GmmStats, arrays, mags, rtol: float) -> None:
    for name, ref, mag in zip(("zeroth", "first", "second"), arrays, mags, strict=True):
        got = getattr(stats, name)
        assert got.shape == ref.shape, name
        err = np.abs(got - ref)
        bound = rtol * np.abs(mag)
        worst = float(np.max(err / np.where(bound > 0, bound, np.inf) * rtol, initial=0.0))
        assert np.all(err <= bound), f"{name}: worst error {worst:.3g} relative to magnitude"


# ---------------------------------------------------------------------------------------
# log-densities


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("dim", [5, 39])
def test_log_likelihood_matches_scipy(cov_type, dim):
    rng = np.random.default_rng(100 + dim)
    gmm = random_gmm(rng, 4, dim, cov_type)
    frames = sample(rng, gmm, 300)
    expected = logsumexp(scipy_component_ll(gmm, frames), axis=1)
    np.testing.assert_allclose(gmm.log_likelihood(frames), expected, rtol=1e-10)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("dim", [5, 39])
def test_component_log_likelihood_matches_scipy(cov_type, dim):
    rng = np.random.default_rng(200 + dim)
    gmm = random_gmm(rng, 5, dim, cov_type)
    frames = sample(rng, gmm, 300)
    got = gmm.kernel().component_log_likelihood(expand_features(frames, cov_type))
    np.testing.assert_allclose(got, scipy_component_ll(gmm, frames), rtol=1e-10)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_shifted_kernel_gives_the_same_log_likelihoods(cov_type):
    """A kernel expressed around a shift, applied to shifted frames, is the same density."""
    rng = np.random.default_rng(7)
    gmm = random_gmm(rng, 3, 6, cov_type)
    frames = sample(rng, gmm, 200) + 20.0
    shift = frames.mean(axis=0)
    kernel = gmm.kernel(np.float64, shift=shift)
    got = kernel.component_log_likelihood(expand_features(frames - shift, cov_type))
    np.testing.assert_allclose(got, scipy_component_ll(gmm, frames), rtol=1e-10)
    expected = logsumexp(scipy_component_ll(gmm, frames), axis=1)
    np.testing.assert_allclose(kernel.frame_log_likelihood(frames), expected, rtol=1e-10)


def test_log_likelihood_far_from_every_component_stays_finite():
    """Log domain: a frame 1e3 standard deviations away has a finite (very low) density."""
    rng = np.random.default_rng(3)
    gmm = random_gmm(rng, 3, 4, "diag")
    frames = np.full((2, 4), 1e3)
    expected = logsumexp(scipy_component_ll(gmm, frames), axis=1)
    got = gmm.log_likelihood(frames)
    assert np.all(np.isfinite(got)) and np.all(got < -1e5)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize(
    ("name", "cov_type"), [("diag_digits_k8", "diag"), ("full_digits_k4", "full")]
)
def test_gconsts_match_kaldi(name, cov_type):
    """The kernel's per-component constants are Kaldi's ``<GCONSTS>`` (float32 file)."""
    path = KALDI_MODELS / f"{name}.kaldi.txt"
    kaldi = read_gmm(path)
    gmm = GMM(kaldi.weights, kaldi.means, kaldi.covariances, cov_type)
    # Kaldi computes gconsts from float32 parameters and prints 7 digits (measured: 2.4e-7).
    np.testing.assert_allclose(gmm.kernel().gconst, kaldi.gconsts, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# E-step statistics


@pytest.fixture(scope="module")
def synthetic():
    """(model, frames) per covariance type: K=4, D=5, 1000 frames drawn from a nearby model."""
    out = {}
    for i, cov_type in enumerate(COV_TYPES):
        rng = np.random.default_rng(300 + i)
        truth = random_gmm(rng, 4, 5, cov_type)
        model = random_gmm(rng, 4, 5, cov_type)
        out[cov_type] = (model, sample(rng, truth, 1000))
    return out


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_accumulate_matches_naive_posterior_sums(synthetic, cov_type, chunk_size):
    model, frames = synthetic[cov_type]
    arrays, mags, total_ll = scipy_reference(model, frames)
    stats = accumulate(model, frames, EStepOptions(chunk_size=chunk_size))
    assert_stats_close(stats, arrays, mags, rtol=1e-9)
    assert stats.frames == len(frames)
    np.testing.assert_allclose(stats.loglike, total_ll, rtol=1e-10)
    if cov_type == "full":
        np.testing.assert_array_equal(stats.second, stats.second.transpose(0, 2, 1))


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_accumulate_matches_naive_in_39_dimensions(cov_type):
    rng = np.random.default_rng(400)
    truth = random_gmm(rng, 3, 39, cov_type)
    model = GMM(
        truth.weights,
        truth.means + rng.normal(0, 0.3, truth.means.shape),
        truth.covariances,
        cov_type,
    )
    frames = sample(rng, truth, 400)
    arrays, mags, total_ll = scipy_reference(model, frames)
    stats = accumulate(model, frames, EStepOptions(chunk_size=64))
    assert_stats_close(stats, arrays, mags, rtol=1e-9)
    np.testing.assert_allclose(stats.loglike, total_ll, rtol=1e-10)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_chunking_changes_nothing_beyond_roundoff(synthetic, cov_type):
    model, frames = synthetic[cov_type]
    _, mags, _ = scipy_reference(model, frames)
    ref = accumulate(model, frames, EStepOptions(chunk_size=4096))
    for chunk_size in (1, 7, 100, 999):
        stats = accumulate(model, frames, EStepOptions(chunk_size=chunk_size))
        arrays = (ref.zeroth, ref.first, ref.second)
        assert_stats_close(stats, arrays, mags, rtol=1e-12)
        assert stats.frames == ref.frames
        np.testing.assert_allclose(stats.loglike, ref.loglike, rtol=1e-12)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("hard", [False, True])
def test_pushing_frames_in_pieces_gives_the_same_bits(synthetic, cov_type, hard):
    """The accumulator's buffers start small and grow with what is pushed (up to a chunk);
    chunks are still cut every chunk_size frames of the stream, so the pieces frames come
    in, and the buffer sizes they lead to, change no bit."""
    model, frames = synthetic[cov_type]
    options = EStepOptions(chunk_size=300)
    whole = accumulate(model, frames, options, hard=hard)
    kernel = make_kernel(model, options)
    for cuts in ([1, 2, 40, 41, 700], [299, 300, 301, 900], list(range(5, len(frames), 97))):
        acc = Accumulator(kernel, model.dim, options.chunk_size, hard=hard)
        for a, b in itertools.pairwise([0, *cuts, len(frames)]):
            acc.push(frames[a:b])
        stats = acc.finish()
        for name in ("zeroth", "first", "second"):
            np.testing.assert_array_equal(getattr(stats, name), getattr(whole, name))
        assert (stats.loglike, stats.frames) == (whole.loglike, whole.frames)


def test_kernels_are_built_once_per_model_and_precision(synthetic):
    """Shards of one pass in one process share their models' kernels; a new model (the
    next iteration's) gets its own, and a model's kernels go when the model goes."""
    model, frames = synthetic["full"]
    f64, f32 = EStepOptions(), EStepOptions(dtype="float32")
    kernel = make_kernel(model, f64)
    assert make_kernel(model, f64) is kernel
    assert make_kernel(model, f32) is not kernel
    assert make_kernel(model, f32).dtype == np.float32
    twin = GMM(model.weights, model.means, model.covariances, model.covariance_type)
    assert make_kernel(twin, f64) is not kernel
    np.testing.assert_array_equal(make_kernel(twin, f64).fast, kernel.fast)
    assert twin in estep._KERNELS
    gone = weakref.ref(twin)
    del twin
    gc.collect()
    assert gone() is None  # the cache did not keep the model (nor its kernels) alive


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_stacked_scoring_equals_one_scorer_per_model(cov_type):
    """The recognizer scores an utterance under every word model with one product; models
    of fewer Gaussians are padded. Totals equal one Scorer per model, and scipy's."""
    rng = np.random.default_rng(7)
    models = [random_gmm(rng, k, 5, cov_type) for k in (3, 1, 4, 4)]
    frames = sample(rng, models[2], 700)
    kernels = [make_kernel(m, EStepOptions()) for m in models]
    stacked = StackedScorer(kernels, 256)  # 700 frames: three chunks
    for piece in (frames, frames[:1], frames[:300]):
        totals = stacked.totals(piece)
        one_by_one = [Scorer(k, 256).frame_log_likelihood(piece).sum() for k in kernels]
        np.testing.assert_allclose(totals, one_by_one, rtol=1e-13)
        reference = [logsumexp(scipy_component_ll(m, piece), axis=1).sum() for m in models]
        np.testing.assert_allclose(totals, reference, rtol=1e-10)


def test_stacked_scoring_bounds_its_chunk_by_the_number_of_scores(monkeypatch):
    rng = np.random.default_rng(8)
    models = [random_gmm(rng, 4, 5, "diag") for _ in range(3)]
    frames = sample(rng, models[0], 100)
    kernels = [make_kernel(m, EStepOptions()) for m in models]
    monkeypatch.setattr(kernel_module, "STACK_ENTRIES", 12 * 7)  # 12 Gaussians: 7 frames
    small = StackedScorer(kernels, 1024)
    assert small.rows.capacity == 7
    np.testing.assert_allclose(small.totals(frames),
                               [Scorer(k, 1024).frame_log_likelihood(frames).sum()
                                for k in kernels], rtol=1e-13)


def test_kernels_of_different_layouts_are_not_stacked(synthetic):
    diag, full = synthetic["diag"][0], synthetic["full"][0]
    f64, f32 = EStepOptions(), EStepOptions(dtype="float32")
    assert StackedScorer.fits([make_kernel(diag, f64), make_kernel(diag, f64)])
    assert not StackedScorer.fits([make_kernel(diag, f64), make_kernel(full, f64)])
    assert not StackedScorer.fits([make_kernel(diag, f64), make_kernel(diag, f32)])
    assert not StackedScorer.fits([])
    with pytest.raises(ValueError, match="cannot be stacked"):
        StackedScorer([make_kernel(diag, f64), make_kernel(full, f64)], 16)


def add_all(pieces: list[GmmStats], zero: GmmStats) -> GmmStats:
    return functools.reduce(lambda a, b: a + b, pieces, zero)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cov_type=st.sampled_from(COV_TYPES),
    cuts=st.lists(st.integers(0, 1000), max_size=8),
    chunk_size=st.sampled_from([3, 64, 2048]),
)
def test_stats_of_pieces_add_up_to_stats_of_whole(synthetic, cov_type, cuts, chunk_size):
    model, frames = synthetic[cov_type]
    options = EStepOptions(chunk_size=chunk_size)
    bounds = [0, *sorted(cuts), len(frames)]
    pieces = [accumulate(model, frames[a:b], options) for a, b in itertools.pairwise(bounds)]
    zero = GmmStats.zero(model.n_components, model.dim, cov_type)
    total = add_all(pieces, zero)
    whole = accumulate(model, frames, options)
    _, mags, _ = scipy_reference(model, frames)
    assert_stats_close(total, (whole.zeroth, whole.first, whole.second), mags, rtol=1e-10)
    assert total.frames == whole.frames == len(frames)
    np.testing.assert_allclose(total.loglike, whole.loglike, rtol=1e-10)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_zero_stats_are_neutral(synthetic, cov_type):
    model, frames = synthetic[cov_type]
    stats = accumulate(model, frames[:100])
    zero = GmmStats.zero(model.n_components, model.dim, cov_type)
    assert zero.frames == 0 and zero.loglike == 0.0
    for total in (stats + zero, zero + stats):
        for name in ("zeroth", "first", "second"):
            np.testing.assert_array_equal(getattr(total, name), getattr(stats, name))
        assert total.loglike == stats.loglike
        assert total.frames == stats.frames


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_hard_stats_are_nearest_centre_assignments(synthetic, cov_type):
    _, frames = synthetic[cov_type]
    centres = kmeans_plus_plus(frames, 6, np.random.default_rng(11))
    model = centres_model(centres, cov_type)
    sq_dist = ((frames[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    ordered = np.sort(sq_dist, axis=1)
    assert np.min(ordered[:, 1] - ordered[:, 0]) > 1e-8  # no tie roundoff could flip
    nearest = sq_dist.argmin(axis=1)
    one_hot = np.eye(6)[nearest]
    arrays, mags = naive_stats(one_hot, frames, cov_type)
    stats = accumulate(model, frames, EStepOptions(chunk_size=128), hard=True)
    np.testing.assert_array_equal(stats.zeroth, np.bincount(nearest, minlength=6))
    assert_stats_close(stats, arrays, mags, rtol=1e-10)
    # the log-likelihood summed is that of the best component: log(1/K) + log N(x; c, I)
    best_ll = np.log(1 / 6) + np.array(
        [
            multivariate_normal(centres[c], np.eye(frames.shape[1])).logpdf(x)
            for x, c in zip(frames, nearest, strict=True)
        ]
    )
    np.testing.assert_allclose(stats.loglike, best_ll.sum(), rtol=1e-10)


# ---------------------------------------------------------------------------------------
# the float32 fast path on real features


def fit_few_steps(frames: np.ndarray, k: int, cov_type: str, iters: int = 4) -> GMM:
    """k-means++ seeds, global (co)variance, then ``iters`` float64 Kaldi-style EM steps."""
    x = frames.astype(np.float64)
    means = kmeans_plus_plus(x, k, np.random.default_rng(5))
    cov = np.cov(x.T) if cov_type == "full" else x.var(axis=0)
    model = GMM(np.full(k, 1.0 / k), means, np.broadcast_to(cov, (k, *cov.shape)), cov_type)
    for _ in range(iters):
        model, _ = m_step(accumulate(model, frames), MStepOptions(), previous=model)
    return model


def float32_relative_errors(model: GMM, frames: np.ndarray) -> dict[str, float]:
    """Worst per-component ‖Δ‖/‖reference‖ of each statistic, float32 vs float64 path."""
    ref = accumulate(model, frames, EStepOptions(dtype="float64"))
    fast = accumulate(model, frames, EStepOptions(dtype="float32"))
    out = {}
    for name in ("zeroth", "first", "second"):
        a, b = getattr(fast, name), getattr(ref, name)
        delta = np.linalg.norm((a - b).reshape(len(b), -1), axis=1)
        out[name] = float(np.max(delta / np.linalg.norm(b.reshape(len(b), -1), axis=1)))
    out["loglike"] = abs(fast.loglike - ref.loglike) / abs(ref.loglike)
    assert fast.frames == ref.frames == len(frames)
    return out


@pytest.mark.parametrize(("cov_type", "k"), [("diag", 8), ("full", 4)])
def test_float32_path_is_accurate_on_real_features(digits_frames, cov_type, k):
    model = fit_few_steps(digits_frames, k, cov_type)
    errors = float32_relative_errors(model, digits_frames)
    print(f"float32 vs float64 ({cov_type}, K={k}): {errors}")
    assert max(errors.values()) < 1e-6, errors


# ---------------------------------------------------------------------------------------
# NaN frames


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_nan_frames_raise(synthetic, cov_type, dtype):
    model, frames = synthetic[cov_type]
    bad = frames[:50].copy()
    bad[20, 1] = np.nan
    with pytest.raises((FloatingPointError, EmdistError), match="(?i)nan|non-finite"):
        accumulate(model, bad, EStepOptions(dtype=dtype, chunk_size=7))


# EMDIST BUG (reported to the lead): with hard=True the E-step takes the argmax of a NaN
# row and returns NaN statistics instead of raising. Fails until fixed.
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_nan_frames_raise_with_hard_assignments(synthetic, cov_type):
    _, frames = synthetic[cov_type]
    model = centres_model(frames[:4], cov_type)
    bad = frames[:50].copy()
    bad[20, 1] = np.nan
    with pytest.raises((FloatingPointError, EmdistError), match="(?i)nan|non-finite"):
        accumulate(model, bad, hard=True)


# EMDIST BUG (reported to the lead): Kernel.frame_log_likelihood (GMM.log_likelihood, and
# the scoring task built on it) returns NaN for a NaN frame; the recogniser's argmax then
# silently picks the first label. Fails until fixed.
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_nan_frames_raise_when_scoring(synthetic, cov_type):
    model, frames = synthetic[cov_type]
    bad = frames[:50].copy()
    bad[20, 1] = np.nan
    with pytest.raises((FloatingPointError, EmdistError), match="(?i)nan|non-finite"):
        model.log_likelihood(bad)
