"""scripts/cv_defaults.py: defaults are chosen by k-fold cross-validation by speaker on the
training set. Folds never share a speaker, cover every utterance once, and the script runs
end to end (its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import SCRIPTS, load_script

from emdist import digits_dir, load_data_dir

SCRIPT = SCRIPTS / "cv_defaults.py"


def _script():
    return load_script("cv_defaults")


def test_folds_split_the_digits_by_speaker():
    data = load_data_dir(digits_dir("train"))
    folds = _script().speaker_folds(data, 5, 2)
    assert sorted(len(f) for f in folds)[0] > 0
    assert sorted(u for f in folds for u in f) == sorted(u.utt_id for u in data.utts)
    speakers = [{u[:2] for u in f} for f in folds]
    for a in range(5):
        for b in range(a + 1, 5):
            assert not speakers[a] & speakers[b]
    assert sum(len(s) for s in speakers) == 93  # TI digits train: 93 speakers


@pytest.mark.timeout(120)
def test_quick_cross_validation_runs_and_ranks(tmp_path):
    out = tmp_path / "cv.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["num_gauss"] for r in rows] in ([2, 4], [4, 2])
    assert [r["cv_error"] for r in rows] == sorted(r["cv_error"] for r in rows)
    assert all(0.0 <= r["cv_error"] <= 1.0 and r["train_seconds"] > 0 for r in rows)
    assert result["utterances"] == 330 and result["folds"] == 2
    assert proc.stdout.startswith("| rank |")
