"""Models and statistics from elsewhere are checked before use (issue 12, point 5).

Through the real CLI (``emdist test`` on a copy of a trained exp dir whose ``final.mdl`` is
spoilt; ``emdist train`` resuming from a spoilt model): a truncated or corrupt file, another
format or version, a header that does not describe the arrays, NaN or infinite parameters,
weights that do not sum to one, non-positive variances, a covariance that is not positive
definite, HMM transitions that do not sum to one or go backwards, and a model of another
dimension than the data. Each ends with exit 2 and exactly one ``emdist: error:`` line that
names the model file and what is wrong, no traceback, and nothing written (no results, the
exp dir's files byte for byte as they were).

Statistics files (no command reads them yet) and the hook for Kaldi's model and accumulator
readers (issue 11) are checked through the library: ``load_stats``, ``check_stats_fit``,
``FOREIGN_READERS``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from helpers import digits_subset
from typer.testing import CliRunner

import emdist.cli as cli
from emdist.data.datadir import load_data_dir
from emdist.errors import UserError
from emdist.io import modelio
from emdist.io.modelio import (
    check_models_fit,
    check_stats_fit,
    load_models,
    load_stats,
    npz_bytes,
    save_models,
    save_stats,
)
from emdist.models.gmm import GMM
from emdist.models.hmm import HmmStats
from emdist.models.stats import GmmStats

pytestmark = pytest.mark.usefixtures("restore_logging")

FAST = ["--workers", "0", "--num-gauss", "2", "--num-iters", "1", "--nj", "2", "-q"]
KINDS = {
    "gmm": [],
    "full": ["--cov", "full"],
    "hmm": ["--model", "hmm", "--num-states", "3", "--num-gauss", "1"],
    "kmeans": ["--model", "kmeans"],
}


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Digits subsets (train, test, train cut to 13 dims) and an exp dir of each kind."""
    root = tmp_path_factory.mktemp("checks")
    train = digits_subset(root / "train", "train", 3)
    test = digits_subset(root / "test", "test", 1)
    train13 = root / "train13"
    train13.mkdir()
    scp = kaldiio.load_scp(str(train / "feats.scp"))
    feats = {u: np.asarray(m)[:, :13] for u, m in scp.items()}
    kaldiio.save_ark(str(train13 / "feats.ark"), dict(sorted(feats.items())),
                     scp=str(train13 / "feats.scp"))
    shutil.copy(train / "text", train13 / "text")
    exps = {}
    for name, extra in [*KINDS.items(), ("gmm13", [])]:
        data = train13 if name == "gmm13" else train
        result = invoke("train", data, root / f"exp_{name}", *FAST, *extra)
        assert result.exit_code == 0, result.output
        exps[name] = root / f"exp_{name}"
    return {"root": root, "train": train, "test": test, "exps": exps}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: np.array(npz[name]) for name in npz.files}


def _write(path: Path, arrays: dict) -> None:
    path.write_bytes(npz_bytes(arrays))


def _edit_meta(path: Path, **fields) -> None:
    arrays = _arrays(path)
    meta = json.loads(str(arrays["meta"]))
    meta.update(fields)
    arrays["meta"] = np.array(json.dumps(meta))
    _write(path, arrays)


def _edit_array(path: Path, name: str, edit) -> None:
    arrays = _arrays(path)
    edit(arrays[name])
    _write(path, arrays)


def _snapshot(exp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(exp)): p.read_bytes() for p in sorted(exp.rglob("*"))
            if p.is_file()}


def _assert_one_error(result, path: Path, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("emdist: error:")]
    assert len(errors) == 1, result.stderr
    assert str(path) in errors[0], errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _set(index, value):
    def edit(arr):
        arr[index] = value
    return edit


