"""No subnormal arithmetic on real speech, proven without timing.

Many CPUs process every subnormal float 10-100x slower, so the speed of an E-step that
creates them depends on the machine. These tests run the hot paths (soft and hard E-step,
float32 and float64, diagonal and full, and scoring) on real MFCC (the bundled digits) with
trained models, with numpy replaced in emdist's numerics modules by a proxy that inspects
every ``exp2`` result, every operand of every matrix product and the product terms inside
it (the smallest magnitudes that meet in it). They also check that the
flush changes nothing that matters: the statistics stay within 1e-6 (‖Δ‖/‖ref‖ per
statistic and component) of an unflushed float64 computation.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.special import logsumexp

import emdist
import emdist.models.estep
import emdist.models.gselect
import emdist.models.kernel
from emdist.models.estep import Accumulator, EStepOptions, accumulate, make_kernel
from emdist.models.gmm import GMM
from emdist.models.initialize import kmeans_plus_plus
from emdist.models.kernel import FLUSH_BITS, expand_features
from emdist.models.mstep import MStepOptions, m_step

CASES = [("diag", 32), ("full", 8)]


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def frames(digits_frames) -> np.ndarray:
    return digits_frames


@pytest.fixture(scope="module")
def models(frames) -> dict[str, GMM]:
    """A trained model per covariance type: k-means++ seeds, then 6 float64 EM steps."""
    x = frames.astype(np.float64)
    out = {}
    for cov_type, k in CASES:
        means = kmeans_plus_plus(x, k, np.random.default_rng(1))
        cov = np.cov(x.T) if cov_type == "full" else x.var(axis=0)
        model = GMM(np.full(k, 1.0 / k), means, np.broadcast_to(cov, (k, *cov.shape)), cov_type)
        for _ in range(6):
            model, _ = m_step(accumulate(model, frames), MStepOptions(), previous=model)
        out[cov_type] = model
    return out


def subnormals(a) -> int:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return 0
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)))


def subnormal_terms(a, b) -> int:
    """Inner indices k of ``a @ b`` where some product term ``a[i, k] * b[k, j]`` is
    subnormal: the smallest nonzero magnitudes of column k of ``a`` and row k of ``b`` make
    one of the terms, so if their product is normal, every term is."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind != "f" or a.ndim != 2 or b.ndim != 2:
        return 0
    small_a = np.where(a != 0, np.abs(a), np.inf).min(axis=0)
    small_b = np.where(b != 0, np.abs(b), np.inf).min(axis=1)
    smallest = small_a.astype(np.float64) * small_b
    return int(np.count_nonzero(smallest < np.finfo(a.dtype).tiny))


class CheckedNumpy:
    """numpy, except that ``exp2`` results, matrix-product operands and the product terms
    inside every matrix product are inspected."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.found: Counter[str] = Counter()

    def __getattr__(self, name):
        return getattr(np, name)

    def exp2(self, x, *args, **kwargs):
        result = np.exp2(x, *args, **kwargs)
        self.calls["exp2"] += 1
        self.found["exp2 result"] += subnormals(result)
        return result

    def matmul(self, a, b, *args, **kwargs):
        self.calls["matmul"] += 1
        self.found["matmul operand"] += subnormals(a) + subnormals(b)
        self.found["matmul product term"] += subnormal_terms(a, b)
        return np.matmul(a, b, *args, **kwargs)


@pytest.fixture
def checked(monkeypatch) -> CheckedNumpy:
    proxy = CheckedNumpy()
    for module in (emdist.models.kernel, emdist.models.estep, emdist.models.gselect):
        monkeypatch.setattr(module, "np", proxy)
    return proxy


def exact_log_posteriors(model: GMM, frames: np.ndarray) -> np.ndarray:
    """log γ_tk in float64 from the plain natural-units product, no flush: (N, K)."""
    comp = model.kernel(np.float64).component_log_likelihood(
        expand_features(frames.astype(np.float64), model.covariance_type)
    )
    return comp - logsumexp(comp, axis=1, keepdims=True)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_unflushed_float32_posteriors_would_be_subnormal(models, frames, cov_type):
    """The data make the point: without the flush, exp would produce subnormals."""
    log_post = exact_log_posteriors(models[cov_type], frames)
    rel = log_post - log_post.max(axis=1, keepdims=True)
    band = (rel < np.log(np.finfo(np.float32).tiny)) & (rel > np.log(2.0**-149))
    print(f"{cov_type}: {band.mean():.2%} of float32 posteriors would be subnormal")
    assert band.sum() > 100


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hard", [False, True])
def test_no_subnormal_reaches_exp2_or_a_product(models, frames, checked, cov_type, dtype, hard):
    model = models[cov_type]
    accumulate(model, frames, EStepOptions(dtype=dtype), hard=hard)
    make_kernel(model, EStepOptions(dtype=dtype)).frame_log_likelihood(frames, 1024)
    assert checked.calls["matmul"] > 2 * len(frames) // 1024
    assert hard or checked.calls["exp2"] > len(frames) // 1024
    assert sum(checked.found.values()) == 0, dict(checked.found)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_no_subnormal_in_the_selected_e_step(models, frames, checked, dtype):
    model = models["diag"]
    kernel = make_kernel(model, EStepOptions(dtype=dtype))
    selection = emdist.models.gselect.select(kernel, frames, 8)
    emdist.models.gselect.accumulate_selected(kernel, frames[selection.order], selection)
    assert checked.calls["exp2"] >= len(selection.chunks) - 1 > len(frames) // 4096
    assert sum(checked.found.values()) == 0, dict(checked.found)


def relative_errors(stats, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Worst per-component ‖Δ‖/‖ref‖ of each statistic."""
    out = {}
    for name, want in ref.items():
        got = getattr(stats, name).reshape(len(want), -1)
        want = want.reshape(len(want), -1)
        delta = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        out[name] = float(delta.max())
    return out


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flushed_statistics_match_unflushed_float64(models, frames, cov_type, dtype):
    model = models[cov_type]
    x = frames.astype(np.float64)
    with np.errstate(under="ignore"):
        resp = np.exp(exact_log_posteriors(model, frames))
    second = resp.T @ x**2 if cov_type == "diag" else np.einsum("tk,ti,tj->kij", resp, x, x)
    ref = {"zeroth": resp.sum(axis=0), "first": resp.T @ x, "second": second}
    stats = accumulate(model, frames, EStepOptions(dtype=dtype))
    errors = relative_errors(stats, ref)
    print(f"{cov_type} {dtype}: {errors}")
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_flushed_share_is_reported(models, frames, cov_type):
    """The diagnostic counts exactly the posteriors below 2^-82 of the frame's best."""
    model = models[cov_type]
    acc = Accumulator(make_kernel(model, EStepOptions("float64")), model.dim, 1024,
                      count_flushed=True)
    acc.push(frames)
    acc.finish()
    log2_post = exact_log_posteriors(model, frames) / np.log(2.0)
    rel = log2_post - log2_post.max(axis=1, keepdims=True)
    below, near = np.count_nonzero(rel < -FLUSH_BITS), np.count_nonzero(
        np.abs(rel + FLUSH_BITS) < 1e-6)
    print(f"{cov_type}: flushed {acc.flushed / rel.size:.2%} of the posteriors")
    assert acc.flushed > 0
    assert abs(acc.flushed - below) <= near
