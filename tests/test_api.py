"""The scikit-learn-style API (emdist/api.py): GaussianMixture and WordRecognizer.

* from the same starting parameters, GaussianMixture(mstep_style="sklearn") is
  sklearn.mixture.GaussianMixture to float64 rounding (diag and full);
* it passes sklearn's check_estimator;
* fit(data_dir) and WordRecognizer give the bits of `emdist train --global` and of
  `emdist train` (the model file byte for byte), and predict/score agree with `emdist test`;
* on a Dask client (a LocalCluster of 2 workers) the bits are those of a fit in process,
  for an array (scattered in-memory shards) and for a data dir;
* emdist.api imports and fits without scikit-learn; the module's doctest runs.
"""

from __future__ import annotations

import doctest
import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from helpers import digits_subset
from typer.testing import CliRunner

import emdist
import emdist.api
from emdist.cli import app
from emdist.data.datadir import load_feats

pytestmark = pytest.mark.usefixtures("one_blas_thread")

GMM_ATTRS = ("weights_", "means_", "covariances_")


def mixture_frames(n: int = 2000, seed: int = 42) -> np.ndarray:
    """Frames from a 3-component, 5-dimensional mixture with correlated dimensions."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (3, 5))
    mixing = np.array([rng.normal(size=(5, 5)) * 0.6 + np.eye(5) for _ in range(3)])
    comp = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    return means[comp] + np.einsum("tij,tj->ti", mixing[comp], rng.normal(size=(n, 5)))


def start_params(X: np.ndarray, cov: str) -> dict:
    rng = np.random.default_rng(1)
    prec = (np.tile(1.0 / X.var(axis=0), (3, 1)) if cov == "diag"
            else np.tile(np.linalg.inv(np.cov(X.T, bias=True)), (3, 1, 1)))
    return dict(weights_init=np.array([0.2, 0.3, 0.5]),
                means_init=X[rng.choice(len(X), 3, replace=False)], precisions_init=prec)


def quiet_fit(est, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn's ConvergenceWarning too
        return est.fit(X)


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Small digits subsets: 3 utterances a word to train, 2 to test."""
    root = tmp_path_factory.mktemp("digits")
    return digits_subset(root / "train", "train", 3), digits_subset(root / "test", "test", 2)


# -- scikit-learn ------------------------------------------------------------------------


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_matches_sklearn_from_the_same_start(cov):
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    X = mixture_frames()
    options = dict(n_components=3, covariance_type=cov, max_iter=100, tol=1e-4,
                   **start_params(X, cov))
    ours = quiet_fit(emdist.GaussianMixture(**options), X)
    theirs = quiet_fit(sklearn_mixture.GaussianMixture(**options), X)
    for name in GMM_ATTRS + ("precisions_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-7,
                                   atol=1e-12, err_msg=name)
    assert (ours.n_iter_, ours.converged_) == (theirs.n_iter_, theirs.converged_)
    assert ours.converged_ and ours.n_iter_ > 2
    np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=1e-9)
    np.testing.assert_allclose(ours.lower_bounds_, theirs.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(ours.score_samples(X), theirs.score_samples(X), rtol=1e-9)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-9)
    assert np.array_equal(ours.predict(X), theirs.predict(X))
    np.testing.assert_allclose([ours.bic(X), ours.aic(X)], [theirs.bic(X), theirs.aic(X)],
                               rtol=1e-9)
    # sklearn reports the mean log-likelihood of the model the last iteration started from
    before_last = quiet_fit(emdist.GaussianMixture(**{**options, "max_iter": ours.n_iter_ - 1,
                                                      "tol": 0.0}), X)
    np.testing.assert_allclose(before_last.score(X), ours.lower_bound_, rtol=1e-9)


