"""Tests for scripts/make_corpus.py (synthetic Kaldi corpus from a known GMM)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from helpers import SCRIPTS, load_script

SCRIPT = SCRIPTS / "make_corpus.py"
mc = load_script("make_corpus")


def _make(out: Path, *extra: str) -> Path:
    assert mc.main([str(out), *extra]) == 0
    return out


def _read_table(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        key, value = line.split(" ", 1)
        rows.append((key, value))
    return rows


def _load_all(out: Path) -> tuple[list[str], np.ndarray]:
    keys, mats = [], []
    for key, mat in kaldiio.load_scp_sequential(str(out / "feats.scp")):
        keys.append(key)
        mats.append(mat)
    return keys, np.concatenate(mats)


def _mixture_moments(model: dict, cov_type: str) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(model["weights"])
    mu = np.asarray(model["means"])
    covs = np.asarray(model["covariances"])
    if cov_type == "diag":
        covs = np.stack([np.diag(c) for c in covs])
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, covs + np.einsum("ki,kj->kij", mu, mu))
    return mean, second - np.outer(mean, mean)


def _check_moments(x: np.ndarray, model: dict, cov_type: str, z: float = 5.0) -> None:
    """Sample mean/covariance within z standard errors (estimated from the data) of truth."""
    x = x.astype(np.float64)
    n = len(x)
    mean, cov = _mixture_moments(model, cov_type)
    m = x.mean(axis=0)
    assert np.all(np.abs(m - mean) <= z * np.sqrt(np.diag(cov) / n))
    xc = x - m
    prods = xc[:, :, None] * xc[:, None, :]
    s = prods.mean(axis=0)
    se = prods.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(s - cov) <= z * se + 1e-9)


def _check_components(x: np.ndarray, model: dict, cov_type: str, z: float = 5.0) -> None:
    """Classify frames by the true posterior, whiten each component with its true
    covariance and check the result is N(0, I): frequencies, means, covariances."""
    x = x.astype(np.float64)
    w = np.asarray(model["weights"])
    mu = np.asarray(model["means"])
    covs = np.asarray(model["covariances"])
    if cov_type == "diag":
        covs = np.stack([np.diag(c) for c in covs])
    chol = np.linalg.cholesky(covs)
    ys, loglik = [], []
    for k in range(len(w)):
        y = np.linalg.solve(chol[k], (x - mu[k]).T).T
        ys.append(y)
        logdet = np.log(np.diag(chol[k])).sum()
        loglik.append(np.log(w[k]) - logdet - 0.5 * (y**2).sum(1))
    comp = np.argmax(loglik, axis=0)
    n = len(x)
    freq = np.bincount(comp, minlength=len(w)) / n
    assert np.all(np.abs(freq - w) <= z * np.sqrt(w * (1 - w) / n))
    zsum, count = 0.0, 0
    for k in range(len(w)):
        y = ys[k][comp == k]
        nk = len(y)
        assert np.all(np.abs(y.mean(0)) <= z / np.sqrt(nk))
        c = y.T @ y / nk
        d = np.diag(c)
        assert np.all(np.abs(d - 1) <= z * np.sqrt(2 / nk))
        off = c - np.diag(d)
        assert np.all(np.abs(off) <= z / np.sqrt(nk))
        zsum += ((d - 1) / np.sqrt(2 / nk)).sum()
        count += len(d)
    # all whitened variances together: catches a small global scale error
    assert abs(zsum / np.sqrt(count)) <= z


@pytest.fixture(scope="module")
def diag_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "diag"
    return _make(out, "--frames", "20000", "--utts-per-ark", "20", "--seed", "3")


def test_files_exist_and_sorted(diag_corpus: Path):
    out = diag_corpus
    names = sorted(p.name for p in out.iterdir())
    assert names == ["data", "feats.scp", "truth.json", "utt2num_frames", "utt2spk"]
    arks = sorted(p.name for p in (out / "data").iterdir())
    truth = json.loads((out / "truth.json").read_text())
    assert truth["arks"] == len(arks) > 1
    assert set(arks) == {f"feats.{i}.ark" for i in range(1, len(arks) + 1)}
    for name in ("feats.scp", "utt2num_frames", "utt2spk"):
        raw = (out / name).read_bytes()
        keys = [line.split(b" ", 1)[0] for line in raw.splitlines()]
        assert keys == sorted(keys), name  # bytes sort == C locale order
        assert len(set(keys)) == len(keys) == truth["utts"]
        assert all(k.startswith(b"utt") and len(k) == len(keys[0]) for k in keys)
    assert all(k == v for k, v in _read_table(out / "utt2spk"))
    assert not list(out.glob(".*.tmp"))


def test_frames_and_shapes(diag_corpus: Path):
    out = diag_corpus
    truth = json.loads((out / "truth.json").read_text())
    u2n = {k: int(v) for k, v in _read_table(out / "utt2num_frames")}
    assert sum(u2n.values()) == 20000 == truth["frames"]
    assert all(1 <= n <= 450 for n in u2n.values())
    assert all(150 <= n for n in list(u2n.values())[:-1])
    scp = _read_table(out / "feats.scp")
    assert [k for k, _ in scp] == list(u2n)
    for key, rxfile in scp:
        path = rxfile.rsplit(":", 1)[0]
        assert os.path.isabs(path) and path.startswith(str(out / "data"))
        mat = kaldiio.load_mat(rxfile)
        assert mat.dtype == np.float32
        assert mat.shape == (u2n[key], 39)
    # the ark is binary Kaldi "FM"
    head = (out / "data" / "feats.1.ark").read_bytes()[:20]
    assert head.startswith(scp[0][0].encode() + b" \0BFM ")


def test_readable_from_other_cwd(diag_corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reader = kaldiio.load_scp(str(diag_corpus / "feats.scp"))
    assert len(reader) == json.loads((diag_corpus / "truth.json").read_text())["utts"]
    first = next(iter(reader))
    assert reader[first].shape[1] == 39


def test_diag_moments_and_weights(diag_corpus: Path):
    truth = json.loads((diag_corpus / "truth.json").read_text())
    assert truth["covariance_type"] == "diag"
    assert (truth["dim"], truth["num_gauss"], truth["seed"]) == (39, 8, 3)
    model = truth["models"]["global"]
    assert list(truth["models"]) == ["global"]
    w = np.asarray(model["weights"])
    mu = np.asarray(model["means"])
    var = np.asarray(model["covariances"])
    assert w.shape == (8,) and abs(w.sum() - 1) < 1e-12 and w.min() > 0.01
    assert mu.shape == (8, 39) and var.shape == (8, 39)
    assert var.min() >= 0.5 and var.max() <= 2.0
    _, x = _load_all(diag_corpus)
    _check_moments(x, model, "diag")
    _check_components(x, model, "diag")


def test_full_covariance(tmp_path: Path):
    out = _make(
        tmp_path / "full",
        "--frames",
        "20000",
        "--dim",
        "6",
        "--num-gauss",
        "4",
        "--cov",
        "full",
        "--frames-per-utt",
        "100",
        "--seed",
        "11",
    )
    truth = json.loads((out / "truth.json").read_text())
    assert truth["covariance_type"] == "full"
    model = truth["models"]["global"]
    covs = np.asarray(model["covariances"])
    assert covs.shape == (4, 6, 6)
    for c in covs:
        assert np.allclose(c, c.T)
        eig = np.linalg.eigvalsh(c)
        assert eig.min() > 0 and eig.max() / eig.min() <= 20
    _, x = _load_all(out)
    assert x.shape == (20000, 6)
    _check_moments(x, model, "full")
    _check_components(x, model, "full")


def test_labels_round_robin(tmp_path: Path):
    out = _make(
        tmp_path / "lab",
        "--frames",
        "20000",
        "--labels",
        "3",
        "--dim",
        "5",
        "--num-gauss",
        "3",
        "--frames-per-utt",
        "50",
        "--seed",
        "5",
    )
    truth = json.loads((out / "truth.json").read_text())
    assert list(truth["models"]) == ["w0", "w1", "w2"]
    text = _read_table(out / "text")
    assert len(text) == truth["utts"]
    assert [v for _, v in text] == [f"w{i % 3}" for i in range(len(text))]
    assert [k for k, _ in text] == [k for k, _ in _read_table(out / "feats.scp")]
    # per-label models differ, and each label's frames follow its own model
    means = [np.asarray(m["means"]) for m in truth["models"].values()]
    assert not np.allclose(means[0], means[1])
    label_of = dict(text)
    frames = {f"w{i}": [] for i in range(3)}
    for key, mat in kaldiio.load_scp_sequential(str(out / "feats.scp")):
        frames[label_of[key]].append(mat)
    for label, mats in frames.items():
        _check_moments(np.concatenate(mats), truth["models"][label], "diag")
        _check_components(np.concatenate(mats), truth["models"][label], "diag")
    # model w{i} is the same as the global model drawn with seed + i
    other = _make(
        tmp_path / "glob", "--frames", "10", "--dim", "5", "--num-gauss", "3", "--seed", "7"
    )
    g = json.loads((other / "truth.json").read_text())["models"]["global"]
    assert g == truth["models"]["w2"]


def test_same_seed_is_byte_identical(tmp_path: Path):
    args = [
        "--frames",
        "5000",
        "--dim",
        "4",
        "--utts-per-ark",
        "5",
        "--labels",
        "2",
        "--cov",
        "full",
        "--seed",
        "9",
    ]
    a = _make(tmp_path / "a", *args)
    b = _make(tmp_path / "b", *args)
    arks = sorted(p.name for p in (a / "data").iterdir())
    assert arks == sorted(p.name for p in (b / "data").iterdir())
    for name in arks:
        assert filecmp.cmp(a / "data" / name, b / "data" / name, shallow=False)
    for name in ("utt2num_frames", "utt2spk", "text", "truth.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # feats.scp only differs by the (absolute) directory
    scp_a = (a / "feats.scp").read_text().replace(str(a), "DIR")
    assert scp_a == (b / "feats.scp").read_text().replace(str(b), "DIR")
    c = _make(tmp_path / "c", *args[:-1], "10")
    assert (c / "data" / arks[0]).read_bytes() != (a / "data" / arks[0]).read_bytes()


def test_refuses_non_empty_dir(tmp_path: Path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    capsys.readouterr()
    assert mc.main([str(out), "--frames", "100"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces a previous corpus but leaves other files alone
    _make(out, "--frames", "2000", "--utts-per-ark", "2", "--overwrite")
    many = len(list((out / "data").iterdir()))
    _make(out, "--frames", "100", "--frames-per-utt", "100", "--overwrite")
    assert many > 1 and sorted(p.name for p in (out / "data").iterdir()) == ["feats.1.ark"]
    assert (out / "keep.txt").read_text() == "mine\n"
    assert sum(int(v) for _, v in _read_table(out / "utt2num_frames")) == 100


@pytest.mark.parametrize(
    "bad",
    [
        ["--frames", "0"],
        ["--frames", "10", "--dim", "0"],
        ["--frames", "10", "--cov", "spherical"],
        ["--frames", "10", "--labels", "-1"],
        ["--frames", "ten"],
        [],
    ],
)
def test_bad_options(tmp_path: Path, capsys, bad):
    capsys.readouterr()
    assert mc.main([str(tmp_path / "x"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_corpus.py: error:") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_subprocess(tmp_path: Path):
    out = tmp_path / "sub"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--frames", "3000", "--dim", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "3000 frames" in last and "arks" in last and "bytes" in last
    assert sum(int(v) for _, v in _read_table(out / "utt2num_frames")) == 3000
    res = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--frames", "3000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1
