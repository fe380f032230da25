"""Work on one shard: the pure functions that backends run (in process or on Dask workers).

Every task reads its shard's features itself (``kaldiio`` on the ``rxfilename`` strings),
runs with BLAS pinned to one thread (one-thread and two-thread products can differ in the
last bit; parallelism comes from tasks), and returns a value plus a :class:`JobReport` from
which the driver writes the Kaldi-style job log.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from emdist.data.datadir import Utterance, load_feats
from emdist.errors import DataError, UserError
from emdist.models.estep import EStepOptions, make_kernel
from emdist.models.gmm import GMM
from emdist.models.gselect import Selection, accumulate_selected, select
from emdist.models.kind import kind_of_models
from emdist.models.stats import StatsMap, add_maps, sum_group

GLOBAL_LABEL = "global"


@dataclass(frozen=True)
class Shard:
    """A contiguous block of utterances (Kaldi's ``JOB``), with the model each one trains.

    Attributes
    ----------
    index : int
        0-based shard index; logs number jobs from 1 as Kaldi does.
    utts : tuple of Utterance
    keys : tuple of str
        For each utterance, the label of the model it belongs to (``global`` for a UBM).
    """

    index: int
    utts: tuple[Utterance, ...]
    keys: tuple[str, ...]
    subsample: int = 1
    """Keep every n-th frame of each utterance (Kaldi's ``subsample-feats --n``); the
    utterances' ``num_frames`` already count the frames kept."""

    @property
    def job(self) -> int:
        return self.index + 1

    @property
    def num_frames(self) -> int:
        return sum(u.num_frames for u in self.utts)

    def read(self, utt: Utterance) -> np.ndarray:
        """An utterance's features, every ``subsample``-th frame from the first."""
        return self.subsampled(read_utterance(utt))

    def subsampled(self, feats: np.ndarray) -> np.ndarray:
        """Every ``subsample``-th frame of an utterance's features, from the first."""
        return feats if self.subsample == 1 else np.ascontiguousarray(feats[:: self.subsample])


@dataclass(frozen=True)
class LoadedShard:
    """A shard's features in memory: per model label, its frames concatenated in order,
    and the number of frames of each of its utterances (for kinds that need them)."""

    shard: Shard
    frames: dict[str, np.ndarray]
    lengths: dict[str, tuple[int, ...]] = field(default_factory=dict)
    bad: tuple[BadUtterance, ...] = ()
    """Utterances left out because their features cannot be trained on."""


@dataclass(frozen=True)
class SelectedShard:
    """A cached shard kept in the block order of its Gaussian selection (``--gselect``)."""

    shard: Shard
    frames: np.ndarray
    """(T, D), column-major, in ``selection.order``."""
    selection: Selection


@dataclass(frozen=True)
class JobReport:
    """What one job did, for ``log/<stage>.<iter>.<job>.log``."""

    job: int
    host: str
    pid: int
    start: float
    end: float
    utts: int
    frames: int
    loglike: float
    lines: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class BadData:
    """What a task returns in place of its result when its shard's data are bad (a
    :class:`UserError`, such as NaN features): a value, not an exception, so that Dask does
    not retry a task that would fail again. Every task and tree-sum node that receives one
    passes it on; the backends raise it on the driver as a failed job."""

    job: int
    error: UserError
    traceback: str


def _bad_in(value) -> BadData | None:
    if isinstance(value, BadData):
        return value
    if isinstance(value, tuple):
        return next((v for v in value if isinstance(v, BadData)), None)
    return None


def data_errors_as_values(func):
    """Run ``func``; a :class:`UserError` it raises, or a :class:`BadData` among its
    arguments, becomes its :class:`BadData` result."""

    @functools.wraps(func)
    def run(*args):
        for arg in args:
            bad = _bad_in(arg)
            if bad is not None:
                return bad
        try:
            return func(*args)
        except UserError as exc:
            try:
                job = _shard_of(args[0]).job
            except (AttributeError, IndexError, TypeError):
                job = 0
            return BadData(job, exc, traceback.format_exc())

    return run


@contextmanager
def one_blas_thread():
    """Pin BLAS (and OpenMP) to one thread inside the block."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


MAX_ABS_FEATURE = 1e10
"""The largest feature magnitude emdist accepts. The E-step's float32 products hold the
squares of centred features and their products with precisions (up to 1/--min-variance
= 1e3): at |x| = 1e10 those are about 1e23 per term, far from float32's 3.4e38; at 1e19 the
squares alone overflow. Real features (MFCC, filterbanks, i-vectors) are below 1e4."""


@dataclass(frozen=True)
class BadUtterance:
    """An utterance whose features cannot be trained on, and why."""

    utt_id: str
    rxfilename: str
    reason: str

    def describe(self) -> str:
        return f"utterance {self.utt_id} ({self.rxfilename}) {self.reason}"


def frames_problem(feats: np.ndarray) -> str | None:
    """Why these features cannot be trained on (NaN, infinite, or beyond
    :data:`MAX_ABS_FEATURE`), or None."""
    if feats.size == 0:
        return "has no frames"
    finite = np.isfinite(feats)
    if not finite.all():
        nan = int(np.isnan(feats).sum())
        inf = int((~finite).sum()) - nan
        what = " and ".join(x for x in (f"{nan} NaN" if nan else "",
                                        f"{inf} infinite" if inf else "") if x)
        return f"has {what} feature values"
    top = float(np.abs(feats).max())
    if top > MAX_ABS_FEATURE:
        return (f"has features of magnitude {top:.3g}, beyond {MAX_ABS_FEATURE:.0e} (their "
                "squares would overflow the float32 E-step)")
    return None


def read_utterance(utt: Utterance) -> np.ndarray:
    """Read an utterance's features and refuse NaN, infinite or absurd values."""
    feats = load_feats(utt.rxfilename)
    problem = frames_problem(feats)
    if problem is not None:
        raise DataError(utt.rxfilename, f"utterance {utt.utt_id} {problem}; fix or drop it, or "
                        "train with --skip-bad-utts")
    return feats


def _read_checked(shard: Shard) -> Iterator[tuple[Utterance, str, np.ndarray | None,
                                                  BadUtterance | None]]:
    """Every utterance of a shard read and checked: (utt, key, frames or None, problem)."""
    for utt, key in zip(shard.utts, shard.keys, strict=True):
        feats = load_feats(utt.rxfilename)
        problem = frames_problem(feats)
        if problem is not None:
            yield utt, key, None, BadUtterance(utt.utt_id, utt.rxfilename, problem)
            continue
        yield utt, key, shard.subsampled(feats), None


def without(shard: Shard, bad: Iterable[str]) -> Shard:
    """The shard less the utterances whose ids are in ``bad``."""
    bad = set(bad)
    kept = [(u, k) for u, k in zip(shard.utts, shard.keys, strict=True) if u.utt_id not in bad]
    return replace(shard, utts=tuple(u for u, _ in kept), keys=tuple(k for _, k in kept))


@data_errors_as_values
def check_shard(source: Shard | LoadedShard) -> tuple[BadUtterance, ...]:
    """The utterances of a shard that cannot be trained on, all of them (``feat-to-len`` and
    a finiteness check, as ``validate_data_dir.sh`` would): read from disk for a streamed
    shard; a cached shard was checked when it was loaded."""
    if isinstance(source, LoadedShard):
        return source.bad
    with one_blas_thread():
        return tuple(b for _, _, _, b in _read_checked(source) if b is not None)


def iter_frames(source: Shard | LoadedShard,
                per_utterance: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(label, frames) pieces of a shard, in order: per utterance, or per label if loaded
    (per utterance then too with ``per_utterance``)."""
    if isinstance(source, LoadedShard):
        if not per_utterance:
            yield from source.frames.items()
            return
        for key, frames in source.frames.items():
            ends = np.cumsum(source.lengths[key])
            for start, end in zip(ends - source.lengths[key], ends, strict=True):
                yield key, frames[start:end]
        return
    for utt, key in zip(source.utts, source.keys, strict=True):
        yield key, source.read(utt)


def hold(shard: Shard) -> Shard:
    """A shard's description, kept on a worker once (``Backend.keep``): streamed passes then
    send a reference, not the list of its utterances (tens of MB for a large corpus)."""
    return shard


@data_errors_as_values
def load_shard(shard: Shard) -> LoadedShard:
    """Read a shard once, to keep it in worker memory (``--feature-cache memory``), checking
    every utterance: those that cannot be trained on are left out, and listed in ``bad``
    (the driver then stops, or goes on without them with ``--skip-bad-utts``)."""
    with one_blas_thread():
        pieces: dict[str, list[np.ndarray]] = {}
        bad = []
        for _, key, frames, problem in _read_checked(shard):
            if problem is not None:
                bad.append(problem)
                continue
            pieces.setdefault(key, []).append(frames)
        # column-major: the E-step copies chunks in transposed, contiguous this way
        return LoadedShard(without(shard, (b.utt_id for b in bad)),
                           {k: np.asfortranarray(np.concatenate(v))
                            for k, v in sorted(pieces.items())},
                           {k: tuple(len(f) for f in v) for k, v in sorted(pieces.items())},
                           tuple(bad))


Source = Shard | LoadedShard | SelectedShard | tuple  # tuple: (Shard, Selection), streamed


def _shard_of(source: Source) -> Shard:
    if isinstance(source, tuple):
        return source[0]
    return source if isinstance(source, Shard) else source.shard


def _global_frames(source: Shard | LoadedShard) -> np.ndarray:
    """All frames of a ``--global`` shard, in stream order."""
    if isinstance(source, LoadedShard):
        return source.frames[GLOBAL_LABEL]
    return np.concatenate([frames for _, frames in iter_frames(source)])


@data_errors_as_values
def select_shard(source: Shard | LoadedShard, models: Mapping[str, GMM],
                 options: EStepOptions, n_select: int) -> SelectedShard | Selection:
    """Gaussian selection of a ``--global`` shard under ``models["global"]``: kept with
    the shard's frames in block order when the shard is cached, alone when it streams."""
    with one_blas_thread():
        frames = _global_frames(source)
        kernel = make_kernel(models[GLOBAL_LABEL], options)
        selection = select(kernel, frames, n_select, options.chunk_size)
        if isinstance(source, LoadedShard):
            ordered = np.asfortranarray(frames[selection.order])
            return SelectedShard(source.shard, ordered, selection)
        return selection


def _acc_selected(source, models: Mapping[str, GMM], options: EStepOptions):
    """Statistics of a ``--global`` shard over each frame's selected Gaussians."""
    with one_blas_thread():
        if isinstance(source, SelectedShard):
            ordered, selection = source.frames, source.selection
        else:  # streamed: read the shard, then put its frames in block order
            shard, selection = source
            ordered = _global_frames(shard)[selection.order]
        stats, _ = accumulate_selected(make_kernel(models[GLOBAL_LABEL], options), ordered,
                                       selection)
    line = (f"gselect: {selection.n_select} of {selection.n_components} Gaussians per frame, "
            f"{selection.mean_union:.0f} per block of frames on average")
    return {GLOBAL_LABEL: stats}, line


@data_errors_as_values
def acc_shard(
    source: Source,
    models: Mapping,
    options: EStepOptions,
    hard: bool = False,
) -> tuple[StatsMap, list[JobReport]]:
    """Statistics of every model over its own frames in the shard (one pass), by the
    models' kind (:mod:`emdist.models.kind`); over each frame's selected Gaussians when the
    source carries a Gaussian selection (GMMs only). ``hard``: hard assignments (k-means
    passes; Viterbi training of HMMs)."""
    shard = _shard_of(source)
    start = time.time()
    extra: tuple[str, ...] = ()
    if isinstance(source, SelectedShard | tuple):
        stats, line = _acc_selected(source, models, options)
        extra = (line,)
    else:
        kind = kind_of_models(models)
        with one_blas_thread():
            stats = kind.accumulate(models, iter_frames(source, kind.per_utterance), options,
                                    hard)
    frames = sum(s.frames for s in stats.values())
    loglike = sum(s.loglike for s in stats.values())
    lines = extra + tuple(
        f"label {key}: {s.frames} frames, log-likelihood per frame "
        f"{s.loglike / max(s.frames, 1):.6f}"
        for key, s in stats.items()
    )
    report = _report(shard, start, frames, loglike, lines)
    return stats, [report]


@data_errors_as_values
def reduce_group(*results: tuple[StatsMap, list[JobReport]]) -> tuple[StatsMap, list[JobReport]]:
    """Add the results of consecutive shards left to right (one node of the tree sum); the
    first :class:`BadData` among them, if any, is the node's result."""
    stats = sum_group([r[0] for r in results], add_maps)
    reports = [rep for r in results for rep in r[1]]
    return stats, reports


@data_errors_as_values
def sample_shard(source: Shard | LoadedShard, stride: int,
                 starts: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every ``stride``-th frame of each label's stream; ``starts`` are the utterances'
    positions in that stream, so the sample does not depend on the sharding. A cached
    shard is sampled in memory: its frames of a label are consecutive in that stream."""
    with one_blas_thread():
        shard = _shard_of(source)
        if isinstance(source, LoadedShard):
            first = {}
            for key, start in zip(shard.keys, starts, strict=True):
                first.setdefault(key, start)
            return {key: np.array(frames[(-first[key]) % stride :: stride], dtype=np.float64)
                    for key, frames in source.frames.items()}
        pieces: dict[str, list[np.ndarray]] = {}
        for utt, key, start in zip(shard.utts, shard.keys, starts, strict=True):
            feats = shard.read(utt)
            first_frame = (-start) % stride
            pieces.setdefault(key, []).append(
                np.array(feats[first_frame::stride], dtype=np.float64))
        return {k: np.concatenate(v) for k, v in sorted(pieces.items())}


@data_errors_as_values
def score_shard(source: Shard, models: Mapping, options: EStepOptions,
                best_path: bool = False) -> list[tuple[str, dict[str, float]]]:
    """Total score (log-likelihood; minus the distortion for k-means) of every utterance
    under every model, by the models' kind; with ``best_path``, an HMM's best path only."""
    with one_blas_thread():
        utterances = ((utt.utt_id, read_utterance(utt)) for utt in source.utts)
        return kind_of_models(models).score(models, utterances, options, best_path)


def _report(shard: Shard, start: float, frames: int, loglike: float, lines) -> JobReport:
    return JobReport(
        job=shard.job,
        host=socket.gethostname(),
        pid=os.getpid(),
        start=start,
        end=time.time(),
        utts=len(shard.utts),
        frames=frames,
        loglike=loglike,
        lines=tuple(lines),
    )
