"""Frames that cannot be trained on (issue 12, point 1): NaN, infinite, absurd (|x| > 1e10)
and zero-frame utterances are found by the first pass, on the workers, before any EM work;
the run stops with exit 2 and one line naming the first (utterance, ark and offset), their
count and the hint, or, with --skip-bad-utts, leaves them out, lists them and trains on the
rest, unless more than --max-skip-fraction would go."""

from __future__ import annotations

import re

import kaldiio
import numpy as np
import pytest
from helpers import digits_subset
from typer.testing import CliRunner

import emdist.cli as cli
from emdist.tasks import MAX_ABS_FEATURE, frames_problem

pytestmark = pytest.mark.usefixtures("restore_logging")

FAST = ["--num-gauss", "2", "--num-iters", "1", "--nj", "4", "-q"]
BAD = {3: ("nan", "NaN"), 10: ("inf", "infinite"), 20: ("huge", "magnitude 1e+30"),
       30: ("empty", "no frames")}


def _bad_dir(root, cases=BAD):
    """A digits subset rewritten into one ark, with the utterances of ``cases`` spoilt."""
    src = digits_subset(root / "src", "train", 4)
    feats = dict(kaldiio.load_scp(str(src / "feats.scp")))
    ids = sorted(feats)
    out = root / "bad"
    out.mkdir()
    spoilt = {}
    with kaldiio.WriteHelper(f"ark,scp:{out}/feats.ark,{out}/feats.scp") as writer:
        for i, utt in enumerate(ids):
            f = np.array(feats[utt])
            if i in cases:
                kind = cases[i][0]
                if kind == "nan":
                    f[2, 1] = np.nan
                elif kind == "inf":
                    f[5, 0] = -np.inf
                elif kind == "huge":
                    f[1, 1] = 1e30
                else:
                    f = f[:0]
                spoilt[utt] = cases[i][1]
            writer(utt, f)
    (out / "text").write_text((src / "text").read_text())
    return out, spoilt


def _train(data, exp, *extra):
    return CliRunner().invoke(cli.app, ["train", str(data), str(exp), "--workers", "0",
                                        *FAST, *extra])


def test_the_bound_and_the_reasons():
    ok = np.ones((3, 2), dtype=np.float32)
    assert frames_problem(ok) is None
    assert frames_problem(ok * MAX_ABS_FEATURE) is None  # the bound itself is accepted
    assert "1 NaN" in frames_problem(np.array([[np.nan, 1.0]]))
    assert "2 infinite" in frames_problem(np.array([[np.inf, -np.inf]]))
    assert "magnitude" in frames_problem(np.array([[2 * MAX_ABS_FEATURE]]))
    assert "no frames" in frames_problem(np.zeros((0, 2)))


@pytest.mark.timeout(60)
def test_every_bad_utterance_is_reported_before_any_em_work(tmp_path):
    data, spoilt = _bad_dir(tmp_path, {k: v for k, v in BAD.items() if k != 30})
    exp = tmp_path / "exp"
    result = _train(data, exp)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("emdist: error")]
    assert len(lines) == 1
    first = sorted(spoilt)[0]
    assert "3 of 44 utterances cannot be trained on" in lines[0]
    assert re.search(rf"utterance {first} \(\S+feats\.ark:\d+\) has 1 NaN", lines[0])
    assert "--skip-bad-utts" in lines[0]
    listed = (exp / "log" / "bad_utts.txt").read_text().splitlines()
    assert [line.split()[0] for line in listed] == sorted(spoilt)  # all of them, in order
    for line in listed:
        assert spoilt[line.split()[0]] in line and ".ark:" in line.split()[1]
    assert not list(exp.glob("*.mdl")) and not list((exp / "log").glob("init.*"))


@pytest.mark.timeout(60)
def test_a_zero_frame_utterance_is_refused_at_the_data_dir(tmp_path):
    data, _ = _bad_dir(tmp_path, {30: BAD[30]})
    result = _train(data, tmp_path / "exp")
    assert result.exit_code == 2
    assert "has no frames; remove it, or train with --skip-bad-utts" in result.output


@pytest.mark.timeout(120)
def test_skip_bad_utts_trains_on_the_rest_the_same_everywhere(tmp_path):
    data, spoilt = _bad_dir(tmp_path)
    outputs = {}
    for name, extra in {"memory": ["--feature-cache", "memory"],
                        "none": ["--feature-cache", "none"]}.items():
        exp = tmp_path / name
        result = _train(data, exp, "--skip-bad-utts", *extra)
        assert result.exit_code == 0, result.output
        listed = (exp / "log" / "skipped_utts.txt").read_text().splitlines()
        assert sorted(line.split()[0] for line in listed) == sorted(spoilt)
        outputs[name] = (exp / "final.mdl").read_bytes()
        metrics = (exp / "metrics.jsonl").read_text().splitlines()
        frames = int(re.search(r'"frames": (\d+)', metrics[0]).group(1))
        kept = sum(len(f) for u, f in kaldiio.load_scp(str(data / "feats.scp")).items()
                   if u not in spoilt)
        assert frames == kept  # trained on exactly the rest
    assert outputs["memory"] == outputs["none"]


@pytest.mark.timeout(60)
def test_too_many_bad_utterances_fail_even_when_skipping(tmp_path):
    data, _ = _bad_dir(tmp_path)
    result = _train(data, tmp_path / "exp", "--skip-bad-utts", "--max-skip-fraction", "0.05")
    assert result.exit_code == 2
    assert "4 of 44 utterances cannot be trained on, more than --max-skip-fraction 0.05" \
        in result.output
    assert not list((tmp_path / "exp").glob("*.mdl"))


@pytest.mark.timeout(120)
def test_absurd_values_on_dask_workers_are_a_user_error(tmp_path):
    data, spoilt = _bad_dir(tmp_path, {20: BAD[20]})
    result = CliRunner().invoke(cli.app, ["train", str(data), str(tmp_path / "exp"),
                                          "--workers", "2", "--short-pass", "0", *FAST])
    assert result.exit_code == 2, result.output
    assert "magnitude 1e+30" in result.output and next(iter(spoilt)) in result.output
