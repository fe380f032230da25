"""A disk that fills up during a run, for real (issue 12, point 3): a small tmpfs mounted for
the test (skipped with the reason where mounting is refused). The run ends with exit 1 and
one line that names the file emdist was writing, says which model is the last complete one
and that it is intact, and how to continue; nothing half-written stays behind."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import digits_subset
from typer.testing import CliRunner

import emdist.cli as cli
from emdist.io.modelio import load_models

pytestmark = pytest.mark.usefixtures("restore_logging")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    flags = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", flags, "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10,
                       check=False)


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` but for about ``leave`` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def _no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    return digits_subset(tmp_path_factory.mktemp("digits") / "train", "train", per_label=10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("what", "options", "leave", "pattern"), [
    # 16 diagonal Gaussians a word, models of about 110 kB: a model is the write that fails
    ("model", ["--cov", "diag", "--num-gauss", "16", "--num-iters", "30"], 700_000,
     r"\d+\.mdl"),
    # one-Gaussian diagonal models and 40 jobs a pass: a job log is the write that fails
    ("log", ["--cov", "diag", "--num-gauss", "1", "--num-iters", "30", "--nj", "40"], 400_000,
     r"log/"),
])
def test_a_disk_that_fills_up_during_training(train_dir, tmp_path, what, options, leave,
                                              pattern):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        _fill(disk, leave)
        exp = disk / "exp"
        result = invoke("train", train_dir, exp, "--workers", "0", "-q", *options)
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
        line = lines[0]
        assert line.startswith(f"emdist: error: cannot write {exp}/"), line
        assert "No space left on device" in line
        written = re.search(r"cannot write (\S+): ", line).group(1)
        assert re.search(pattern, written), f"{what}: {line}"
        kept = re.search(r"the last complete model, (\S+), is intact", line)
        assert kept, line
        assert "rerun the same command" in line
        models = sorted(exp.glob("[0-9]*.mdl"), key=lambda p: int(p.stem))
        assert Path(kept.group(1)) == models[-1]
        assert load_models(models[-1])  # intact
        assert not (exp / "final.mdl").exists()
        assert _no_temporaries(disk)


@pytest.mark.timeout(120)
def test_a_disk_that_is_full_when_test_writes_its_results(train_dir, tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        exp = disk / "exp"
        trained = invoke("train", train_dir, exp, "--workers", "0", "--cov", "diag",
                         "--num-gauss", "1", "--num-iters", "1", "-q")
        assert trained.exit_code == 0, trained.output
        before = {p: p.read_bytes() for p in exp.glob("*.mdl")}
        _fill(disk, 0)
        result = invoke("test", exp, train_dir, "--workers", "0", "-q")
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert re.match(rf"emdist: error: cannot write {exp}/decode_train/results\.json: "
                        r"No space left on device; the models are untouched", lines[0])
        assert {p: p.read_bytes() for p in exp.glob("*.mdl")} == before
        assert not (exp / "decode_train" / "results.json").exists()
        assert _no_temporaries(disk)


@pytest.mark.timeout(60)
def test_a_read_only_file_system_is_named(train_dir, tmp_path):
    with tmpfs(tmp_path / "disk", "1m", read_only=True) as disk:
        result = invoke("train", train_dir, disk / "exp", "--workers", "0", "-q")
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
        assert re.match(rf"emdist: error: cannot write {disk}/exp: Read-only file system; "
                        "no model was written yet", lines[0]), lines[0]


@pytest.mark.timeout(120)
def test_a_data_dir_on_a_mount_that_vanishes_mid_run(tmp_path):
    """The features' file system goes away during training (streamed passes): the run ends
    with one line naming the ark it could not read and the last complete model, intact."""
    import kaldiio

    from emdist.corpora import digits_dir
    from emdist.data.datadir import load_data_dir

    digits = load_data_dir(digits_dir("train"))
    with tmpfs(tmp_path / "mount", "30m") as mount:
        data = mount / "train"
        data.mkdir()
        utts = digits.utts[:110]
        with kaldiio.WriteHelper(f"ark,scp:{data}/feats.ark,{data}/feats.scp") as writer:
            for u in utts:
                writer(u.utt_id, kaldiio.load_mat(u.rxfilename))
        (data / "text").write_text("".join(f"{u.utt_id} {u.label}\n" for u in utts))
        exp = tmp_path / "exp"
        proc = subprocess.Popen(
            [*_emdist(), "train", str(data), str(exp), "--workers", "0", "--feature-cache",
             "none", "--num-iters", "500", "--num-gauss", "2", "--cov", "diag", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            import time

            deadline = time.monotonic() + 60
            while not (exp / "2.mdl").exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.01)
            subprocess.run(["umount", "-l", str(mount)], check=True, timeout=10)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    errors = [line for line in err.splitlines() if line.startswith("emdist: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{data}/feats.ark" in errors[0] and "cannot read features" in errors[0]
    match = re.search(r"the last complete model, (\S+), is intact", errors[0])
    assert match, errors[0]
    load_models(match.group(1))  # it is
    assert _no_temporaries(exp)


def _emdist() -> list[str]:
    from helpers import emdist_command

    return emdist_command()
