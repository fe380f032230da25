"""Model and statistics files: round trips, documented layout, determinism, atomic writes."""

from __future__ import annotations

import json
import os
import time
import zipfile

import numpy as np
import pytest

from emdist.errors import UserError, WriteFailure
from emdist.io.modelio import load_models, load_stats, save_models, save_stats
from emdist.models.gmm import GMM
from emdist.models.stats import GmmStats


def random_gmm(rng: np.random.Generator, k: int, d: int, cov_type: str) -> GMM:
    weights = rng.dirichlet(np.ones(k))
    means = rng.normal(size=(k, d))
    if cov_type == "diag":
        cov = rng.uniform(0.1, 3.0, (k, d))
    else:
        a = rng.normal(size=(k, d, d))
        cov = a @ a.transpose(0, 2, 1) + d * np.eye(d)
    return GMM(weights, means, cov, cov_type)


def model_map(cov_type: str, seed: int = 0) -> dict[str, GMM]:
    """Several labels with different numbers of components (labels chosen to be awkward)."""
    rng = np.random.default_rng(seed)
    sizes = {"Z": 2, "1": 5, "O": 1, "oh/no": 3, "über": 4}
    return {label: random_gmm(rng, k, 6, cov_type) for label, k in sizes.items()}


def stats_map(seed: int = 0) -> dict[str, GmmStats]:
    rng = np.random.default_rng(seed)
    out = {}
    for label, (k, shape) in {"global": (4, (4, 3)), "a": (2, (2, 3, 3))}.items():
        out[label] = GmmStats(
            rng.uniform(1, 100, k),
            rng.normal(size=(k, 3)),
            rng.uniform(1, 9, shape),
            loglike=float(rng.normal() * 1e4),
            frames=int(rng.integers(1, 10**9)),
        )
    return out


def assert_same_models(got: dict[str, GMM], want: dict[str, GMM]) -> None:
    assert sorted(got) == sorted(want)
    for label, gmm in want.items():
        assert got[label].covariance_type == gmm.covariance_type
        for name in ("weights", "means", "covariances"):
            np.testing.assert_array_equal(getattr(got[label], name), getattr(gmm, name))
            assert getattr(got[label], name).dtype == np.float64


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_model_round_trip(tmp_path, cov_type):
    models = model_map(cov_type)
    save_models(tmp_path / "m.mdl", models)
    assert_same_models(load_models(tmp_path / "m.mdl"), models)
    assert_same_models(load_models(str(tmp_path / "m.mdl")), models)


def test_stats_round_trip(tmp_path):
    stats = stats_map()
    save_stats(tmp_path / "x.acc", stats)
    got = load_stats(tmp_path / "x.acc")
    assert sorted(got) == sorted(stats)
    for label, want in stats.items():
        for name in ("zeroth", "first", "second"):
            np.testing.assert_array_equal(getattr(got[label], name), getattr(want, name))
        assert got[label].loglike == want.loglike
        assert got[label].frames == want.frames


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_model_file_layout(tmp_path, cov_type):
    """Plain numpy reads the file without pickle; keys and metadata are as documented."""
    models = model_map(cov_type)
    path = tmp_path / "final.mdl"
    save_models(path, models)
    labels = sorted(models)
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        meta = json.loads(str(npz["meta"]))
        arrays = {name: npz[name] for name in npz.files if name != "meta"}
    per_label = {
        f"{i}.{name}" for i in range(len(labels)) for name in ("weights", "means", "covariances")
    }
    assert keys == {"meta"} | per_label
    assert meta["format"] == "emdist-gmm"
    assert meta["version"] == 1
    assert meta["covariance_type"] == cov_type
    assert meta["labels"] == labels
    assert meta["dim"] == 6
    assert meta["n_components"] == [models[lab].n_components for lab in labels]
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(arrays[f"{i}.means"], models[label].means)
        np.testing.assert_array_equal(arrays[f"{i}.covariances"], models[label].covariances)


