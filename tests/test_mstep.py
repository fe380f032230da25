"""The Kaldi-style M-step: hand-made statistics with known answers, then Kaldi's own output.

Rules (shared/notes/kaldi-gmm.md §1.2, ``MleDiagGmmUpdate`` / ``MleFullGmmUpdate``): a
component is updated only if ``occ > min_gaussian_occupancy`` and ``occ/Σocc >
min_gaussian_weight``; the update is ``μ = f/n``, ``Σ = s/n − μμᵀ``; diagonal variances get
an absolute floor, full covariances an eigenvalue floor ``max(variance_floor, λmax /
max_condition)``; starved components are removed (never the last one) with weights
renormalised, or kept with their old parameters and weight ``max(prob, min_weight)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import KALDI_MODELS
from kaldi_text import read_accs, read_gmm

from emdist.errors import UserError
from emdist.models.gmm import GMM
from emdist.models.mstep import MStepOptions, m_step
from emdist.models.stats import GmmStats

KALDI = MStepOptions()  # Kaldi's defaults: gmm-global-est / fgmm-global-est


def stats_for(occ, means, covs) -> GmmStats:
    """Statistics whose exact M-step answer is (occ/Σocc, means, covs)."""
    occ, means, covs = (np.asarray(a, dtype=np.float64) for a in (occ, means, covs))
    first = occ[:, None] * means
    if covs.ndim == 2:
        second = occ[:, None] * (covs + means**2)
    else:
        second = occ[:, None, None] * (covs + means[:, :, None] * means[:, None, :])
    return GmmStats(occ, first, second, loglike=-1.0, frames=int(round(occ.sum())))


def random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------------------
# the update formulas


def test_diag_weights_means_variances():
    occ = [20.0, 30.0, 50.0]
    means = [[1.0, -2.0], [0.5, 3.0], [-4.0, 0.25]]
    var = [[2.0, 0.5], [1.0, 4.0], [0.75, 3.0]]
    model, report = m_step(stats_for(occ, means, var), KALDI)
    np.testing.assert_allclose(model.weights, [0.2, 0.3, 0.5], rtol=1e-15)
    np.testing.assert_allclose(model.means, means, rtol=1e-14)
    np.testing.assert_allclose(model.covariances, var, rtol=1e-13)
    assert model.covariance_type == "diag"
    assert (report.n_components_in, report.n_components_out) == (3, 3)
    assert report.floored_elements == report.floored_gaussians == 0
    assert report.removed == report.not_updated == []


def test_full_weights_means_covariances():
    rng = np.random.default_rng(0)
    occ = [150.0, 250.0, 600.0]
    means = rng.normal(0, 2, (3, 4))
    covs = [(q * rng.uniform(0.5, 3.0, 4)) @ q.T for q in (random_rotation(rng, 4) for _ in occ)]
    model, report = m_step(stats_for(occ, means, covs), KALDI)
    np.testing.assert_allclose(model.weights, [0.15, 0.25, 0.6], rtol=1e-15)
    np.testing.assert_allclose(model.means, means, rtol=1e-13)
    np.testing.assert_allclose(model.covariances, covs, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(model.covariances, model.covariances.transpose(0, 2, 1))
    assert report.floored_elements == 0 and report.removed == []


# ---------------------------------------------------------------------------------------
# floors


def test_diag_absolute_floor_counts_elements_and_gaussians():
    occ = [40.0, 40.0, 40.0]
    means = [[10.0, 0.0, 1.0], [0.0, 5.0, 0.0], [1.0, 1.0, 1.0]]
    var = [[1e-4, 2.0, 1.0], [0.5, 1.0, 2.0], [1e-5, 3e-4, 0.9]]
    model, report = m_step(stats_for(occ, means, var), KALDI)
    expected = np.maximum(var, 1e-3)
    np.testing.assert_allclose(model.covariances, expected, rtol=1e-9)
    assert model.covariances[0, 0] == model.covariances[2, 0] == 1e-3  # exactly the floor
    assert (report.floored_elements, report.floored_gaussians) == (3, 2)
    np.testing.assert_allclose(model.means, means, rtol=1e-12)


def test_diag_floor_is_the_min_variance_option():
    var = [[0.005, 0.02], [0.2, 0.008]]
    model, report = m_step(
        stats_for([50, 50], [[0, 0], [1, 1]], var), MStepOptions(min_variance=0.01)
    )
    np.testing.assert_allclose(model.covariances, [[0.01, 0.02], [0.2, 0.01]], rtol=1e-12)
    assert (report.floored_elements, report.floored_gaussians) == (2, 2)


def test_full_eigenvalue_floor():
    rng = np.random.default_rng(1)
    rotations = [random_rotation(rng, 3) for _ in range(3)]
    eigs = np.array([[100.0, 1.0, 1e-4], [1.0, 0.5, 1e-5], [2.0, 1.0, 0.5]])
    covs = np.array([(q * e) @ q.T for q, e in zip(rotations, eigs, strict=True)])
    means = rng.normal(0, 1, (3, 3))
    model, report = m_step(stats_for([200, 300, 500], means, covs), KALDI)
    # floor = max(variance_floor, λmax / max_condition): 1e-2 for the first, 1e-3 for the second
    floors = np.maximum(1e-3, eigs.max(axis=1) / 1e4)
    expected = np.maximum(eigs, floors[:, None])
    got = np.linalg.eigvalsh(model.covariances)
    np.testing.assert_allclose(np.sort(got, axis=1), np.sort(expected, axis=1), rtol=1e-8)
    # the eigenvectors are kept: Σ' = Q diag(max(λ, floor)) Qᵀ
    rebuilt = np.array([(q * e) @ q.T for q, e in zip(rotations, expected, strict=True)])
    np.testing.assert_allclose(model.covariances, rebuilt, rtol=1e-8, atol=1e-12)
    assert np.all(got.max(axis=1) / got.min(axis=1) <= 1e4 * (1 + 1e-9))  # max_condition
    assert (report.floored_elements, report.floored_gaussians) == (2, 2)
    np.testing.assert_allclose(model.means, means, rtol=1e-10, atol=1e-12)


def test_full_floor_options():
    rng = np.random.default_rng(2)
    q = random_rotation(rng, 3)
    cov = (q * [10.0, 1.0, 0.05]) @ q.T
    opts = MStepOptions(variance_floor=0.2, max_condition=1e6)
    model, report = m_step(stats_for([500], [[0, 0, 0]], [cov]), opts)
    np.testing.assert_allclose(np.linalg.eigvalsh(model.covariances[0]), [0.2, 1, 10], rtol=1e-9)
    opts = MStepOptions(variance_floor=1e-3, max_condition=20.0)
    model, report = m_step(stats_for([500], [[0, 0, 0]], [cov]), opts)
    np.testing.assert_allclose(np.linalg.eigvalsh(model.covariances[0]), [0.5, 1, 10], rtol=1e-9)
    assert (report.floored_elements, report.floored_gaussians) == (1, 1)


# ---------------------------------------------------------------------------------------
# starved components


@pytest.fixture
def diag_previous() -> GMM:
    return GMM(
        np.array([0.3, 0.4, 0.3]),
        np.array([[9.0, 9.0], [-7.0, 7.0], [5.0, -5.0]]),
        np.array([[3.0, 3.0], [0.7, 0.6], [2.0, 2.5]]),
        "diag",
    )


MEANS = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
VARS = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def test_low_occupancy_component_is_removed(diag_previous):
    stats = stats_for([50.0, 5.0, 45.0], MEANS, VARS)
    model, report = m_step(stats, KALDI, previous=diag_previous)
    assert report.removed == [1] and report.not_updated == []
    assert (report.n_components_in, report.n_components_out) == (3, 2)
    np.testing.assert_allclose(model.weights, [50 / 95, 45 / 95], rtol=1e-14)
    np.testing.assert_allclose(model.means, [MEANS[0], MEANS[2]], rtol=1e-13)
    np.testing.assert_allclose(model.covariances, [VARS[0], VARS[2]], rtol=1e-12)


def test_low_weight_component_is_removed(diag_previous):
    # occupancy 20 passes the count test but 20/420 < min_gaussian_weight = 0.1
    stats = stats_for([100.0, 20.0, 300.0], MEANS, VARS)
    model, report = m_step(stats, MStepOptions(min_gaussian_weight=0.1), previous=diag_previous)
    assert report.removed == [1]
    np.testing.assert_allclose(model.weights, [0.25, 0.75], rtol=1e-14)


def test_starved_component_kept_when_removal_is_off(diag_previous):
    opts = MStepOptions(remove_low_count_gaussians=False, min_gaussian_weight=0.1)
    stats = stats_for([500.0, 5.0, 495.0], MEANS, VARS)
    model, report = m_step(stats, opts, previous=diag_previous)
    assert report.removed == [] and report.not_updated == [1]
    assert model.n_components == 3
    # old mean and variance, weight max(prob, min_weight) = 0.1, then renormalised
    np.testing.assert_array_equal(model.means[1], diag_previous.means[1])
    np.testing.assert_array_equal(model.covariances[1], diag_previous.covariances[1])
    np.testing.assert_allclose(model.weights, np.array([0.5, 0.1, 0.495]) / 1.095, rtol=1e-14)
    np.testing.assert_allclose(model.means[[0, 2]], [MEANS[0], MEANS[2]], rtol=1e-13)


def test_starved_component_keeps_its_probability_when_above_min_weight(diag_previous):
    opts = MStepOptions(remove_low_count_gaussians=False)
    model, report = m_step(stats_for([50.0, 5.0, 45.0], MEANS, VARS), opts, previous=diag_previous)
    assert report.not_updated == [1]
    np.testing.assert_allclose(model.weights, [0.5, 0.05, 0.45], rtol=1e-14)


def test_starved_full_component_keeps_previous_covariance():
    rng = np.random.default_rng(3)
    covs = np.array(
        [(q * rng.uniform(0.5, 2, 3)) @ q.T for q in (random_rotation(rng, 3) for _ in range(2))]
    )
    previous = GMM(np.array([0.5, 0.5]), rng.normal(size=(2, 3)), covs[::-1].copy(), "full")
    opts = MStepOptions(remove_low_count_gaussians=False)
    model, report = m_step(stats_for([500.0, 50.0], np.zeros((2, 3)), covs), opts, previous)
    assert report.not_updated == [1]
    np.testing.assert_array_equal(model.covariances[1], previous.covariances[1])
    np.testing.assert_array_equal(model.means[1], previous.means[1])
    np.testing.assert_allclose(model.covariances[0], covs[0], rtol=1e-12, atol=1e-14)


def test_last_component_is_never_removed(diag_previous):
    stats = stats_for([3.0, 4.0, 2.0], MEANS, VARS)
    model, report = m_step(stats, KALDI, previous=diag_previous)
    assert report.removed == [0, 1] and report.not_updated == [2]
    assert model.n_components == 1
    np.testing.assert_array_equal(model.weights, [1.0])
    np.testing.assert_array_equal(model.means[0], diag_previous.means[2])
    np.testing.assert_array_equal(model.covariances[0], diag_previous.covariances[2])


def test_all_starved_without_previous_model_is_a_user_error():
    with pytest.raises(UserError, match="occupancy"):
        m_step(stats_for([3.0, 4.0], MEANS[:2], VARS[:2]), KALDI)


@pytest.mark.parametrize(("cov_type", "threshold"), [("diag", 10.0), ("full", 100.0)])
def test_default_min_occupancy(cov_type, threshold):
    """Kaldi's defaults: 10 for diagonal, 100 for full; the test is ``occ > threshold``."""
    occ = [threshold, threshold + 0.5, 8 * threshold]
    means = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    covs = np.array([[1.0, 2.0], [2.0, 1.0], [1.5, 1.5]])
    if cov_type == "full":
        covs = np.array([np.diag(v) for v in covs])
    model, report = m_step(stats_for(occ, means, covs), KALDI)
    assert report.removed == [0]
    np.testing.assert_allclose(model.means, means[1:], rtol=1e-13)
    assert model.covariance_type == cov_type


