"""One EM iteration in Kaldi's pieces: accumulate, sum, estimate; and per-frame scores.

These are the library side of ``emdist acc-stats``, ``sum-accs``, ``est``,
``get-frame-likes`` and ``gselect``, modelled on ``gmm-global-acc-stats``,
``gmm-global-sum-accs``, ``gmm-global-est``, ``gmm-global-get-frame-likes`` and
``gmm-gselect``, so that a recipe can run them as ``JOB=1:nj`` jobs of its own ``run.pl``
or ``queue.pl``:

* :func:`acc_stats` runs the same E-step as one shard of ``emdist train`` (the shard task
  :func:`emdist.tasks.acc_shard`, by the models' kind), over a data dir (each utterance to
  its label's model, or all to a one-model file) or over a Kaldi rspecifier;
* :func:`sum_stats` adds statistics files in the order given, in the tree the trainer uses
  (:func:`emdist.models.stats.tree_sum`), so two shards summed here are the trainer's sum;
* :func:`estimate` is the trainer's update (:meth:`ModelKind.update`), then Kaldi's mix-up;
* :func:`gaussian_selection` gives each frame's top-N Gaussians, which ``acc_stats`` and
  ``frame_likes`` take (``--gselect``) to compute posteriors over those only, as
  Kaldi's UBM recipes do (``sid/train_diag_ubm.sh``).

So ``acc-stats`` on the trainer's shards, ``sum-accs`` and ``est`` give the bytes of one
``emdist train`` iteration. Model and statistics files are emdist's or Kaldi's
(:mod:`emdist.io.kaldi`); every problem is a one-line :class:`UserError`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emdist.data.datadir import load_data_dir
from emdist.errors import UserError
from emdist.io.kaldi import kaldi_file_kind, read_kaldi_accs
from emdist.io.modelio import (
    check_models_fit,
    check_stats,
    check_stats_fit,
    load_models,
    load_stats,
    stats_shape,
)
from emdist.io.tables import TableWarning, read_features, read_gselect
from emdist.models.estep import EStepOptions, make_kernel
from emdist.models.gselect import accumulate_selected, plan, selected_log_likelihood, top_n
from emdist.models.initialize import split
from emdist.models.kernel import Scorer
from emdist.models.kind import kind_of_models, per_frame, update_models
from emdist.models.mstep import GMM_FLAGS, MStepOptions, UpdateReport
from emdist.models.stats import StatsMap, add_maps, tree_sum
from emdist.tasks import (
    GLOBAL_LABEL,
    BadData,
    Shard,
    acc_shard,
    frames_problem,
    one_blas_thread,
)

log = logging.getLogger("emdist")


@dataclass(frozen=True)
class ModelFile:
    """Models read from an emdist or a Kaldi model file (``kaldi``: write Kaldi back)."""

    path: Path
    models: dict
    kaldi: bool


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """An emdist model file, or a Kaldi ``<DiagGMM>``/``<FullGMM>`` file (one model,
    labelled ``global``), told apart by content."""
    path = Path(path)
    what = kaldi_file_kind(path) if path.is_file() else None
    if what == "accs":
        raise UserError(f"{path}: holds Kaldi accumulators, not a model; give the model the "
                        "statistics were accumulated with")
    return ModelFile(path, load_models(path), what == "model")


@dataclass(frozen=True)
class StatsFile:
    """Statistics read from an emdist or a Kaldi accumulator file, with the orders they
    hold as Kaldi's update flags (emdist statistics hold all: ``"mvw"``)."""

    path: Path
    stats: StatsMap
    flags: str
    kaldi: bool


def read_stats_file(path: str | os.PathLike) -> StatsFile:
    path = Path(path)
    what = kaldi_file_kind(path) if path.is_file() else None
    if what == "model":
        raise UserError(f"{path}: holds a Kaldi model, not accumulators")
    if what == "accs":
        accs = read_kaldi_accs(path)
        stats = {GLOBAL_LABEL: accs.stats}
        check_stats(stats, path)
        return StatsFile(path, stats, accs.flags, True)
    return StatsFile(path, load_stats(path), GMM_FLAGS, False)


# -- acc-stats -----------------------------------------------------------------------------


def is_rspecifier(features: str) -> bool:
    """``scp:...`` or ``ark:...`` (with Kaldi's ``,s,cs``-style options): not a data dir."""
    head = features.split(":", 1)[0]
    return ":" in features and head.split(",")[0] in ("scp", "ark")


