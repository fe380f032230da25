"""Small shared helpers for the engine, Dask backend and CLI tests.

Synthetic Kaldi data dirs (real ``feats.ark``/``feats.scp`` written with kaldiio), subsets of
the bundled digits corpus, and a tiny training configuration that runs in a fraction of a
second, so the tests can afford to train several times.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import kaldiio
import numpy as np

from emdist.backends.serial import SerialBackend
from emdist.corpora import digits_dir
from emdist.data.datadir import DataDir
from emdist.engine import TrainConfig, train
from emdist.io.expdir import ExpDir
from emdist.models.gmm import GMM

LABELS = ("a", "b", "c")

KALDI_MODELS = Path(__file__).resolve().parent / "data" / "kaldi-models"
"""Golden files written by Kaldi's own binaries (a copy of ``shared/data/kaldi-models``,
with its README saying which binary wrote each file)."""
DIM = 4
SUMMARY_RE = re.compile(r"^%ERR \d+\.\d\d \[ \d+ / \d+ \]$")


def write_data_dir(
    path: Path,
    *,
    seed: int = 0,
    utts_per_label: int = 10,
    labels: Sequence[str] = LABELS,
    dim: int = DIM,
    text: bool = True,
    spread: float = 1.5,
    frames: tuple[int, int] = (60, 100),
) -> Path:
    """Write a labelled Kaldi data dir of synthetic features into ``path`` and return it.

    Each label's frames come from its own 2-component Gaussian mixture (the mixtures depend
    only on the label, so dirs written with different ``seed`` share them: a train and a
    test set). ``spread`` scales the distance between the labels' means; utterances have
    ``frames[0]`` to ``frames[1] - 1`` frames (short ones are sometimes misrecognised).
    """
    rng = np.random.default_rng(seed)
    centres = {
        lab: np.random.default_rng(1000 + i).normal(0.0, spread, (2, dim))
        for i, lab in enumerate(labels)
    }
    mats: dict[str, np.ndarray] = {}
    refs: dict[str, str] = {}
    for i in range(utts_per_label):
        for lab in labels:
            n = int(rng.integers(*frames))
            comp = rng.integers(0, 2, n)
            utt_id = f"spk{i:02d}-{lab}"
            mats[utt_id] = (centres[lab][comp] + rng.normal(size=(n, dim))).astype(np.float32)
            refs[utt_id] = lab
    path.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(mats.items()))  # Kaldi tables are sorted by utterance id
    kaldiio.save_ark(str(path / "feats.ark"), ordered, scp=str(path / "feats.scp"))
    if text:
        (path / "text").write_text("".join(f"{u} {refs[u]}\n" for u in ordered))
    return path


def digits_subset(path: Path, split: str, per_label: int) -> Path:
    """A data dir of the first ``per_label`` utterances of each digit of the bundled corpus.

    ``feats.scp`` points at the bundled ark with absolute paths; ids stay sorted.
    """
    src = digits_dir(split)
    labels = dict(line.split() for line in (src / "text").read_text().splitlines())
    counts: dict[str, int] = {}
    scp_lines, text_lines = [], []
    for line in (src / "feats.scp").read_text().splitlines():
        utt_id, rx = line.split()
        lab = labels[utt_id]
        if counts.get(lab, 0) >= per_label:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        ark, offset = rx.rsplit(":", 1)
        scp_lines.append(f"{utt_id} {(src.parent / ark).resolve()}:{offset}\n")
        text_lines.append(f"{utt_id} {lab}\n")
    path.mkdir(parents=True, exist_ok=True)
    (path / "feats.scp").write_text("".join(scp_lines))
    (path / "text").write_text("".join(text_lines))
    return path


def tiny_config(**overrides) -> TrainConfig:
    """A configuration small enough to train in well under a second on a synthetic dir."""
    options = dict(
        num_gauss=2,
        covariance_type="diag",
        num_iters=3,
        init="kmeans",
        kmeans_iters=2,
        nj=3,
        seed=0,
    )
    options.update(overrides)
    return TrainConfig(**options)


def train_tiny(
    data: DataDir, exp_dir: Path, backend=None, feature_cache: str = "auto", **overrides
) -> dict[str, GMM]:
    """Train ``tiny_config(**overrides)`` into ``exp_dir`` (serial unless a backend is given)."""
    return train(
        data,
        tiny_config(**overrides),
        backend or SerialBackend(),
        ExpDir(exp_dir),
        feature_cache=feature_cache,
    )


def copy_exp(src: Path, dst: Path) -> Path:
    """A copy of a finished exp dir, to resume or restart without touching the original."""
    shutil.copytree(src, dst)
    return dst


def model_bytes(exp_dir: Path, name: str | int = "final") -> bytes:
    return (Path(exp_dir) / f"{name}.mdl").read_bytes()


def emdist_command() -> list[str]:
    """The ``emdist`` console script next to this interpreter (or ``python -m emdist.cli``)."""
    script = shutil.which("emdist", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "emdist.cli"]


def assert_models_close(a: dict[str, GMM], b: dict[str, GMM], rtol: float, atol: float):
    assert sorted(a) == sorted(b)
    for label in a:
        assert a[label].n_components == b[label].n_components, label
        for name in ("weights", "means", "covariances"):
            np.testing.assert_allclose(
                getattr(a[label], name),
                getattr(b[label], name),
                rtol=rtol,
                atol=atol,
                err_msg=f"{label}.{name}",
            )


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """A script of ``scripts/`` imported as a module (``name`` without ``.py``)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Processes:
    """Subprocesses in their own sessions; close() ends each whole group."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self.extra_pgids: list[int] = []

    def start(self, cmd, name: str, env=None, cwd=None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed by the OS)
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True,
        )
        log.close()
        proc.name = name
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{self.log(p.name)[-3000:]}" for p in self.procs)

    def close(self) -> None:
        pgids = [p.pid for p in self.procs] + self.extra_pgids
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for pgid in pgids:
                try:
                    os.killpg(pgid, sig)
                    alive.append(pgid)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            for p in self.procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            while alive and time.monotonic() < deadline:
                alive = [g for g in alive if group_alive(g)]
                time.sleep(0.1)
            if not alive:
                break


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_driver_after(train_args: Sequence, exp: Path, model: str = "3.mdl",
                      timeout: float = 120) -> None:
    """Start ``emdist train *train_args`` (writing ``exp``) in its own session and SIGKILL
    it, driver and all, as soon as ``exp/model`` exists; fails if the run got to its end
    first."""
    proc = subprocess.Popen([*emdist_command(), *map(str, train_args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (exp / model).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert (exp / model).exists() and not (exp / "final.mdl").exists(), "kill came too late"


def one_line_error(result, *words):
    """A CLI run (``CliRunner`` result) that failed with one line of output, emdist's,
    holding each of ``words``, and no traceback."""
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("emdist"), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output


def read_fails_in_one_line(reader, path: Path, data: bytes, what: str = "") -> str:
    """Write ``data`` to ``path``; ``reader(path)`` must raise a one-line UserError naming
    ``path``. Returns its message."""
    import pytest

    from emdist.errors import UserError

    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message, what
    assert "\n" not in message, what
    return message


def corrupt_and_read(reader, sources: Sequence[bytes], path: Path, rng, times: int) -> None:
    """Write ``times`` copies of random ``sources`` with 1-3 random bytes changed to ``path``
    and read each with ``reader``: it succeeds (with emdist's one-line warnings naming
    ``path``, if any) or raises a one-line UserError naming ``path``, never another
    exception."""
    from emdist.errors import EmdistWarning, UserError

    for _ in range(times):
        data = bytearray(sources[rng.integers(len(sources))])
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] = rng.integers(256)
        path.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmdistWarning)
            try:
                reader(path)
            except UserError as exc:
                assert str(path) in str(exc) and "\n" not in str(exc)
        for w in caught:
            assert issubclass(w.category, EmdistWarning), w
            assert str(path) in str(w.message) and "\n" not in str(w.message), w