# ---------------------------------------------------------------------------------------
# against Kaldi's gmm-global-est


@pytest.fixture(scope="module")
def golden() -> Path:
    return KALDI_MODELS


def test_reader_matches_the_float64_parameters(golden):
    """The test-only reader recovers the parameters Kaldi was given (float32 precision)."""
    import json

    params = json.loads((golden / "parameters.json").read_text())
    for name in ("diag_small", "diag_digits_k8", "full_small", "full_digits_k4"):
        gmm, ref = read_gmm(golden / f"{name}.kaldi.txt"), params[name]
        cov = np.array(ref["variances"] if "variances" in ref else ref["covariances"])
        np.testing.assert_allclose(gmm.weights, ref["weights"], rtol=1e-6)
        for got, want in ((gmm.means, np.array(ref["means"])), (gmm.covariances, cov)):
            # norm-wise: the full means come through the inverse of a rounded precision
            rel = np.linalg.norm((got - want).reshape(len(want), -1), axis=1)
            rel /= np.linalg.norm(want.reshape(len(want), -1), axis=1)
            assert rel.max() < 1e-5, (name, rel)


def kaldi_stats(golden: Path) -> GmmStats:
    """The accumulator as GmmStats: Kaldi's MEANACCS/DIAGVARACCS are Σγx and Σγx²."""
    acc = read_accs(golden / "acc.sum.kaldi.txt")
    assert (acc.dim, acc.n_components, acc.flags) == (39, 8, 7)
    return GmmStats(acc.occupancy, acc.mean_accs, acc.var_accs)