def _data_dir_shard(models: Mapping, model_path: Path, data_dir: str) -> Shard:
    """All utterances of a data dir as one shard: each to its label's model (``text``), or
    all to the model of a one-model file."""
    labels = sorted(models)
    data = load_data_dir(data_dir, require_labels=len(labels) > 1)
    if len(labels) > 1:
        check_models_fit(models, data, model_path)
        return Shard(0, data.utts, tuple(u.label for u in data.utts))
    check_models_fit({GLOBAL_LABEL: models[labels[0]]}, data, model_path)
    return Shard(0, data.utts, tuple(labels[0] for _ in data.utts))


def _with_ids(models: Mapping, features: str) -> Iterator[tuple[str, tuple[str, np.ndarray]]]:
    """(utterance id, (label, frames)) of every utterance of an rspecifier, checked, for a
    one-model file."""
    (label, model), = models.items()
    for utt_id, feats in read_features(features):
        if feats.shape[1] != model.dim:
            raise UserError(f"{features}: utterance {utt_id} has dim {feats.shape[1]} but the "
                            f"model has dim {model.dim}")
        problem = frames_problem(feats)
        if problem is not None:
            raise UserError(f"{features}: utterance {utt_id} {problem}; fix or drop it")
        yield utt_id, (label, feats)


def acc_stats(models: ModelFile, features: str, options: EStepOptions,
              gselect: str | None = None) -> StatsMap:
    """Statistics of ``models`` over FEATURES: a Kaldi data dir or an rspecifier.

    From a data dir this is :func:`emdist.tasks.acc_shard` on one shard of all its
    utterances, the task ``emdist train`` runs per shard. An rspecifier has no labels:
    the model file must hold one model. With ``gselect`` (an rspecifier of Gaussian
    selections, :func:`emdist.io.tables.read_gselect`), the file holds one GMM and each
    frame's posteriors are over its selected Gaussians only, as with
    ``gmm-global-acc-stats --gselect``; an utterance without a selection is skipped with a
    warning, as Kaldi does.
    """
    if gselect is not None:
        return _acc_selected(models, features, options, gselect)
    if not is_rspecifier(features):
        if not Path(features).is_dir():
            raise UserError(f"{features}: no such data dir; FEATURES is a Kaldi data dir or "
                            "an rspecifier like scp:feats.scp or ark:feats.ark")
        shard = _data_dir_shard(models.models, models.path, features)
        result = acc_shard(shard, models.models, options)
        if isinstance(result, BadData):
            raise result.error
        return result[0]
    if len(models.models) != 1:
        raise UserError(f"{features}: an rspecifier has no labels, and {models.path} holds "
                        f"{len(models.models)} models; give a data dir with text, or one model")
    kind = kind_of_models(models.models)
    with one_blas_thread():
        pieces = (piece for _, piece in _with_ids(models.models, features))
        stats = kind.accumulate(models.models, pieces, options)
    if not stats:
        raise UserError(f"{features}: no utterances")
    return stats


def _acc_selected(models: ModelFile, features: str, options: EStepOptions,
                  gselect: str) -> StatsMap:
    if len(models.models) != 1:
        raise UserError(f"{models.path}: --gselect selects among one GMM's Gaussians, and the "
                        f"file holds {len(models.models)} models; give a one-model file")
    label, model = _one_gmm(models, None)
    kernel = make_kernel(model, options)
    selections = _Selections(gselect, model.n_components)
    total = None
    with one_blas_thread():
        for utt_id, feats in _utterances({label: model}, models.path, features):
            indices = selections.get(utt_id, len(feats))
            if indices is None:
                continue
            selection = plan(indices, model.n_components)
            ordered = np.asfortranarray(feats[selection.order])
            stats, _ = accumulate_selected(kernel, ordered, selection)
            total = stats if total is None else total + stats
    if total is None:
        raise UserError(f"{gselect}: selects for none of the utterances of {features}; make "
                        "the selections from these features (emdist gselect)")
    return {label: total}


