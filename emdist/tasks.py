"""Work on one shard: the pure functions that backends run (in process or on Dask workers).

Every task reads its shard's features itself (``kaldiio`` on the ``rxfilename`` strings),
runs with BLAS pinned to one thread (one-thread and two-thread products can differ in the
last bit; parallelism comes from tasks), and returns a value plus a :class:`JobReport` from
which the driver writes the Kaldi-style job log.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from emdist.datadir import Utterance, load_feats
from emdist.errors import DataError
from emdist.estep import Accumulator, EStepOptions, make_kernel
from emdist.gmm import GMM
from emdist.stats import StatsMap, add_maps, sum_group

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

    @property
    def job(self) -> int:
        return self.index + 1

    @property
    def num_frames(self) -> int:
        return sum(u.num_frames for u in self.utts)


@dataclass(frozen=True)
class LoadedShard:
    """A shard's features in memory: per model label, its frames concatenated in order."""

    shard: Shard
    frames: dict[str, np.ndarray]


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


@contextmanager
def one_blas_thread():
    """Pin BLAS (and OpenMP) to one thread inside the block."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def read_utterance(utt: Utterance) -> np.ndarray:
    """Read an utterance's features and refuse NaN or infinite values."""
    feats = load_feats(utt.rxfilename)
    if not np.isfinite(feats).all():
        raise DataError(utt.rxfilename, f"utterance {utt.utt_id} has NaN or infinite features")
    return feats


def iter_frames(source: Shard | LoadedShard) -> Iterator[tuple[str, np.ndarray]]:
    """(label, frames) pieces of a shard, in order: per utterance, or per label if loaded."""
    if isinstance(source, LoadedShard):
        yield from source.frames.items()
        return
    for utt, key in zip(source.utts, source.keys, strict=True):
        yield key, read_utterance(utt)


def load_shard(shard: Shard) -> LoadedShard:
    """Read a shard once, to keep it in worker memory (``--feature-cache memory``)."""
    with one_blas_thread():
        pieces: dict[str, list[np.ndarray]] = {}
        for key, frames in iter_frames(shard):
            pieces.setdefault(key, []).append(frames)
        # column-major: the E-step copies chunks in transposed, contiguous this way
        return LoadedShard(shard, {k: np.asfortranarray(np.concatenate(v))
                                   for k, v in sorted(pieces.items())})


def _shard_of(source: Shard | LoadedShard) -> Shard:
    return source.shard if isinstance(source, LoadedShard) else source


def acc_shard(
    source: Shard | LoadedShard,
    models: Mapping[str, GMM],
    options: EStepOptions,
    hard: bool = False,
) -> tuple[StatsMap, list[JobReport]]:
    """Statistics of every model over its own frames in the shard (one pass)."""
    shard = _shard_of(source)
    start = time.time()
    with one_blas_thread():
        accs: dict[str, Accumulator] = {}
        for key, frames in iter_frames(source):
            if key not in accs:
                kernel = make_kernel(models[key], options)
                accs[key] = Accumulator(kernel, models[key].dim, options.chunk_size, hard=hard)
            accs[key].push(frames)
        stats = {key: accs[key].finish() for key in sorted(accs)}
    frames = sum(s.frames for s in stats.values())
    loglike = sum(s.loglike for s in stats.values())
    lines = tuple(
        f"label {key}: {s.frames} frames, log-likelihood per frame "
        f"{s.loglike / max(s.frames, 1):.6f}"
        for key, s in stats.items()
    )
    report = _report(shard, start, frames, loglike, lines)
    return stats, [report]


def reduce_group(*results: tuple[StatsMap, list[JobReport]]) -> tuple[StatsMap, list[JobReport]]:
    """Add the results of consecutive shards left to right (one node of the tree sum)."""
    stats = sum_group([r[0] for r in results], add_maps)
    reports = [rep for r in results for rep in r[1]]
    return stats, reports


def sample_shard(shard: Shard, stride: int, starts: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every ``stride``-th frame of each label's stream; ``starts`` are the utterances'
    positions in that stream, so the sample does not depend on the sharding."""
    with one_blas_thread():
        pieces: dict[str, list[np.ndarray]] = {}
        for utt, key, start in zip(shard.utts, shard.keys, starts, strict=True):
            feats = read_utterance(utt)
            first = (-start) % stride
            pieces.setdefault(key, []).append(np.array(feats[first::stride], dtype=np.float64))
        return {k: np.concatenate(v) for k, v in sorted(pieces.items())}


def score_shard(
    source: Shard, models: Mapping[str, GMM], options: EStepOptions
) -> list[tuple[str, dict[str, float]]]:
    """Total log-likelihood of every utterance under every model."""
    with one_blas_thread():
        kernels = {label: make_kernel(m, options) for label, m in sorted(models.items())}
        out = []
        for utt in source.utts:
            feats = read_utterance(utt)
            scores = {
                label: float(k.frame_log_likelihood(feats, options.chunk_size).sum())
                for label, k in kernels.items()
            }
            out.append((utt.utt_id, scores))
        return out


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