# (exp kind, how final.mdl is spoilt, fragments of the one error line)
SPOILT = {
    "truncated": ("gmm", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  ["truncated or corrupt"]),
    "truncated-hmm": ("hmm", lambda p: p.write_bytes(p.read_bytes()[:-100]),
                      ["truncated or corrupt"]),
    "flipped-bytes": ("gmm", _flip, ["truncated or corrupt"]),
    "empty": ("gmm", lambda p: p.write_bytes(b""), ["empty file"]),
    "text": ("gmm", lambda p: p.write_text("a model, honest\n"), ["not an emdist file"]),
    "kaldi-model": ("gmm", lambda p: p.write_bytes(b"\0B<TransitionModel> <Topology> "),
                    ["Kaldi"]),
    "version-99": ("gmm", lambda p: _edit_meta(p, version=99), ["version 99", "upgrade"]),
    "version-0": ("gmm", lambda p: _edit_meta(p, version=0), ["version 0"]),
    "version-text": ("gmm", lambda p: _edit_meta(p, version="1"), ["version '1'"]),
    "other-format": ("gmm", lambda p: _edit_meta(p, format="emdist-stats"),
                     ["expected a", "'emdist-stats'"]),
    "stats-file": ("gmm", lambda p: save_stats(p, {"a": GmmStats.zero(2, 39, "diag")}),
                   ["'emdist-stats'"]),
    "header-dim": ("gmm", lambda p: _edit_meta(p, dim=13), ["the header says", "(dim 13)"]),
    "header-labels": ("gmm", lambda p: _edit_meta(p, labels=["1", "1"]), ["'labels'"]),
    "header-cov": ("gmm", lambda p: _edit_meta(p, covariance_type="spherical"),
                   ["'covariance_type'"]),
    "missing-array": ("gmm", lambda p: _write(p, {k: v for k, v in _arrays(p).items()
                                                  if k != "3.means"}), ["3.means is missing"]),
    "nan-mean": ("gmm", lambda p: _edit_array(p, "0.means", _set((1, 5), np.nan)),
                 ["model '1'", "means hold NaN", "0.means"]),
    "inf-variance": ("gmm", lambda p: _edit_array(p, "2.covariances", _set((0, 0), np.inf)),
                     ["model '3'", "covariances hold an infinite value"]),
    "negative-variance": ("gmm", lambda p: _edit_array(p, "4.covariances", _set((1, 3), -0.5)),
                          ["model '5'", "variance of Gaussian 1 (dim 3) is not positive"]),
    "zero-variance": ("gmm", lambda p: _edit_array(p, "4.covariances", _set((0, 0), 0.0)),
                      ["model '5'", "not positive"]),
    "weights-sum": ("gmm", lambda p: _edit_array(p, "5.weights", _set(0, 0.9)),
                    ["model '6'", "weights sum to"]),
    "negative-weight": ("gmm", lambda p: _edit_array(p, "6.weights", lambda w: w.__imul__(-1)),
                        ["model '7'", "negative"]),
    "not-positive-definite": ("full", lambda p: _edit_array(
        p, "0.covariances", lambda c: c.__setitem__(0, -np.eye(c.shape[1]))),
        ["model '1'", "covariance of Gaussian 0 is not positive definite"]),
    "asymmetric-covariance": ("full", lambda p: _edit_array(p, "1.covariances",
                                                            _set((0, 0, 5), 7.0)),
                              ["model '2'", "not symmetric"]),
    "huge-mean": ("gmm", lambda p: _edit_array(p, "1.means", _set((0, 0), 1e200)),
                  ["model '2'", "out of range"]),
    "hmm-transitions-sum": ("hmm", lambda p: _edit_array(p, "0.transitions", _set((1, 1), 0.2)),
                            ["model '1'", "transitions of state 1 sum to"]),
    "hmm-transitions-back": ("hmm", lambda p: _edit_array(
        p, "2.transitions", lambda t: t.__setitem__(2, [0.5, 0.0, 0.25, 0.25])),
        ["model '3'", "transition 2 -> 0 goes back", "left-to-right"]),
    "hmm-transitions-nan": ("hmm", lambda p: _edit_array(p, "1.transitions",
                                                         _set((0, 0), np.nan)),
                            ["model '2'", "transitions hold NaN"]),
    "hmm-state-nan": ("hmm", lambda p: _edit_array(p, "0.1.means", _set((0, 2), np.nan)),
                      ["model '1' state 1", "means hold NaN", "0.1.means"]),
    "hmm-states-header": ("hmm", lambda p: _edit_meta(p, n_components=[[1, 1]] * 11),
                          ["0.transitions has shape (3, 4), the header says (2, 3)"]),
    "kmeans-nan-centre": ("kmeans", lambda p: _edit_array(p, "3.centres", _set((0, 0), np.nan)),
                          ["model '4'", "centres hold NaN"]),
}


