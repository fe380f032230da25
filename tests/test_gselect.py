"""Gaussian selection (``--gselect``) and frame subsampling (``--subsample``).

The selected E-step is checked against a brute-force float64 reference (posteriors
renormalised over each frame's own top-N, as Kaldi's ``gmm-global-acc-stats --gselect``
computes them), against the exact E-step when every Gaussian is selected, and in training
against exact EM on the digits. Subsampling is checked against training on a data dir that
holds only the kept frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from scipy.special import logsumexp

import emdist
from emdist.backends.serial import SerialBackend
from emdist.data.datadir import load_data_dir, load_feats
from emdist.engine import TrainConfig, train
from emdist.engine.driver import _mstep_options
from emdist.errors import UserError
from emdist.io.expdir import ExpDir
from emdist.models.estep import EStepOptions, accumulate, make_kernel
from emdist.models.gmm import GMM
from emdist.models.gselect import accumulate_selected, plan, select, top_n
from emdist.models.initialize import kmeans_plus_plus
from emdist.models.kernel import expand_features
from emdist.models.mstep import MStepOptions, m_step

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def frames(digits_frames) -> np.ndarray:
    return digits_frames


@pytest.fixture(scope="module")
def ubm(frames) -> GMM:
    """A diagonal K=64 model of all digits frames: k-means++ seeds, 4 float64 EM steps."""
    x = frames.astype(np.float64)
    k = 64
    model = GMM(np.full(k, 1 / k), kmeans_plus_plus(x, k, np.random.default_rng(2)),
                np.broadcast_to(x.var(axis=0), (k, x.shape[1])), "diag")
    for _ in range(4):
        model, _ = m_step(accumulate(model, frames), MStepOptions(), previous=model)
    return model


def component_ll(model: GMM, frames: np.ndarray) -> np.ndarray:
    x = frames.astype(np.float64)
    return model.kernel(np.float64).component_log_likelihood(
        expand_features(x, model.covariance_type))


def test_top_n_are_the_best_gaussians_best_first(ubm, frames):
    x = frames[:3000]
    ll = component_ll(ubm, x)
    got = top_n(make_kernel(ubm, EStepOptions("float64")), x, 10, chunk_size=700)
    want = np.argsort(-ll, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block_size", [1, 16, 128, 5000])
def test_plan_holds_every_frame_once_and_its_selection(ubm, frames, block_size):
    indices = top_n(make_kernel(ubm, EStepOptions("float64")), frames[:2000], 12, 512)
    sel = plan(indices, ubm.n_components, block_size)
    np.testing.assert_array_equal(np.sort(sel.order), np.arange(2000))
    assert np.all(np.diff(sel.block_starts) <= block_size)
    assert np.all(np.diff(sel.block_starts) > 0)
    np.testing.assert_array_equal(sel.indices(), indices)
    assert sel.n_select == 12 and sel.n_frames == 2000
    assert 12 <= sel.mean_union <= ubm.n_components


def restricted_reference(model: GMM, frames: np.ndarray, indices: np.ndarray):
    """Posteriors over each frame's selected Gaussians only, by brute force in float64."""
    ll = component_ll(model, frames)
    chosen = np.take_along_axis(ll, indices, axis=1)
    frame_ll = logsumexp(chosen, axis=1)
    resp = np.zeros_like(ll)
    np.put_along_axis(resp, indices, np.exp(chosen - frame_ll[:, None]), axis=1)
    x = frames.astype(np.float64)
    return {"zeroth": resp.sum(0), "first": resp.T @ x, "second": resp.T @ x**2}, frame_ll.sum()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("n_select", "block_size"), [(1, 128), (5, 7), (30, 128), (30, 1024)])
def test_selected_statistics_match_brute_force(ubm, frames, dtype, n_select, block_size):
    kernel = make_kernel(ubm, EStepOptions(dtype))
    sel = select(kernel, frames, n_select, chunk_size=600, block_size=block_size)
    stats, _ = accumulate_selected(kernel, frames[sel.order], sel)
    ref, ref_ll = restricted_reference(ubm, frames, sel.indices())
    rtol = 1e-10 if dtype == "float64" else 2e-6
    for name, want in ref.items():
        got = getattr(stats, name).reshape(len(want), -1)
        want = want.reshape(len(want), -1)
        used = np.linalg.norm(want, axis=1) > 0
        err = np.linalg.norm(got - want, axis=1)[used] / np.linalg.norm(want, axis=1)[used]
        assert err.max() < rtol, (name, err.max())
        assert np.all(got[~used] == 0)
    assert stats.frames == len(frames)
    np.testing.assert_allclose(stats.loglike, ref_ll, rtol=1e-10 if dtype == "float64" else 1e-7)


