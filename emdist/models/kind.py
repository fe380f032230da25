"""The model-kind protocol: what the engine, the tasks, the model files and the recognizer
know about a model, and nothing more.

Every kind of model emdist trains is EM (or its hard-assignment case) over additive
statistics: accumulate on the workers, add in shard order, update on the driver. A kind
says how, for its model type::

    stats   = kind.accumulate(models, pieces, options, hard)   # per shard, on a worker
    total   = stats_a + stats_b                                # additive float64 values
    model, report = kind.update(total, mstep_options, previous)  # on the driver
    scores  = kind.score(models, utterances, options)          # recognition
    models  = kind.initialize(passes, labels, config)          # its initialisation passes
    meta, arrays = kind.to_file(models); kind.from_file(...)   # its model file
    kind.file_layout(meta)                                     # the arrays it must hold

Kinds registered here: ``gmm`` (:mod:`emdist.models.gmm_kind`, the default), ``hmm``
(left-to-right GMM-HMM word models by Baum-Welch, :mod:`emdist.models.hmm_kind`) and
``kmeans`` (vector-quantisation codebooks, :mod:`emdist.models.vq`). A model names its kind
in its class attribute ``kind``.

The initialisation passes run through a :class:`Passes` object that the engine provides
(so that this layer never imports the engine): a pass over the data is
``passes.e_pass(models, stage, i)``, wherever the shards are.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from emdist.errors import UserError

KIND_MODULES = {
    "gmm": "emdist.models.gmm_kind",
    "hmm": "emdist.models.hmm_kind",
    "kmeans": "emdist.models.vq",
}
"""Kind name -> module defining ``KIND`` (imported on first use)."""

MODEL_KINDS = tuple(KIND_MODULES)

FILE_FORMATS = {"emdist-gmm": "gmm", "emdist-hmm": "hmm", "emdist-vq": "kmeans"}
"""A model file's format -> its kind."""

STATS_TYPES = {"GmmStats": "gmm", "HmmStats": "hmm"}
"""A statistics class's name -> a kind using it (k-means codebooks use GMM statistics)."""

Pieces = Iterable[tuple[str, np.ndarray]]
"""(label, frames) pieces of a shard in order: one per utterance for a kind whose
``per_utterance`` is true, else possibly several utterances of one label at once."""


class Stats(Protocol):
    """Additive float64 statistics: ``a + b``, a frame count and a total log-likelihood
    (the objective EM increases; minus the distortion for k-means)."""

    frames: int
    loglike: float

    def __add__(self, other: Any) -> Any: ...

    @property
    def occupancy(self) -> float: ...

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]: ...


class Passes(Protocol):
    """What initialisation passes may ask of the engine (``emdist.engine.Trainer``)."""

    dim: int
    config: Any

    def e_pass(self, models: Mapping[str, Any], stage: str, i: int,
               hard: bool = False) -> dict[str, Any]: ...

    def update(self, models: Mapping[str, Any], stats: Mapping[str, Any],
               options: Any = None) -> tuple[dict, dict]: ...

    def write_update_log(self, name: str, command: str, stats: Mapping[str, Any],
                         reports: Mapping[str, Any]) -> None: ...

    def sample(self, labels: list[str]) -> dict[str, np.ndarray]: ...


class ModelKind(Protocol):
    """One kind of model: see the module docstring."""

    name: str
    file_format: str
    per_utterance: bool
    inits: tuple[str, ...]
    stats_type: type

    def accumulate(self, models: Mapping[str, Any], pieces: Pieces, options: Any,
                   hard: bool = False) -> dict[str, Stats]: ...

    def update(self, stats: Any, options: Any, previous: Any) -> tuple[Any, Any]: ...

    def score(self, models: Mapping[str, Any], utterances: Iterable[tuple[str, np.ndarray]],
              options: Any, best_path: bool = False) -> list[tuple[str, dict[str, float]]]: ...

    def initialize(self, passes: Passes, labels: list[str]) -> dict[str, Any]: ...

    def to_file(self, models: Mapping[str, Any]) -> tuple[dict, dict[str, np.ndarray]]: ...

    def file_layout(self, meta: dict) -> dict[str, tuple[str, tuple[int, ...]]]: ...

    def from_file(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]: ...


def get_kind(name: str) -> ModelKind:
    """The kind called ``name`` (``gmm``, ``hmm`` or ``kmeans``)."""
    if name not in KIND_MODULES:
        raise UserError(f"unknown model kind {name!r}; use one of {', '.join(MODEL_KINDS)}")
    return importlib.import_module(KIND_MODULES[name]).KIND


def kind_of(model: Any) -> ModelKind:
    """The kind of a model object (its class attribute ``kind``)."""
    return get_kind(type(model).kind)


def kind_of_models(models: Mapping[str, Any]) -> ModelKind:
    """The one kind of a map of models (a model file or a pass holds one kind)."""
    kinds = {type(m).kind for m in models.values()}
    if len(kinds) != 1:
        raise ValueError(f"models of several kinds together: {sorted(kinds)}")
    return get_kind(kinds.pop())


def kind_of_format(file_format: str) -> ModelKind:
    """The kind whose model files have ``file_format`` in their header."""
    return get_kind(FILE_FORMATS[file_format])


def stats_type_named(name: str) -> type | None:
    """The statistics class called ``name`` (a statistics file's header), if any."""
    kind = STATS_TYPES.get(name)
    return None if kind is None else get_kind(kind).stats_type


def update_models(models: Mapping[str, Any], stats: Mapping[str, Stats],
                  options) -> tuple[dict, dict]:
    """Every model updated by its kind from its own statistics (the M-step of a whole
    model file): the new models and each model's report, by label."""
    new, reports = {}, {}
    for label in sorted(models):
        if label not in stats:
            raise UserError(f"model {label!r} has no frames in the data")
        new[label], reports[label] = kind_of(models[label]).update(stats[label], options,
                                                                   models[label])
    return new, reports


def per_frame(stats: Mapping[str, Stats]) -> tuple[float, int]:
    """(log-likelihood per frame, frames) of a statistics map of any kind."""
    frames = sum(s.frames for s in stats.values())
    loglike = sum(s.loglike for s in stats.values())
    return loglike / max(frames, 1), frames
