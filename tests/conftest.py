"""Fixtures shared by several test modules; a module opts in by name (none is autouse here)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import emdist
from emdist.data.datadir import load_feats


@pytest.fixture(scope="module")
def one_blas_thread():
    """As emdist's backends do: one BLAS thread (much faster on a loaded 2-core runner).
    Modules that compute in process use it with
    ``pytestmark = pytest.mark.usefixtures("one_blas_thread")``."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def digits_frames() -> np.ndarray:
    """All 18,593 frames of the bundled digits train set (real 39-dim MFCC), float32, in
    feats.scp order."""
    data = emdist.load_data_dir(emdist.digits_dir("train"))
    return np.concatenate([load_feats(u.rxfilename) for u in data.utts])


@pytest.fixture
def restore_logging():
    """The CLI points emdist's loggers at the runner's (then closed) stderr: undo it."""
    saved = [
        (lg, lg.handlers[:], lg.level, lg.propagate)
        for lg in map(logging.getLogger, ("emdist", "py.warnings"))
    ]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    logging.captureWarnings(False)


@pytest.fixture
def procs(tmp_path):
    """Subprocesses started by a test, each in its own session, ended with the test
    (:class:`helpers.Processes`)."""
    from helpers import Processes

    logdir = tmp_path / "logs"
    logdir.mkdir()
    ps = Processes(logdir)
    try:
        yield ps
    finally:
        ps.close()