def relative_errors(model: GMM, kaldi) -> dict[str, float]:
    return {
        name: float(np.max(np.abs(getattr(model, name) - want) / np.abs(want)))
        for name, want in (
            ("weights", kaldi.weights),
            ("means", kaldi.means),
            ("covariances", kaldi.covariances),
        )
    }


# Kaldi stores uncentred float32 sums and a float32 model printed with 7 digits; measured
# worst relative errors: 3.6e-7 (weights), 7.9e-7 (means), 2.0e-6 (variances).
KALDI_RTOL = 1e-5


def test_matches_gmm_global_est_defaults(golden):
    kaldi_in = read_gmm(golden / "diag_digits_k8.kaldi.txt")
    previous = GMM(kaldi_in.weights, kaldi_in.means, kaldi_in.covariances, "diag")
    opts = MStepOptions(min_variance=0.001, min_gaussian_occupancy=10, min_gaussian_weight=1e-5)
    model, report = m_step(kaldi_stats(golden), opts, previous=previous)
    expected = read_gmm(golden / "est.default.kaldi.txt")
    assert model.n_components == len(expected.weights) == 8
    assert report.removed == [] and report.floored_elements == 0
    errors = relative_errors(model, expected)
    print(f"Kaldi parity (default options): {errors}")
    assert max(errors.values()) < KALDI_RTOL, errors


def test_matches_gmm_global_est_with_removal_and_floor(golden):
    """``--min-gaussian-occupancy=3000 --min-variance=0.5``: Kaldi keeps two Gaussians."""
    kaldi_in = read_gmm(golden / "diag_digits_k8.kaldi.txt")
    previous = GMM(kaldi_in.weights, kaldi_in.means, kaldi_in.covariances, "diag")
    stats = kaldi_stats(golden)
    opts = MStepOptions(min_variance=0.5, min_gaussian_occupancy=3000, min_gaussian_weight=1e-5)
    model, report = m_step(stats, opts, previous=previous)
    expected = read_gmm(golden / "est.floored.kaldi.txt")
    assert model.n_components == len(expected.weights)
    assert report.removed == [int(c) for c in np.flatnonzero(stats.zeroth <= 3000)]
    # Kaldi writes a floored variance 0.5 as inverse variance 2 exactly
    floored = 1.0 / expected.covariances == 2.0
    assert report.floored_elements == int(floored.sum()) > 0
    assert report.floored_gaussians == int(floored.any(axis=1).sum())
    errors = relative_errors(model, expected)
    print(f"Kaldi parity (removal and floor): {errors}")
    assert max(errors.values()) < KALDI_RTOL, errors
