"""The EM driver: configuration (``config``), passes over the shards with a backend and the
exp dir (``trainer``), the training loop (``driver``), and one iteration in Kaldi's pieces
for recipes that run them as their own jobs (``steps``). The engine talks to backends
through :class:`emdist.backends.base.Backend`."""

from emdist.engine.config import IterationRecord, TrainConfig
from emdist.engine.driver import (
    ConvergenceMonitor,
    KaldiFiles,
    LikelihoodDecreaseWarning,
    make_shards,
    train,
)

__all__ = [
    "ConvergenceMonitor",
    "IterationRecord",
    "KaldiFiles",
    "LikelihoodDecreaseWarning",
    "TrainConfig",
    "make_shards",
    "train",
]
