"""emdist's statistics, update and mix-up against Kaldi's own GMM code.

The reference is Kaldi's C++ (``DiagGmm``, ``AccumAmDiagGmm``, ``MleDiagGmmUpdate`` through
``mle_am_diag_gmm_update`` with one pdf, ``DiagGmm::Split``), wrapped by the PyPI package
``kaldi-hmm-gmm``. Kaldi computes posteriors in single precision, so the match is measured
as ‖Δ‖/‖Kaldi‖ per statistic and per parameter, to 1e-4 (measured: about 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import KALDI_MODELS

from emdist.corpora import digits_dir
from emdist.data.datadir import load_data_dir
from emdist.io.kaldi import read_kaldi_model
from emdist.models.estep import EStepOptions
from emdist.models.gmm import GMM
from emdist.models.gmm_kind import GmmKind
from emdist.models.initialize import split
from emdist.models.mstep import MStepOptions, gmm_flags, m_step
from emdist.tasks import read_utterance

k = pytest.importorskip("kaldi_hmm_gmm", reason="kaldi-hmm-gmm (Kaldi's GMM code) is in the "
                        "test extra")

RTOL = 1e-4
FLAG_BITS = {"m": 1, "v": 2, "w": 4}


def rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


def kaldi_gmm(gmm: GMM):
    out = k.DiagGmm(gmm.n_components, gmm.dim)
    out.set_weights(gmm.weights.astype(np.float32))
    out.set_invvars_and_means((1.0 / gmm.covariances).astype(np.float32),
                              gmm.means.astype(np.float32))
    out.compute_gconsts()
    return out


def from_kaldi(kg) -> GMM:
    return GMM(np.asarray(kg.weights, dtype=np.float64), np.asarray(kg.means, dtype=np.float64),
               np.asarray(kg.vars, dtype=np.float64), "diag")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    data = load_data_dir(digits_dir("train"))
    return np.concatenate([read_utterance(u) for u in data.utts])


def models() -> dict[str, GMM]:
    """The golden K=8 model Kaldi wrote, and a 12-Gaussian one split from it with a large
    perturbation (its posteriors are far from the 8-Gaussian ones)."""
    base = read_kaldi_model(KALDI_MODELS / "diag_digits_k8.kaldi.txt")
    return {"k8": base, "k12": split(base, 12, 0.5, np.random.default_rng(1))}


def kaldi_accumulate(gmm: GMM, frames: np.ndarray, flags: int = 7):
    """Kaldi's accumulation, one frame at a time as gmm-global-acc-stats does."""
    am = k.AmDiagGmm()
    am.add_pdf(kaldi_gmm(gmm))
    acc = k.AccumAmDiagGmm()
    acc.init(am, flags)
    for x in frames.astype(np.float32):
        acc.accumulate_for_gmm(am, x, 0, 1.0)
    return am, acc


@pytest.fixture(scope="module")
def accumulated(frames):
    """For each model: emdist's statistics (the train E-step: float32 products, float64
    sums) and Kaldi's AmDiagGmm with its accumulator."""
    out = {}
    for name, gmm in models().items():
        ours = GmmKind().accumulate({name: gmm}, [(name, frames)],
                                    EStepOptions(dtype="float32"))[name]
        out[name] = gmm, ours, kaldi_accumulate(gmm, frames)
    return out


@pytest.mark.parametrize("name", ["k8", "k12"])
def test_statistics_match_kaldi(accumulated, name):
    _, ours, (_, acc) = accumulated[name]
    kaldi = acc.get_acc(0)
    errors = {"zeroth": rel(ours.zeroth, kaldi.occupancy),
              "first": rel(ours.first, kaldi.mean_accumulator),
              "second": rel(ours.second, kaldi.variance_accumulator)}
    print(f"{name}: statistics ‖Δ‖/‖Kaldi‖ {errors}")
    assert max(errors.values()) < RTOL, errors
    # Kaldi's log-likelihood total (float32 per frame) against emdist's
    assert ours.loglike == pytest.approx(acc.tot_log_like, rel=1e-6)


