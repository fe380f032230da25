"""The EM driver: configuration (``config``), passes over the shards with a backend and the
exp dir (``trainer``) and the training loop
(``driver``). The engine talks to backends through :class:`emdist.backends.base.Backend`."""

from emdist.engine.config import IterationRecord, TrainConfig
from emdist.engine.driver import (
    ConvergenceMonitor,
    LikelihoodDecreaseWarning,
    make_shards,
    train,
)

__all__ = [
    "ConvergenceMonitor",
    "IterationRecord",
    "LikelihoodDecreaseWarning",
    "TrainConfig",
    "make_shards",
    "train",
]