def test_check_estimator():
    sklearn = pytest.importorskip("sklearn")
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 6):
        pytest.skip("expected_failed_checks needs scikit-learn >= 1.6")
    from sklearn.utils.estimator_checks import check_estimator

    # Every check passes (array-API checks are skipped without SCIPY_ARRAY_API): nothing is
    # expected to fail, for the scikit-learn setting and for Kaldi's M-step and mix-up.
    expected_failed_checks: dict[str, str] = {}
    for est in (emdist.GaussianMixture(n_components=2, covariance_type="diag", nj=3),
                emdist.GaussianMixture(covariance_type="diag", init_params="mixup",
                                       mstep_style="kaldi", precision="float32")):
        with warnings.catch_warnings():
            # "does not inherit from sklearn.base.BaseEstimator": deliberately (optional)
            warnings.simplefilter("ignore", UserWarning)
            results = check_estimator(est, expected_failed_checks=expected_failed_checks,
                                      on_fail=None)
        bad = [(r["check_name"], repr(r["exception"])) for r in results
               if r["status"] == "failed"]
        assert bad == []
        assert sum(r["status"] == "passed" for r in results) >= 35


def test_clone_keeps_the_client_and_pickling_drops_it():
    sklearn_base = pytest.importorskip("sklearn.base")
    marker = object()
    est = emdist.GaussianMixture(n_components=2, client=marker)
    assert sklearn_base.clone(est).client is marker
    state = pickle.loads(pickle.dumps(emdist.GaussianMixture(n_components=2)))
    assert state.get_params() == emdist.GaussianMixture(n_components=2).get_params()
    est.client = None
    assert repr(est) == "GaussianMixture(n_components=2)"


# -- the engine's choices ----------------------------------------------------------------


def test_fit_options_and_sample():
    X = mixture_frames(600).astype(np.float32)
    gm = quiet_fit(emdist.GaussianMixture(n_components=3, covariance_type="full",
                                          random_state=0, n_init=2), X)
    assert gm.converged_ and gm.n_features_in_ == 5 and gm.means_.dtype == np.float64
    warm = gm.set_params(warm_start=True, max_iter=2)
    before = gm.lower_bound_
    quiet_fit(warm, X)
    assert warm.n_iter_ <= 2 and warm.lower_bound_ >= before - 1e-9
    part = quiet_fit(emdist.GaussianMixture(n_components=3, means_init=gm.means_,
                                            max_iter=1, random_state=0), X)
    assert part.n_iter_ == 1
    samples, comps = gm.sample(50)
    assert samples.shape == (50, 5) and comps.shape == (50,)
    assert np.bincount(comps, minlength=3).sum() == 50


@pytest.mark.parametrize("bad, message", [
    (np.zeros(5), "Expected 2D array"),
    (np.array([[0.0, np.nan], [1.0, 2.0], [0.0, 1.0]]), "NaN"),
    (np.ones((1, 2)), "n_samples >= n_components"),
])
def test_bad_frames(bad, message):
    with pytest.raises(ValueError, match=message):
        emdist.GaussianMixture(n_components=2).fit(bad)


@pytest.mark.parametrize("options, message", [
    (dict(covariance_type="tied"), "not supported by emdist"),
    (dict(init_params="random"), "not supported by emdist"),
    (dict(means_init=np.zeros((3, 2))), "'means' should have the shape"),
    (dict(weights_init=[0.5, 0.6]), "normalized"),
])
def test_bad_options(options, message):
    X = mixture_frames(100)[:, :2]
    with pytest.raises(ValueError, match=message):
        emdist.GaussianMixture(n_components=2, **options).fit(X)


def test_predict_checks_the_features():
    gm = quiet_fit(emdist.GaussianMixture(n_components=2, random_state=0), mixture_frames(200))
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 5"):
        gm.predict(np.zeros((3, 2)))


# -- the CLI, byte for byte ----------------------------------------------------------------