class _Selections:
    """Gaussian selections by utterance, read from their table as they are asked for: in
    the features' order nothing is held (as Kaldi reads a sorted table, ``ark,s,cs:``),
    otherwise what is read past is kept until asked for."""

    def __init__(self, rspecifier: str, n_components: int) -> None:
        self.spec, self.n_components = rspecifier, n_components
        self._table: Iterator | None = read_gselect(rspecifier)
        self._ahead: dict[str, np.ndarray] = {}

    def get(self, utt_id: str, frames: int) -> np.ndarray | None:
        """The selection of ``utt_id`` (``frames`` frames), or None (with a warning)."""
        found = self._ahead.pop(utt_id, None)
        while found is None and self._table is not None:
            for key, indices in self._table:
                if key == utt_id:
                    found = indices
                    break
                self._ahead[key] = indices
            else:
                self._table = None
        if found is None:
            warnings.warn(f"{self.spec}: no selection for utterance {utt_id!r}; skipped, as "
                          "Kaldi does", TableWarning, stacklevel=3)
            return None
        if len(found) != frames:
            raise UserError(f"{self.spec}: utterance {utt_id!r} has selections for "
                            f"{len(found)} frames but {frames} frames of features; make the "
                            "selections from these features")
        if int(found.max()) >= self.n_components:
            raise UserError(f"{self.spec}: utterance {utt_id!r} selects Gaussian "
                            f"{int(found.max())}, but the model has {self.n_components} "
                            f"(0 to {self.n_components - 1}); make the selections with this "
                            "model")
        return found


def gaussian_selection(models: ModelFile, features: str, n_select: int, label: str | None,
                       options: EStepOptions) -> Iterator[tuple[str, np.ndarray]]:
    """(utterance id, each frame's ``n_select`` best Gaussians, best first) of every
    utterance of FEATURES under one GMM of the file, as ``gmm-gselect --n`` gives them."""
    if n_select < 1:
        raise UserError(f"--n {n_select}: select at least one Gaussian per frame")
    label, model = _one_gmm(models, label)
    kernel = make_kernel(model, options)
    with one_blas_thread():
        for utt_id, feats in _utterances({label: model}, models.path, features):
            yield utt_id, top_n(kernel, feats, n_select, options.chunk_size)


# -- sum-accs ------------------------------------------------------------------------------


def sum_stats(paths: Sequence[str | os.PathLike]) -> StatsFile:
    """The sum of statistics files (emdist or Kaldi, any mix), in the trainer's tree order.

    Every file must hold statistics of the same models: the same kind and, label by label,
    the same shapes. Kaldi accumulators are unlabelled: they add to the one model of the
    emdist files. The sum holds the orders (flags) every file holds.
    """
    if not paths:
        raise UserError("no statistics files to sum")
    files = [read_stats_file(p) for p in paths]
    named = [f for f in files if not f.kaldi]
    target = next(iter(named[0].stats)) if named and len(named[0].stats) == 1 else GLOBAL_LABEL
    maps = [f.stats if not f.kaldi else {target: f.stats[GLOBAL_LABEL]} for f in files]
    seen: dict[str, tuple] = {}
    for f, stats in zip(files, maps, strict=True):
        for label, s in sorted(stats.items()):
            shape = (type(s).__name__, stats_shape(s))
            ref = seen.setdefault(label, (f.path, shape))
            if ref[1] != shape:
                raise UserError(
                    f"{f.path}: statistics of {label!r} are {shape[0]} of shape {shape[1]}, "
                    f"but {ref[0]} holds {ref[1][0]} of shape {ref[1][1]}; accumulators of "
                    "another model")
    flags = "".join(c for c in GMM_FLAGS if all(c in f.flags for f in files))
    return StatsFile(Path(paths[-1]), tree_sum(maps, add_maps), flags,
                     all(f.kaldi for f in files))


# -- est -----------------------------------------------------------------------------------


def match_labels(stats: StatsFile, models: ModelFile) -> StatsMap:
    """Statistics keyed like the models: Kaldi accumulators (unlabelled, ``global``) go to
    the model of a one-model file whatever its label."""
    if len(stats.stats) == 1 == len(models.models) and set(stats.stats) != set(models.models):
        if stats.kaldi or models.kaldi:
            return {next(iter(models.models)): next(iter(stats.stats.values()))}
    return stats.stats


