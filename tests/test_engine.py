"""Tests of the EM driver (emdist.engine.train) with the serial backend, and of the
recognizer's results, on real Kaldi ark/scp data dirs written into tmp dirs.

What is proved: the Kaldi-style exp dir (models, final.mdl, metrics, config, job and update
logs), a per-frame log-likelihood that never decreases, reproducibility (same nj: same
bytes; other nj: close), global mode, mix-up, resume after a kill, --stage, refusal of a
run with other options, failing shards reported with their job log, and recognition results
that agree with an independent scoring.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from helpers import (
    LABELS,
    SUMMARY_RE,
    assert_models_close,
    copy_exp,
    model_bytes,
    tiny_config,
    train_tiny,
    write_data_dir,
)

from emdist.backends.serial import SerialBackend
from emdist.data.datadir import DataDir, load_data_dir
from emdist.engine import make_shards, train
from emdist.errors import EmdistError, UserError
from emdist.io.expdir import ExpDir
from emdist.io.modelio import load_models
from emdist.models.estep import EStepOptions
from emdist.models.gmm import GMM
from emdist.recognizer import evaluate

NUM_ITERS = 4
NJ = 3
METRIC_KEYS = {
    "iter",
    "loglike_per_frame",
    "frames",
    "floored",
    "removed",
    "n_components",
    "seconds",
    "loglike_by_label",
    "occupancy",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def train_dir(root) -> Path:
    return write_data_dir(root / "train", seed=0)


@pytest.fixture(scope="module")
def data(train_dir) -> DataDir:
    return load_data_dir(train_dir)


@pytest.fixture(scope="module")
def finished(root, data) -> Path:
    """An uninterrupted run of NUM_ITERS iterations (full covariances), never modified."""
    exp = root / "finished"
    train_tiny(data, exp, covariance_type="full", num_iters=NUM_ITERS, nj=NJ)
    return exp


def _finished_config():
    return tiny_config(covariance_type="full", num_iters=NUM_ITERS, nj=NJ)


def _read_metrics(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


# -- the exp dir ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_train_writes_kaldi_exp_dir(finished, data):
    exp = finished
    for i in range(NUM_ITERS + 1):
        assert (exp / f"{i}.mdl").is_file(), i
    assert not (exp / f"{NUM_ITERS + 1}.mdl").exists()
    assert model_bytes(exp, "final") == model_bytes(exp, NUM_ITERS)
    assert json.loads((exp / "config.json").read_text()) == json.loads(
        json.dumps(_finished_config().to_dict())
    )
    assert (exp / "num_jobs").read_text() == f"{NJ}\n"

    records = _read_metrics(exp)
    assert [r["iter"] for r in records] == list(range(1, NUM_ITERS + 1))
    for r in records:
        assert set(r) == METRIC_KEYS
        assert r["frames"] == data.num_frames
        assert r["n_components"] == {lab: 2 for lab in LABELS}
        assert r["floored"] >= 0 and r["removed"] == 0 and r["seconds"] >= 0

    for i in range(NUM_ITERS):
        frames_in_logs = 0
        for job in range(1, NJ + 1):
            lines = (exp / "log" / f"acc.{i}.{job}.log").read_text().splitlines()
            assert lines[-1].startswith("# Ended (code 0)"), lines[-1]
            assert any(line.startswith("# Accounting:") for line in lines)
            m = next(
                re.fullmatch(rf"# job {job}: \d+ utterances, (\d+) frames", line)
                for line in lines
                if line.startswith("# job")
            )
            frames_in_logs += int(m.group(1))
        assert frames_in_logs == data.num_frames  # the job logs describe a partition
        update = (exp / "log" / f"update.{i}.log").read_text()
        assert update.startswith(f"# m_step {i}.mdl -> {i + 1}.mdl")
        assert "# Ended (code 0)" in update
    assert not (exp / "log" / f"acc.{NUM_ITERS}.1.log").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("init", ["kmeans", "mixup"])
def test_loglike_per_frame_never_decreases(root, data, cov, init):
    exp = root / f"monotone-{cov}-{init}"
    train_tiny(data, exp, covariance_type=cov, init=init, num_gauss=3, num_iters=5)
    ll = [r["loglike_per_frame"] for r in _read_metrics(exp)]
    assert len(ll) == 5
    assert all(b >= a for a, b in itertools.pairwise(ll)), ll
    assert ll[-1] > ll[0]  # EM did something


@pytest.mark.timeout(30)
def test_returned_models_are_final_mdl(root, data):
    models = train_tiny(data, root / "returned")
    final = load_models(root / "returned" / "final.mdl")
    assert_models_close(models, final, rtol=0, atol=0)


# -- reproducibility --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_same_nj_twice_is_byte_identical(root, data):
    train_tiny(data, root / "twice-1", nj=2)
    train_tiny(data, root / "twice-2", nj=2)
    for name in ["0", "1", "2", "3", "final"]:
        assert model_bytes(root / "twice-1", name) == model_bytes(root / "twice-2", name), name


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("dtype", "rtol"), [("float64", 1e-10), ("float32", 1e-4)], ids=["float64", "float32"]
)
def test_other_nj_gives_a_close_model(root, data, dtype, rtol):
    estep = EStepOptions(dtype=dtype)
    a = train_tiny(data, root / f"nj-2-{dtype}", nj=2, estep=estep)
    b = train_tiny(data, root / f"nj-5-{dtype}", nj=5, estep=estep)
    # Shards are summed in another order and chunked otherwise: the bits may differ, not
    # the model.
    assert_models_close(a, b, rtol=rtol, atol=rtol)
    ll_a = [r["loglike_per_frame"] for r in _read_metrics(root / f"nj-2-{dtype}")]
    ll_b = [r["loglike_per_frame"] for r in _read_metrics(root / f"nj-5-{dtype}")]
    np.testing.assert_allclose(ll_a, ll_b, rtol=rtol)
    assert (root / f"nj-5-{dtype}" / "log" / "acc.0.5.log").is_file()
    assert not (root / f"nj-2-{dtype}" / "log" / "acc.0.3.log").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("init", ["kmeans", "mixup"])
def test_feature_cache_does_not_change_the_model(root, data, init):
    for cache in ["none", "memory"]:
        train_tiny(data, root / f"cache-{init}-{cache}", init=init, feature_cache=cache)
    for name in ["0", "final"]:
        assert model_bytes(root / f"cache-{init}-none", name) == model_bytes(
            root / f"cache-{init}-memory", name
        ), name


# -- modes of training --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_global_mode_trains_one_model_without_text(root):
    path = write_data_dir(root / "untranscribed", seed=3, text=False)
    data = load_data_dir(path, require_labels=False)
    assert not data.has_text
    models = train_tiny(data, root / "ubm", global_mode=True, num_gauss=3)
    assert sorted(models) == ["global"]
    assert sorted(load_models(root / "ubm" / "final.mdl")) == ["global"]
    assert models["global"].n_components == 3
    records = _read_metrics(root / "ubm")
    assert all(r["n_components"] == {"global": 3} for r in records)
    assert all(r["frames"] == data.num_frames for r in records)
    with pytest.raises(UserError, match="--global"):
        train_tiny(data, root / "words-without-text")


@pytest.mark.timeout(30)
def test_mixup_reaches_num_gauss(root, data):
    models = train_tiny(data, root / "mixup", init="mixup", num_gauss=3, mixup_iters=1)
    assert {lab: m.n_components for lab, m in models.items()} == {lab: 3 for lab in LABELS}
    initial = load_models(root / "mixup" / "0.mdl")
    assert {lab: m.n_components for lab, m in initial.items()} == {lab: 3 for lab in LABELS}
    # one Gaussian, split to 2, split to 3: init passes 1..3 with an update log after splits
    assert (root / "mixup" / "log" / "init.1.1.log").is_file()
    assert (root / "mixup" / "log" / "init.3.log").is_file()


# -- resume, stage, overwrite ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_resume_after_kill_is_byte_identical(root, data, finished):
    exp = copy_exp(finished, root / "killed")
    for name in ["3", "4", "final"]:
        (exp / f"{name}.mdl").unlink()  # killed while computing 3.mdl
    seen = []
    train(data, _finished_config(), SerialBackend(), ExpDir(exp), on_record=seen.append)
    assert [r.iter for r in seen] == [3, 4]  # resumed from 2.mdl, not from scratch
    for name in ["3", "4", "final"]:
        assert model_bytes(exp, name) == model_bytes(finished, name), name
    resumed, original = _read_metrics(exp), _read_metrics(finished)
    assert len(resumed) == len(original) == NUM_ITERS
    for got, want in zip(resumed, original, strict=True):
        assert {**got, "seconds": 0} == {**want, "seconds": 0}


@pytest.mark.timeout(30)
def test_finished_run_is_not_retrained(root, data, finished):
    exp = copy_exp(finished, root / "again")
    seen = []
    models = train(data, _finished_config(), SerialBackend(), ExpDir(exp), on_record=seen.append)
    assert seen == []
    assert_models_close(models, load_models(finished / "final.mdl"), rtol=0, atol=0)


@pytest.mark.timeout(30)
def test_stage_drops_later_models_and_recomputes_them(root, data, finished):
    exp = copy_exp(finished, root / "staged")
    seen = []
    train(data, _finished_config(), SerialBackend(), ExpDir(exp), stage=2, on_record=seen.append)
    assert [r.iter for r in seen] == [3, 4]
    for name in ["3", "4", "final"]:
        assert model_bytes(exp, name) == model_bytes(finished, name), name
    assert [r["iter"] for r in _read_metrics(exp)] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="--stage 9"):
        train(data, _finished_config(), SerialBackend(), ExpDir(exp), stage=9)


@pytest.mark.timeout(30)
def test_run_with_other_options_needs_overwrite(root, data, finished):
    exp = copy_exp(finished, root / "other-options")
    other = tiny_config(covariance_type="full", num_iters=2, nj=NJ)
    with pytest.raises(UserError, match=r"other training options \(num_iters\).*--overwrite"):
        train(data, other, SerialBackend(), ExpDir(exp))
    assert model_bytes(exp, "final") == model_bytes(finished, "final")  # untouched
    assert (exp / "4.mdl").is_file()

    train(data, other, SerialBackend(), ExpDir(exp), overwrite=True)
    assert ExpDir(exp).model_numbers() == [0, 1, 2]
    # the first two iterations of the 4-iteration run are the same computation
    assert model_bytes(exp, "final") == model_bytes(finished, 2)
    assert json.loads((exp / "config.json").read_text())["num_iters"] == 2
    assert [r["iter"] for r in _read_metrics(exp)] == [1, 2]


# -- failing shards -----------------------------------------------------------------------


def _break_utterance(data: DataDir, how: str, tmp: Path) -> tuple[DataDir, int]:
    """A copy of ``data`` in which utterance 13 cannot be read, and its 1-based job."""
    k = 13
    if how == "missing":
        utt = dataclasses.replace(data.utts[k], rxfilename=str(tmp / "missing.ark") + ":15")
        broken = dataclasses.replace(data, utts=data.utts[:k] + (utt,) + data.utts[k + 1 :])
    else:  # overwrite the matrix header at the utterance's offset, after loading the dir
        path = write_data_dir(tmp / "data", seed=0)
        broken = load_data_dir(path)
        ark, offset = broken.utts[k].rxfilename.rsplit(":", 1)
        with open(ark, "r+b") as fh:
            fh.seek(int(offset))
            fh.write(b"garbage!garbage!")
    job = next(s.job for s in make_shards(broken, NJ, False) if broken.utts[k] in s.utts)
    return broken, job


def _check_failure(exc: EmdistError, log_name: str, exp: Path) -> None:
    """One job of NJ failed; its log (``log_name``, a regular expression) says so."""
    message = str(exc)
    assert f"1 / {NJ} jobs failed" in message
    assert "log is in" in message
    log_path = Path(re.search(r"log is in (\S+?);", message).group(1))
    assert log_path.parent == exp / "log"
    assert re.fullmatch(log_name, log_path.name), log_path.name
    lines = log_path.read_text().splitlines()
    assert lines[-1].startswith("# Ended (code 1)")
    assert any(line.startswith("# Accounting:") for line in lines)
    assert "Traceback" in log_path.read_text()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["corrupt", "missing"])
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_unreadable_shard_fails_with_its_job_log(data, finished, tmp_path, how, cache):
    broken, job = _break_utterance(data, how, tmp_path)
    exp = copy_exp(finished, tmp_path / "exp")
    for name in ["1", "2", "3", "4", "final"]:
        (exp / f"{name}.mdl").unlink()  # resume from 0.mdl: the first E-step meets the shard
    with pytest.raises(EmdistError) as info:
        train(broken, _finished_config(), SerialBackend(), ExpDir(exp), feature_cache=cache)
    # the first pass reads and checks every utterance, before any EM work (issue 12)
    _check_failure(info.value, rf"check\.0\.{job}\.log", exp)
    assert not (exp / "1.mdl").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("init", ["kmeans", "mixup"])
def test_unreadable_shard_during_init_is_an_emdist_error_with_log(data, tmp_path, init):
    broken, job = _break_utterance(data, "missing", tmp_path)
    exp = tmp_path / "exp"
    with pytest.raises(EmdistError) as info:
        train(
            broken,
            tiny_config(init=init, nj=NJ),
            SerialBackend(),
            ExpDir(exp),
            feature_cache="none",
        )
    # found by the check pass that comes before the first init pass
    _check_failure(info.value, rf"check\.0\.{job}\.log", exp)
    assert not list((exp / "log").glob("init.*.log"))


# -- recognition ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_evaluate_results_agree_with_independent_scoring(root, finished):
    # short utterances (1-2 frames), so that some are misrecognised
    test = load_data_dir(write_data_dir(root / "test", seed=1, frames=(1, 3)))
    models = load_models(finished / "final.mdl")
    results = evaluate(models, test, SerialBackend(), nj=2)
    labels = sorted(LABELS)
    assert results.labels == labels
    confusion = np.asarray(results.confusion)
    assert confusion.shape == (len(labels), len(labels))
    refs = Counter(u.label for u in test.utts)
    assert confusion.sum(axis=1).tolist() == [refs[lab] for lab in labels]
    assert results.n_errors == confusion.sum() - np.trace(confusion)
    assert 0 < results.n_errors < results.n_utts == len(test.utts)  # not a trivial case
    d = results.to_dict()
    assert d["accuracy"] + d["error_rate"] == pytest.approx(1.0, abs=1e-12)
    assert d["error_rate"] == results.n_errors / results.n_utts
    assert SUMMARY_RE.match(results.summary_line())

    by_utt = {u["utt"]: u for u in results.utts}
    assert list(by_utt) == [u.utt_id for u in test.utts]
    for utt in test.utts:
        feats = np.asarray(kaldiio.load_mat(utt.rxfilename), dtype=np.float64)
        scores = {lab: float(GMM.log_likelihood(models[lab], feats).sum()) for lab in labels}
        hyp = max(labels, key=lambda lab: scores[lab])
        got = by_utt[utt.utt_id]
        assert (got["ref"], got["hyp"]) == (utt.label, hyp), utt.utt_id
        assert got["score"] == pytest.approx(scores[hyp], rel=1e-9)
        row, col = labels.index(utt.label), labels.index(hyp)
        assert confusion[row, col] >= 1