def test_global_fit_of_a_data_dir_is_emdist_train_global(digits, tmp_path, restore_logging):
    train, _ = digits
    run_cli(["train", train, tmp_path / "exp", "--workers", "0", "--global", "--num-gauss",
             "8", "--num-iters", "3"])
    cli = emdist.load_models(tmp_path / "exp" / "final.mdl")["global"]
    gm = quiet_fit(emdist.GaussianMixture(n_components=8, covariance_type="diag", max_iter=3,
                                          tol=0, init_params="mixup", mstep_style="kaldi",
                                          precision="float32", random_state=0), str(train))
    for name in GMM_ATTRS:
        assert np.array_equal(getattr(gm, name), getattr(cli, name[:-1])), name
    records = [json.loads(line) for line in
               (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert gm.lower_bounds_ == [r["loglike_per_frame"] for r in records]
    assert gm.n_iter_ == 3 and not gm.converged_
    # the same frames as an array: the same engine, other shard boundaries
    data = emdist.load_data_dir(train)
    frames = np.concatenate([load_feats(u.rxfilename) for u in data.utts])
    arr = quiet_fit(emdist.GaussianMixture(**{**gm.get_params(), "nj": 8}), frames)
    for name in GMM_ATTRS:
        np.testing.assert_allclose(getattr(arr, name), getattr(gm, name), rtol=1e-4,
                                   atol=1e-6)


def test_word_recognizer_is_emdist_train_and_test(digits, tmp_path, restore_logging):
    train, test = digits
    run_cli(["train", train, tmp_path / "exp", "--workers", "0", "--num-gauss", "4",
             "--num-iters", "3"])
    run_cli(["test", tmp_path / "exp", test, "--workers", "0"])
    rec = emdist.WordRecognizer(n_components=4, max_iter=3).fit(str(train))
    rec.save(tmp_path / "api.mdl")
    assert (tmp_path / "api.mdl").read_bytes() == (tmp_path / "exp" / "final.mdl").read_bytes()
    assert list(rec.classes_) == sorted(rec.models_) and len(rec.models_) == 11
    results = json.loads((tmp_path / "exp" / f"decode_{test.name}" / "results.json").read_text())
    assert rec.predict(test) == [u["hyp"] for u in results["utts"]]
    assert rec.score(test) == pytest.approx(results["accuracy"], abs=0)
    with pytest.raises(ValueError, match="--model"):
        emdist.WordRecognizer(model="svm").fit(str(train))


# -- a Dask cluster ----------------------------------------------------------------------


def test_on_a_dask_client_the_bits_of_a_fit_in_process(digits, tmp_path):
    distributed = pytest.importorskip("distributed")
    train, test = digits
    X = mixture_frames(1500)
    options = dict(n_components=4, covariance_type="full", max_iter=5, tol=0, random_state=3,
                   nj=5)  # k-means++ on sampled frames, Lloyd passes, EM
    here = quiet_fit(emdist.GaussianMixture(**options), X)
    words_here = emdist.WordRecognizer(model="gmm", n_components=2, max_iter=2).fit(train)
    words_here.save(tmp_path / "here.mdl")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        there = quiet_fit(emdist.GaussianMixture(**options, client=client), X)
        words = emdist.WordRecognizer(n_components=2, max_iter=2, client=client).fit(train)
        words.save(tmp_path / "there.mdl")
        assert words.predict(test) == words_here.predict(test)
    for name in GMM_ATTRS:
        assert np.array_equal(getattr(there, name), getattr(here, name)), name
    assert there.lower_bounds_ == here.lower_bounds_
    assert (tmp_path / "there.mdl").read_bytes() == (tmp_path / "here.mdl").read_bytes()


# -- without scikit-learn; the docstring --------------------------------------------------


def test_works_without_sklearn():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["sklearn"] = None  # any import of scikit-learn now fails
        import numpy as np
        import emdist, emdist.api
        X = np.random.default_rng(0).normal(size=(200, 3))
        try:
            emdist.GaussianMixture().predict(X)
        except emdist.api.NotFittedError:
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = emdist.GaussianMixture(n_components=2, max_iter=2, tol=0,
                                        random_state=0).fit(X)
        assert [w.category for w in caught] == [emdist.api.ConvergenceWarning], caught
        assert gm.predict(X).shape == (200,) and gm.get_params()["n_components"] == 2
        assert sys.modules["sklearn"] is None
        assert not [m for m in sys.modules if m.startswith("sklearn.")]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_module_docstring_runs():
    result = doctest.testmod(emdist.api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5
    assert result.failed == 0