def estimate(models: ModelFile, stats: StatsFile, options: MStepOptions, mix_up: int = 0,
             perturb_factor: float = 0.01, seed: int = 0) -> tuple[dict, dict[str,
                                                                            UpdateReport]]:
    """The M-step of every model from its statistics (:meth:`ModelKind.update`, as the
    trainer does), then Kaldi's mix-up to ``mix_up`` Gaussians (GMMs)."""
    keyed = match_labels(stats, models)
    check_stats_fit(keyed, models.models, stats.path)
    missing = sorted(set(options.update_flags) - set(stats.flags))
    if missing:
        raise UserError(f"{stats.path}: --update-flags {options.update_flags} needs statistics "
                        f"the accumulators do not hold (their flags: {stats.flags}); "
                        "accumulate with those flags")
    without = sorted(set(models.models) - set(keyed))
    if without:
        raise UserError(f"{stats.path}: no statistics for model {without[0]!r}")
    new, reports = update_models(models.models, keyed, options)
    kind = kind_of_models(models.models)
    if mix_up:
        if kind.name != "gmm":
            raise UserError(f"--mix-up splits Gaussians of GMMs; {models.path} holds "
                            f"{kind.name} models")
        rng = np.random.default_rng(seed)
        for label in sorted(new):
            if mix_up < new[label].n_components:
                raise UserError(f"--mix-up={mix_up}: cannot split model {label!r} from "
                                f"{new[label].n_components} down to {mix_up} Gaussians")
            new[label] = split(new[label], mix_up, perturb_factor, rng)
    return new, reports


def describe_update(stats: StatsFile, models: ModelFile,
                    reports: Mapping[str, UpdateReport]) -> list[str]:
    """Log lines of an update: frames, log-likelihood, and per model what the update did
    (:meth:`UpdateReport.line`, as in the trainer's update logs)."""
    ll, frames = per_frame(stats.stats)
    lines = [f"{frames} frames" + ("" if stats.kaldi else
                                   f"; log-likelihood per frame {ll:.6f} under the input model")]
    keyed = match_labels(stats, models)
    lines += [r.line(label, keyed[label].occupancy) for label, r in sorted(reports.items())]
    return lines


# -- get-frame-likes -----------------------------------------------------------------------


def frame_likes(models: ModelFile, features: str, label: str | None,
                options: EStepOptions,
                gselect: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(utterance id, per-frame log-likelihoods) of every utterance of FEATURES under one
    GMM of the file (``label`` picks it from several), in table order; with ``gselect``,
    over each frame's selected Gaussians only (an utterance without a selection is skipped
    with a warning, as Kaldi does)."""
    label, model = _one_gmm(models, label)
    kernel = make_kernel(model, options)
    utterances = _utterances({label: model}, models.path, features)
    with one_blas_thread():
        if gselect is not None:
            selections = _Selections(gselect, model.n_components)
            for utt_id, feats in utterances:
                indices = selections.get(utt_id, len(feats))
                if indices is not None:
                    yield utt_id, selected_log_likelihood(kernel, feats, indices,
                                                          options.chunk_size)
            return
        scorer = Scorer(kernel, options.chunk_size)
        for utt_id, feats in utterances:
            yield utt_id, scorer.frame_log_likelihood(feats)


def _one_gmm(models: ModelFile, label: str | None):
    """(label, GMM): the file's one model, or the one labelled ``label``."""
    labels = sorted(models.models)
    if label is None:
        if len(labels) != 1:
            shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise UserError(f"{models.path}: holds {len(labels)} models ({shown}); pick one "
                            "with --label L")
        label = labels[0]
    if label not in models.models:
        raise UserError(f"{models.path}: no model labelled {label!r} (labels: "
                        f"{', '.join(labels[:10])})")
    model = models.models[label]
    if type(model).kind != "gmm":
        raise UserError(f"{models.path}: holds {type(model).kind} models; per-frame "
                        "log-likelihoods and Gaussian selection are those of a GMM")
    return label, model


def _utterances(one: Mapping, model_path: Path,
                features: str) -> Iterator[tuple[str, np.ndarray]]:
    """(utterance id, frames) of a data dir or an rspecifier, checked, for one model."""
    if is_rspecifier(features):
        return ((utt_id, feats) for utt_id, (_, feats) in _with_ids(one, features))
    if Path(features).is_dir():
        shard = _data_dir_shard(one, model_path, features)
        return ((u.utt_id, shard.read(u)) for u in shard.utts)
    raise UserError(f"{features}: no such data dir; FEATURES is a Kaldi data dir or an "
                    "rspecifier like scp:feats.scp or ark:feats.ark")
