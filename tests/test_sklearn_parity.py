"""emdist's scikit-learn-compatible setting reproduces ``sklearn.mixture.GaussianMixture``.

From the same initial model, N iterations of ``accumulate`` + ``m_step(style="sklearn")``
must give sklearn's weights, means and covariances after ``max_iter=N`` (``tol=0``, so
sklearn never stops early). The data log-likelihood must also never decrease, in both
M-step styles, on real features.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import emdist
from emdist.data.datadir import load_feats
from emdist.models.estep import accumulate
from emdist.models.gmm import GMM
from emdist.models.mstep import MStepOptions, m_step

REG_COVAR = 1e-6
SKLEARN = MStepOptions(style="sklearn", reg_covar=REG_COVAR)
ITERATIONS = (1, 5, 20)
RTOL = 1e-8


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Frames of the bundled digits train set as float64: all, and per label."""
    data = emdist.load_data_dir(emdist.digits_dir("train"))
    feats = [load_feats(u.rxfilename).astype(np.float64) for u in data.utts]
    out = {"all": np.concatenate(feats)}
    for label in data.labels:
        out[label] = np.concatenate(
            [f for f, u in zip(feats, data.utts, strict=True) if u.label == label]
        )
    return out


def synthetic_frames() -> np.ndarray:
    """2000 frames from a 3-component, 5-dimensional mixture with correlated dimensions."""
    rng = np.random.default_rng(42)
    means = rng.normal(0, 3, (3, 5))
    mixing = [rng.normal(size=(5, 5)) * 0.6 + np.eye(5) for _ in range(3)]
    comp = rng.choice(3, size=2000, p=[0.5, 0.3, 0.2])
    noise = rng.normal(size=(2000, 5))
    return means[comp] + np.einsum("tij,tj->ti", np.array(mixing)[comp], noise)


def initial_model(frames: np.ndarray, k: int, cov_type: str, seed: int) -> GMM:
    """Random distinct frames as means, the global (co)variance, random weights."""
    rng = np.random.default_rng(seed)
    means = frames[rng.choice(len(frames), size=k, replace=False)]
    cov = np.cov(frames.T, bias=True) if cov_type == "full" else frames.var(axis=0)
    weights = rng.dirichlet(np.full(k, 5.0))
    return GMM(weights, means, np.broadcast_to(cov, (k, *cov.shape)), cov_type)


def emdist_iterations(model: GMM, frames: np.ndarray, n_iter: int, options: MStepOptions):
    """Models after 1..n_iter iterations and the per-frame log-likelihood of each E-step."""
    models, loglikes = [], []
    for _ in range(n_iter):
        stats = accumulate(model, frames)
        loglikes.append(stats.loglike / stats.frames)
        model, _ = m_step(stats, options, previous=model)
        models.append(model)
    return models, np.array(loglikes)


def sklearn_fit(model: GMM, frames: np.ndarray, n_iter: int) -> GaussianMixture:
    if model.covariance_type == "diag":
        precisions = 1.0 / model.covariances
    else:
        precisions = np.linalg.inv(model.covariances)
        precisions = 0.5 * (precisions + precisions.transpose(0, 2, 1))
    gm = GaussianMixture(
        n_components=model.n_components,
        covariance_type=model.covariance_type,
        weights_init=model.weights,
        means_init=model.means,
        precisions_init=precisions,
        max_iter=n_iter,
        tol=0,
        reg_covar=REG_COVAR,
        n_init=1,
        init_params="random",
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(frames)
    assert gm.n_iter_ == n_iter
    return gm


CASES = [
    pytest.param("synthetic", 3, "diag", id="synthetic-K3-diag"),
    pytest.param("synthetic", 3, "full", id="synthetic-K3-full"),
    pytest.param("1", 4, "diag", id="digit1-K4-diag"),
    pytest.param("1", 4, "full", id="digit1-K4-full"),
    pytest.param("all", 8, "diag", id="train-K8-diag"),
    pytest.param("all", 8, "full", id="train-K8-full"),
]


@pytest.mark.parametrize(("dataset", "k", "cov_type"), CASES)
def test_iterations_match_sklearn(digits, dataset, k, cov_type):
    frames = synthetic_frames() if dataset == "synthetic" else digits[dataset]
    start = initial_model(frames, k, cov_type, seed=k)
    models, _ = emdist_iterations(start, frames, max(ITERATIONS), SKLEARN)
    worst = {}
    for n_iter in ITERATIONS:
        gm, ours = sklearn_fit(start, frames, n_iter), models[n_iter - 1]
        for name, got, want in (
            ("weights", ours.weights, gm.weights_),
            ("means", ours.means, gm.means_),
            ("covariances", ours.covariances, gm.covariances_),
        ):
            np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{name} after {n_iter}")
            rel = float(np.max(np.abs(got - want) / np.abs(want)))
            worst[name] = max(worst.get(name, 0.0), rel)
    print(f"sklearn parity {dataset} K={k} {cov_type}: {worst}")


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("style", ["sklearn", "kaldi"])
def test_log_likelihood_never_decreases(digits, style, cov_type):
    frames = digits["all"]
    options = SKLEARN if style == "sklearn" else MStepOptions()
    start = initial_model(frames, 8, cov_type, seed=3)
    _, loglikes = emdist_iterations(start, frames, 30, options)
    drops = np.diff(loglikes)
    assert np.all(drops >= -1e-9 * np.abs(loglikes[:-1])), drops.min()
    assert loglikes[-1] > loglikes[0]