def kaldi_update(gmm: GMM, frames: np.ndarray, opts: dict, flags: str = "mvw") -> GMM:
    """Kaldi's update of ``gmm`` from its statistics over ``frames`` (accumulated afresh:
    the update changes the AmDiagGmm in place)."""
    am, acc = kaldi_accumulate(gmm, frames)
    bits = sum(FLAG_BITS[c] for c in gmm_flags(flags))
    k.mle_am_diag_gmm_update(k.MleDiagGmmOptions(**opts), acc, bits, am)
    return from_kaldi(am.get_pdf(0))

UPDATES = {
    "defaults": {},
    "floored": {"min_variance": 0.5, "min_gaussian_occupancy": 3000.0},
    "kept-starved": {"min_gaussian_occupancy": 3000.0, "remove_low_count_gaussians": False},
    "min-weight": {"min_gaussian_weight": 0.1},
}


@pytest.mark.parametrize("name", ["k8", "k12"])
@pytest.mark.parametrize("case", sorted(UPDATES))
def test_update_matches_kaldi(accumulated, frames, name, case):
    gmm, ours, _ = accumulated[name]
    opts = UPDATES[case]
    expected = kaldi_update(gmm, frames, opts)
    model, report = m_step(ours, MStepOptions(**opts), previous=gmm)
    assert model.n_components == expected.n_components, report
    if case == "floored":
        assert report.removed and (report.floored_elements > 0 or name == "k12")
    if case == "kept-starved":
        assert report.not_updated and not report.removed
    errors = {p: rel(getattr(model, p), getattr(expected, p))
              for p in ("weights", "means", "covariances")}
    print(f"{name} {case}: parameters ‖Δ‖/‖Kaldi‖ {errors}")
    assert max(errors.values()) < RTOL, errors


@pytest.mark.parametrize("flags", ["m", "v", "w", "mv", "mw", "vw", "mvw"])
def test_update_flags_match_kaldi(accumulated, frames, flags):
    """Only what the flags name is updated; variances without means are centred on the old
    means (Kaldi's MleDiagGmmUpdate)."""
    gmm, ours, _ = accumulated["k12"]
    expected = kaldi_update(gmm, frames, {}, flags)
    model, _ = m_step(ours, MStepOptions(update_flags=flags), previous=gmm)
    for p, letter in (("weights", "w"), ("means", "m"), ("covariances", "v")):
        if letter not in flags:
            assert np.array_equal(getattr(model, p), getattr(gmm, p)), p
        assert rel(getattr(model, p), getattr(expected, p)) < RTOL, (p, flags)


def test_update_flags_spelling():
    assert gmm_flags("wvm") == "mvw" == gmm_flags("a") == gmm_flags("mvwt")
    assert gmm_flags("vm") == "mv"
    with pytest.raises(Exception, match="invalid letter 'x'"):
        MStepOptions(update_flags="mx")


@pytest.mark.parametrize("target", [9, 12, 16, 21])
def test_mix_up_splits_what_kaldi_splits(accumulated, frames, target):
    """With no perturbation: the same components split, in the same order, to the same
    weights, means and variances (Kaldi's history says which component split)."""
    model = kaldi_update(accumulated["k8"][0], frames, {})  # unequal weights, as updated
    kg = kaldi_gmm(model)
    history = list(kg.split(target, 0.0))
    ours = split(model, target, 0.0, np.random.default_rng(0))
    kaldi = from_kaldi(kg)
    assert len(history) == target - model.n_components
    # a new component j copies the one split at step j
    for j, c in enumerate(history):
        assert np.array_equal(ours.means[model.n_components + j], ours.means[c])
    for p in ("weights", "means", "covariances"):
        assert rel(getattr(ours, p), getattr(kaldi, p)) < 1e-6, p