@pytest.mark.parametrize("case", sorted(SPOILT))
def test_spoilt_model_is_refused_by_test(corpus, tmp_path, case):
    kind, spoil, fragments = SPOILT[case]
    exp = shutil.copytree(corpus["exps"][kind], tmp_path / "exp")
    spoil(exp / "final.mdl")
    before = _snapshot(exp)
    result = invoke("test", exp, corpus["test"], "--workers", "0", "-q")
    _assert_one_error(result, exp / "final.mdl", *fragments)
    assert _snapshot(exp) == before  # no results.json, no other file touched


def test_model_file_that_is_a_directory(corpus, tmp_path):
    exp = shutil.copytree(corpus["exps"]["gmm"], tmp_path / "exp")
    (exp / "final.mdl").unlink()
    (exp / "final.mdl").mkdir()
    result = invoke("test", exp, corpus["test"], "--workers", "0", "-q")
    _assert_one_error(result, exp / "final.mdl", "is a directory")


def _swap_in_13_dim_model(corpus, tmp_path) -> Path:
    exp = shutil.copytree(corpus["exps"]["gmm"], tmp_path / "exp")
    shutil.copy(corpus["exps"]["gmm13"] / "final.mdl", exp / "final.mdl")
    return exp


def test_model_of_another_dim_is_refused_by_test(corpus, tmp_path):
    exp = _swap_in_13_dim_model(corpus, tmp_path)
    before = _snapshot(exp)
    result = invoke("test", exp, corpus["test"], "--workers", "0", "-q")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("emdist: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "13" in errors[0] and "39" in errors[0], errors[0]
    assert _snapshot(exp) == before


def test_model_of_another_dim_names_the_model_file(corpus, tmp_path):
    exp = _swap_in_13_dim_model(corpus, tmp_path)
    result = invoke("test", exp, corpus["test"], "--workers", "0", "-q")
    _assert_one_error(result, exp / "final.mdl", "dimension 13", "dimension 39")


# -- resuming a run: emdist train on an exp dir holding a spoilt model --------------------


def test_resume_from_truncated_model(corpus, tmp_path):
    exp = shutil.copytree(corpus["exps"]["gmm"], tmp_path / "exp")
    (exp / "final.mdl").unlink()  # an unfinished run: it resumes from its last model
    path = exp / "1.mdl"
    path.write_bytes(path.read_bytes()[:-64])
    before = _snapshot(exp)
    result = invoke("train", corpus["train"], exp, *FAST)
    _assert_one_error(result, path, "truncated or corrupt")
    assert _snapshot(exp) == before


def test_resume_from_model_with_nan(corpus, tmp_path):
    exp = shutil.copytree(corpus["exps"]["hmm"], tmp_path / "exp")
    (exp / "final.mdl").unlink()
    _edit_array(exp / "1.mdl", "4.2.covariances", _set((0, 7), np.nan))
    before = _snapshot(exp)
    result = invoke("train", corpus["train"], exp, *FAST, *KINDS["hmm"])
    _assert_one_error(result, exp / "1.mdl", "model '5' state 2", "covariances hold NaN")
    assert _snapshot(exp) == before


def test_stage_from_corrupt_model_loses_nothing(corpus, tmp_path):
    exp = shutil.copytree(corpus["exps"]["gmm"], tmp_path / "exp")
    _flip(exp / "0.mdl")
    before = _snapshot(exp)
    result = invoke("train", corpus["train"], exp, *FAST, "--stage", "0")
    _assert_one_error(result, exp / "0.mdl", "truncated or corrupt")
    assert _snapshot(exp) == before


def test_stage_from_model_of_another_dim(corpus, tmp_path):
    exp = shutil.copytree(corpus["exps"]["gmm"], tmp_path / "exp")
    shutil.copy(corpus["exps"]["gmm13"] / "1.mdl", exp / "1.mdl")
    result = invoke("train", corpus["train"], exp, *FAST, "--stage", "1")
    _assert_one_error(result, exp / "1.mdl", "dimension 13", "dimension 39")


# -- the check functions ----------------------------------------------------------------------


def test_check_models_fit_names_the_file_and_both_dims(corpus):
    path = corpus["exps"]["gmm13"] / "final.mdl"
    models = load_models(path)
    data = load_data_dir(corpus["test"])
    with pytest.raises(UserError) as err:
        check_models_fit(models, data, path)
    message = str(err.value)
    assert message.startswith(f"{path}: the models have dimension 13 but the features of ")
    assert "dimension 39" in message
    ok = load_models(corpus["exps"]["gmm"] / "final.mdl")
    check_models_fit(ok, data, corpus["exps"]["gmm"] / "final.mdl")
    del ok["Z"]
    with pytest.raises(UserError, match=r"no model for label 'Z'"):
        check_models_fit(ok, data, "x.mdl")


def _gmm_stats(k: int, d: int, cov: str = "diag", seed: int = 0) -> GmmStats:
    rng = np.random.default_rng(seed)
    second = rng.uniform(1, 2, (k, d) if cov == "diag" else (k, d, d))
    return GmmStats(rng.uniform(1, 9, k), rng.normal(size=(k, d)), second, -10.0, 50)


def test_stats_of_another_model_are_refused_naming_both_shapes(corpus, tmp_path):
    models = load_models(corpus["exps"]["gmm"] / "final.mdl")
    path = tmp_path / "x.acc"
    fitting = {lab: _gmm_stats(m.n_components, m.dim) for lab, m in models.items()}
    save_stats(path, fitting)
    check_stats_fit(load_stats(path), models, path)
    save_stats(path, {**fitting, "Z": _gmm_stats(4, 39)})
    with pytest.raises(UserError) as err:
        check_stats_fit(load_stats(path), models, path)
    k = models["Z"].n_components
    assert str(err.value) == (f"{path}: statistics of 'Z' have shape (4, 39) but its model has "
                              f"({k}, 39); statistics of a different model")
    save_stats(path, {"Z": _gmm_stats(k, 13)})
    with pytest.raises(UserError, match=rf"\({k}, 13\) but its model has \({k}, 39\)"):
        check_stats_fit(load_stats(path), models, path)
    save_stats(path, {"nope": _gmm_stats(k, 39)})
    with pytest.raises(UserError, match=rf"{path}: statistics of 'nope', which the models"):
        check_stats_fit(load_stats(path), models, path)


def test_stats_of_a_gmm_for_an_hmm_are_refused(corpus, tmp_path):
    hmms = load_models(corpus["exps"]["hmm"] / "final.mdl")
    path = tmp_path / "x.acc"
    save_stats(path, {"Z": _gmm_stats(hmms["Z"].n_components, 39)})
    with pytest.raises(UserError, match=rf"{path}: statistics of 'Z' are GmmStats, but the "
                       "model is a hmm model"):
        check_stats_fit(load_stats(path), hmms, path)
    s = hmms["Z"].n_states
    k = hmms["Z"].n_components
    other = HmmStats(_gmm_stats(k + 1, 39), np.ones((s + 1, s + 2)))  # one more state
    save_stats(path, {"Z": other})
    with pytest.raises(UserError, match=rf"{path}: statistics of 'Z' have shape \(\({k + 1}, "
                       rf"39\), \({s + 1}, {s + 2}\)\) but its model has \(\({k}, 39\), "
                       rf"\({s}, {s + 1}\)\)"):
        check_stats_fit(load_stats(path), hmms, path)


@pytest.mark.parametrize(
    ("spoil", "fragment"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-50]), "truncated or corrupt"),
        (lambda p: _edit_meta(p, version=7), "format version 7 is newer"),
        (lambda p: _edit_array(p, "0.first", _set((0, 0), np.nan)), "first hold NaN"),
        (lambda p: _edit_array(p, "1.zeroth", _set(0, -3.0)), "occupancy of Gaussian 0 is "
         "negative"),
        (lambda p: _edit_array(p, "0.loglike", lambda a: a.fill(np.inf)), "log-likelihood"),
        (lambda p: _write(p, {**_arrays(p), "0.second": np.ones((2, 5))}),
         "inconsistent shapes"),
        (lambda p: _write(p, {**_arrays(p), "1.frames": np.ones(3)}), "1.frames has shape (3,)"),
        (lambda p: _edit_meta(p, stats=["GmmStats"]), "unknown statistics type"),
        (lambda p: _edit_meta(p, labels=["a"]), "array 1.first belongs to no label"),
    ],
)
def test_spoilt_stats_file_is_refused(tmp_path, spoil, fragment):
    path = tmp_path / "x.acc"
    save_stats(path, {"a": _gmm_stats(2, 3), "b": _gmm_stats(3, 3, seed=1)})
    spoil(path)
    with pytest.raises(UserError) as err:
        load_stats(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_hmm_stats_round_trip_and_checks(tmp_path):
    path = tmp_path / "h.acc"
    stats = {"w": HmmStats(_gmm_stats(3, 4), np.array([[2.0, 1, 0], [0, 3, 1]]), -5.0, 9, 2, 1)}
    save_stats(path, stats)
    got = load_stats(path)["w"]
    assert (got.frames, got.utts, got.unaligned) == (9, 2, 1)
    np.testing.assert_array_equal(got.transitions, stats["w"].transitions)
    _edit_array(path, "0.transitions", _set((0, 1), -1.0))
    with pytest.raises(UserError, match=f"{path}: statistics of 'w': a transition count is "
                       "negative"):
        load_stats(path)


# -- the hook for Kaldi's readers (issue 11) --------------------------------------------------


def test_kaldi_files_go_to_their_reader(tmp_path):
    path = tmp_path / "final.mdl"
    path.write_bytes(b"<DiagGMM> <GCONSTS> [ 1 ] </DiagGMM>")
    # Kaldi's global GMMs and accumulators have readers (emdist.io.kaldi): a malformed
    # file is their error, naming it; a model given as accumulators says so
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_models(path)
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*model"):
        load_stats(path)


def test_a_registered_kaldi_reader_gets_the_same_checks(tmp_path, monkeypatch):
    path = tmp_path / "final.ubm"
    path.write_bytes(b"\0B<DiagGMM> ")
    good = GMM(np.ones(1), np.zeros((1, 2)), np.ones((1, 2)), "diag")
    bad = GMM(np.ones(1), np.full((1, 2), np.nan), np.ones((1, 2)), "diag")
    readers = {}
    monkeypatch.setattr(modelio, "FOREIGN_READERS", readers)
    readers["kaldi-model"] = lambda p: {"global": good}
    assert load_models(path)["global"] is good
    readers["kaldi-model"] = lambda p: {"global": bad}
    with pytest.raises(UserError, match=f"{path}: model 'global': means hold NaN"):
        load_models(path)

    def broken(p):
        raise ValueError("unexpected token <Foo>")

    readers["kaldi-model"] = broken
    with pytest.raises(UserError, match=f"{path}: truncated or corrupt Kaldi models "
                       r"\(unexpected token <Foo>\)"):
        load_models(path)
    readers["kaldi-stats"] = lambda p: {"global": _gmm_stats(1, 2)}
    check_stats_fit(load_stats(path), {"global": good}, path)


def test_save_and_load_round_trip_every_kind(corpus, tmp_path):
    """The checks accept every model emdist writes."""
    for name, exp in corpus["exps"].items():
        models = load_models(exp / "final.mdl")
        save_models(tmp_path / f"{name}.mdl", models)
        assert (tmp_path / f"{name}.mdl").read_bytes() == (exp / "final.mdl").read_bytes()