def test_selecting_every_gaussian_is_the_exact_e_step(ubm, frames):
    kernel = make_kernel(ubm, EStepOptions("float64"))
    sel = select(kernel, frames, ubm.n_components)
    stats, _ = accumulate_selected(kernel, frames[sel.order], sel)
    exact = accumulate(ubm, frames, EStepOptions("float64"))
    for name in ("zeroth", "first", "second"):
        np.testing.assert_allclose(getattr(stats, name), getattr(exact, name), rtol=1e-11)
    np.testing.assert_allclose(stats.loglike, exact.loglike, rtol=1e-13)


def test_selection_of_other_frames_is_refused(ubm, frames):
    kernel = make_kernel(ubm, EStepOptions("float64"))
    sel = select(kernel, frames[:100], 5)
    with pytest.raises(ValueError, match="does not fit"):
        accumulate_selected(kernel, frames[:99], sel)


# -- training ---------------------------------------------------------------------------

CFG = dict(num_gauss=32, covariance_type="diag", init="kmeans", kmeans_iters=3, num_iters=5,
           global_mode=True, nj=4)


def run(tmp_path: Path, name: str, data_dir=None, **options) -> tuple[dict, Path]:
    data = load_data_dir(data_dir or emdist.digits_dir("train"), require_labels=False)
    exp = tmp_path / name
    models = train(data, TrainConfig(**{**CFG, **options}), SerialBackend(), ExpDir(exp))
    return models, exp


def test_gselect_training_stays_close_to_exact_em(tmp_path):
    exact, exp_x = run(tmp_path, "exact")
    chosen, exp_g = run(tmp_path, "gselect", gselect=8)
    test = load_data_dir(emdist.digits_dir("test"), require_labels=False)
    test_frames = np.concatenate([load_feats(u.rxfilename) for u in test.utts])
    ll_exact = exact["global"].log_likelihood(test_frames).mean()
    ll_sel = chosen["global"].log_likelihood(test_frames).mean()
    print(f"test log-likelihood per frame: exact {ll_exact:.4f}, gselect 8/32 {ll_sel:.4f}")
    assert abs(ll_sel - ll_exact) < 0.05
    records = [json.loads(line) for line in (exp_g / "metrics.jsonl").read_text().splitlines()]
    lls = [r["loglike_per_frame"] for r in records]
    assert lls == sorted(lls)  # EM over fixed selections never decreases its objective
    assert "gselect: 8 of 32" in (exp_g / "log" / "acc.1.1.log").read_text()


def test_gselect_of_every_gaussian_is_exact_em(tmp_path):
    _, exp_x = run(tmp_path, "exact")
    _, exp_k = run(tmp_path, "all", gselect=32)
    assert (exp_x / "final.mdl").read_bytes() == (exp_k / "final.mdl").read_bytes()


def test_gselect_run_resumes_to_the_same_bytes(tmp_path):
    _, exp = run(tmp_path, "full", gselect=6)
    final = (exp / "final.mdl").read_bytes()
    data = load_data_dir(emdist.digits_dir("train"), require_labels=False)
    train(data, TrainConfig(**CFG, gselect=6), SerialBackend(), ExpDir(exp), stage=2)
    assert (exp / "final.mdl").read_bytes() == final


def test_starved_gaussians_are_kept_until_the_last_iteration():
    cfg = TrainConfig(**CFG, gselect=8)
    assert not _mstep_options(cfg, 0).remove_low_count_gaussians
    assert not _mstep_options(cfg, cfg.num_iters - 2).remove_low_count_gaussians
    assert _mstep_options(cfg, cfg.num_iters - 1).remove_low_count_gaussians
    assert _mstep_options(TrainConfig(**CFG), 0).remove_low_count_gaussians


def test_gselect_needs_a_global_model():
    with pytest.raises(UserError, match="--global"):
        TrainConfig(num_gauss=8, gselect=4)


def write_subsampled(src: Path, out: Path, n: int) -> Path:
    """A copy of the data dir ``src`` whose features keep every n-th frame."""
    data = load_data_dir(src)
    out.mkdir()
    with kaldiio.WriteHelper(f"ark,scp:{out / 'feats.ark'},{out / 'feats.scp'}") as writer:
        for u in data.utts:
            writer(u.utt_id, load_feats(u.rxfilename)[::n])
    (out / "text").write_text((src / "text").read_text())
    return out


def test_subsample_is_training_on_the_kept_frames(tmp_path):
    sub = write_subsampled(emdist.digits_dir("train"), tmp_path / "sub3", 3)
    _, exp_a = run(tmp_path, "flag", subsample=3)
    _, exp_b = run(tmp_path, "data", data_dir=sub)
    assert (exp_a / "final.mdl").read_bytes() == (exp_b / "final.mdl").read_bytes()
    frames = json.loads((exp_a / "metrics.jsonl").read_text().splitlines()[0])["frames"]
    full = load_data_dir(emdist.digits_dir("train")).utts
    assert frames == sum(u.num_frames for u in load_data_dir(sub).utts)
    assert frames == sum(-(-u.num_frames // 3) for u in full) < 18593 / 2