def test_stats_file_layout(tmp_path):
    save_stats(tmp_path / "x.acc", stats_map())
    with np.load(tmp_path / "x.acc", allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        assert meta["format"] == "emdist-stats" and meta["version"] == 1
        assert meta["labels"] == ["a", "global"]
        assert npz["0.second"].shape == (2, 3, 3)


def test_same_model_gives_identical_bytes(tmp_path):
    models = model_map("full")
    save_models(tmp_path / "a.mdl", models)
    time.sleep(1.1)  # zip entries carry a 2-second-resolution timestamp
    save_models(tmp_path / "b.mdl", models)
    save_models(tmp_path / "c.mdl", load_models(tmp_path / "a.mdl"))
    data = (tmp_path / "a.mdl").read_bytes()
    assert data == (tmp_path / "b.mdl").read_bytes() == (tmp_path / "c.mdl").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.mdl") as zf:  # nothing from the clock inside
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_same_stats_give_identical_bytes(tmp_path):
    save_stats(tmp_path / "a.acc", stats_map())
    save_stats(tmp_path / "b.acc", stats_map())
    assert (tmp_path / "a.acc").read_bytes() == (tmp_path / "b.acc").read_bytes()


def test_writes_exactly_the_given_path(tmp_path):
    save_models(tmp_path / "x.mdl", model_map("diag"))
    save_stats(tmp_path / "0.1.acc", stats_map())
    assert sorted(os.listdir(tmp_path)) == ["0.1.acc", "x.mdl"]


@pytest.mark.parametrize("kind", ["models", "stats"])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch, kind):
    path = tmp_path / "x.mdl"
    if kind == "models":
        save, load, old, new = save_models, load_models, model_map("diag", 0), model_map("diag", 1)
    else:
        save, load, old, new = save_stats, load_stats, stats_map(0), stats_map(1)
    save(path, old)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated failure of rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteFailure, match=r"cannot write .*x\.mdl: simulated"):
        save(path, new)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.mdl"]
    assert path.read_bytes() == before
    assert sorted(load(path)) == sorted(old)


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("simulated failure of rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteFailure):
        save_models(tmp_path / "x.mdl", model_map("full"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def write_npz(path, **arrays) -> None:
    with open(path, "wb") as fh:  # a file handle: numpy adds no ".npz" suffix
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"hello, not a model\n", id="text"),
        # EMDIST BUG (reported): numpy raises EOFError on an empty file, which
        # _open_archive does not catch. Fails until fixed.
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x03\x04 truncated zip", id="truncated-zip"),
        pytest.param({"weights": np.ones(3)}, id="npz-without-meta"),
        pytest.param({"meta": np.array("not json")}, id="meta-not-json"),
        pytest.param({"meta": np.array('{"format": "other"}')}, id="other-format"),
        # EMDIST BUG (reported): a JSON meta that is not an object (here the number 1.5)
        # escapes as AttributeError instead of UserError. Fails until fixed.
        pytest.param({"meta": np.array(1.5)}, id="meta-json-scalar"),
    ],
)
def test_foreign_file_is_a_user_error_naming_the_path(tmp_path, content):
    path = tmp_path / "foreign.mdl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_npz(path, **content)
    with pytest.raises(UserError, match=str(path)):
        load_models(path)


# EMDIST BUG (reported): np.load returns an ndarray for a .npy file and _open_archive uses it
# as a context manager: TypeError instead of UserError. Fails until fixed.
def test_npy_file_is_a_user_error(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.ones(3))
    with pytest.raises(UserError, match=str(path)):
        load_models(path)


def test_stats_file_is_not_a_model(tmp_path):
    save_stats(tmp_path / "x.acc", stats_map())
    with pytest.raises(UserError, match=str(tmp_path / "x.acc")):
        load_models(tmp_path / "x.acc")
    save_models(tmp_path / "x.mdl", model_map("diag"))
    with pytest.raises(UserError, match=str(tmp_path / "x.mdl")):
        load_stats(tmp_path / "x.mdl")


@pytest.mark.parametrize("kind", ["models", "stats"])
def test_newer_format_version_is_a_user_error(tmp_path, kind):
    path = tmp_path / "new.mdl"
    (save_models if kind == "models" else save_stats)(
        path, model_map("diag") if kind == "models" else stats_map()
    )
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["version"] += 1
    arrays["meta"] = np.array(json.dumps(meta))
    write_npz(path, **arrays)
    with pytest.raises(UserError, match=f"{path}.*(?i:version)"):
        (load_models if kind == "models" else load_stats)(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nope.mdl")):
        load_models(tmp_path / "nope.mdl")


def test_atomic_writes_make_files_like_any_new_file(tmp_path):
    """Models, results and plots get mode 0666 less the umask (mkstemp's 0600 would hide
    them from the group), and no temporary file is left."""
    import os

    from emdist.io.modelio import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.mdl", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.mdl", b"y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.mdl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.mdl").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mdl", "b.mdl"]
