"""Kaldi data dirs (feats.scp, text, utt2spk, utt2num_frames): reading, validation, sharding.

Validation follows Kaldi's ``utils/validate_data_dir.sh``, each problem one line naming file
and line. Loading a dir reads matrix headers (or ``utt2num_frames``), never whole matrices.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import kaldiio
import numpy as np

from emdist.errors import DataError, UserError

_WS = re.compile(r"[ \t\r\f\v]+")
_MAX_OPEN_FILES = 64
_READ_ERRORS = (OSError, ValueError, AssertionError, struct.error, EOFError, RuntimeError,
                OverflowError, IndexError)
"""What reading a matrix raises on bad bytes, offsets or ranges (kaldiio asserts; an offset
past what a file position holds overflows; a range of more than two axes over-indexes)."""
MAX_FRAMES = 2**31 - 1
"""The most frames (rows) a Kaldi matrix holds (an int32): larger counts are refused."""
_MATRIX_TOKENS = (b"FM", b"DM", b"CM", b"CM2", b"CM3")
_Entries = list[tuple[int, str, str]]  # (line number, utt_id, rest of the line)


@dataclass(frozen=True)
class Utterance:
    """One utterance; ``rxfilename`` is absolute (``/abs/feats.ark:15[range]``) or a pipe."""

    utt_id: str
    rxfilename: str
    label: str | None
    num_frames: int


@dataclass(frozen=True)
class DataDir:
    """A validated Kaldi data dir; ``utts`` are in ``feats.scp`` (sorted) order."""

    path: Path
    utts: tuple[Utterance, ...]
    dim: int
    has_text: bool
    utt2spk: dict[str, str] | None
    empty: tuple[Utterance, ...] = ()
    """Zero-frame utterances left out (``load_data_dir(..., skip_empty=True)``)."""

    @property
    def num_frames(self) -> int:
        """Total number of frames over all utterances."""
        return sum(u.num_frames for u in self.utts)

    @property
    def labels(self) -> list[str]:
        """Sorted unique labels of the utterances (utterances without a label excluded)."""
        return sorted({u.label for u in self.utts if u.label is not None})

    @property
    def name(self) -> str:
        """Name of the data dir (its last path component)."""
        return self.path.name


def _read_table(path: Path, value: str) -> _Entries:
    """Read a table file as ``(line number, utt_id, rest of line)``; ids unique and sorted."""
    entries: _Entries = []
    prev = b""
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as exc:  # no permission, a directory, an I/O error
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    if raw_lines[-1] == b"":
        raw_lines.pop()
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8").strip(" \t\r\f\v")
        except UnicodeDecodeError:
            raise DataError(path, "not valid UTF-8; re-encode the file as UTF-8", lineno) from None
        fields = _WS.split(line, maxsplit=1)
        key = fields[0].encode("utf-8")
        if not line:
            msg = "empty line (Kaldi refuses them); remove it"
        elif len(fields) < 2:
            msg = f"expected 2 fields 'utt-id {value}', got 1 ({line!r}); add the {value}"
        elif entries and key == prev:
            msg = f"duplicate utterance id {fields[0]!r} (ids must be unique); remove one line"
        elif entries and key < prev:
            msg = (
                f"utterance ids are not sorted ({fields[0]!r} after {prev.decode()!r}); "
                "sort the file with LC_ALL=C sort"
            )
        else:
            msg = ""
        if msg:
            raise DataError(path, msg, lineno)
        prev = key
        entries.append((lineno, fields[0], fields[1]))
    return entries


def _read_id_map(
    path: Path, feats: _Entries, value: str, *, one_field: bool = True, cover: bool = True
) -> dict[str, str]:
    """Read ``utt-id value`` lines of ``path``, whose ids must be those of ``feats.scp``.

    Every id of ``path`` must have features; with ``cover`` every utterance of ``feats.scp``
    must also have a line. With ``one_field`` the value is a single token.
    """
    feats_ids = {utt_id for _, utt_id, _ in feats}
    id_map: dict[str, str] = {}
    for lineno, utt_id, rest in _read_table(path, value):
        if one_field and _WS.search(rest):
            msg = f"expected 2 fields 'utt-id {value}', got {1 + len(_WS.split(rest))}"
            raise DataError(path, msg, lineno)
        if utt_id not in feats_ids:
            msg = f"utterance {utt_id!r} has no features in feats.scp; remove the line"
            raise DataError(path, msg + " (utils/fix_data_dir.sh) or add its features", lineno)
        id_map[utt_id] = rest
    missing = [(lineno, utt_id) for lineno, utt_id, _ in feats if utt_id not in id_map]
    if cover and missing:
        (lineno, utt_id), *_ = missing
        msg = f"utterance {utt_id!r} has no line in {path}; add one or remove the utterance"
        raise DataError(path.parent / "feats.scp", msg, lineno)
    return id_map


def _read_num_frames(path: Path, feats: _Entries) -> dict[str, int]:
    """Read ``utt2num_frames`` (positive ints, the ids of ``feats.scp``)."""
    id_map = _read_id_map(path, feats, "num-frames")
    # no empty lines (checked), so the n-th entry is on line n
    for lineno, (utt_id, value) in enumerate(id_map.items(), start=1):
        digits = value.lstrip("0")
        if not re.fullmatch("[0-9]+", value) or not digits:
            msg = f"frame count {value[:40]!r} of {utt_id!r} is not a positive integer; "
            raise DataError(path, msg + "regenerate it (utils/data/get_utt2num_frames.sh)",
                            lineno)
        if len(digits) > 10 or int(digits) > MAX_FRAMES:  # int() refuses 4300 digits
            shown = repr(value[:20]) + ("..." if len(value) > 20 else "")
            msg = f"frame count {shown} of {utt_id!r} is more than a Kaldi matrix "
            raise DataError(path, msg + f"holds ({MAX_FRAMES}); regenerate it", lineno)
    return {utt_id: int(value) for utt_id, value in id_map.items()}


def parse_rxfilename(rxfilename: str) -> tuple[str, int | None, str]:
    """Split an rxfilename into path, byte offset and range suffix.

    Parameters
    ----------
    rxfilename : str
        ``path``, ``path:offset``, ``path:offset[r1:r2]``, ``path:offset[r1:r2,c1:c2]`` or a
        pipe ``cmd |`` (returned unchanged as the path).

    Returns
    -------
    path : str
    offset : int or None
        Byte offset, None when absent.
    range_suffix : str
        The ``[...]`` suffix as written, ``''`` when absent.
    """
    if _is_pipe(rxfilename):
        return rxfilename, None, ""
    rest, suffix = rxfilename, ""
    if rest.endswith("]") and "[" in rest:
        cut = rest.rindex("[")
        rest, suffix = rest[:cut], rest[cut:]
    head, sep, tail = rest.rpartition(":")
    if sep and tail.isdecimal():  # the digits int() reads (isdigit() also holds for "²")
        return head, int(tail), suffix
    return rest, None, suffix


def _is_pipe(rxfilename: str) -> bool:
    """True for pipe rxfilenames (kaldiio runs ``cmd |`` and ``| cmd`` as commands)."""
    return rxfilename.strip().endswith("|") or rxfilename.strip().startswith("|")


def _resolve_entry(rxfilename: str, bases: tuple[Path, ...], cache: dict[str, str]) -> str:
    """Resolve a plain rxfilename against ``bases`` in turn; ValueError when found nowhere.

    ``cache`` maps each distinct ark path already found to its absolute path.
    """
    if rxfilename.startswith(("ark:", "scp:")):
        msg = "is a table specifier, not an rxfilename; write 'path.ark:offset' without it"
        raise ValueError(f"{rxfilename!r} {msg}")
    if rxfilename == "-" or _is_pipe(rxfilename):
        raise ValueError(f"{rxfilename!r} is not a readable file; point to an ark file")
    path, offset, suffix = parse_rxfilename(rxfilename)
    if path not in cache:
        tried = list(dict.fromkeys(os.path.abspath(base / path) for base in bases))
        found = next((c for c in tried if os.path.isfile(c)), None)
        if found is None:
            raise ValueError(f"file {path!r} not found (tried {', '.join(tried)}); fix the path")
        cache[path] = found
    return f"{cache[path]}{'' if offset is None else f':{offset}'}{suffix}"


def _cached_handle(fd_cache: dict[str, BinaryIO], path: str) -> BinaryIO:
    """Return an open handle for ``path`` from ``fd_cache``, closing the oldest when full."""
    if path not in fd_cache:
        if len(fd_cache) >= _MAX_OPEN_FILES:
            fd_cache.pop(next(iter(fd_cache))).close()
        fd_cache[path] = open(path, "rb")  # noqa: SIM115 -- the cache owner closes it
    return fd_cache[path]


def _header_shape(buf: bytes) -> tuple[int, int] | None:
    """Shape from the first bytes of a Kaldi matrix; None for a text matrix.

    Bytes that start no Kaldi matrix (a bad offset, a vector, another kaldiio type) are an
    error rather than a guess.
    """
    header = _header(buf)
    return None if header is None else header[1:]


def _header(buf: bytes) -> tuple[bytes, int, int] | None:
    """(type token, rows, cols) from the first bytes of a binary Kaldi matrix; None for a
    text matrix (``[``); ValueError for anything else."""
    if buf.lstrip()[:1] == b"[":
        return None
    if buf[:2] != b"\0B":
        where = "past the end of the file" if not buf else "not at the start of a Kaldi matrix"
        raise ValueError(f"offset is {where}; regenerate feats.scp")
    end = buf.find(b" ", 2, 7)
    if end < 0 or buf[2:end] not in _MATRIX_TOKENS:
        raise ValueError("not a matrix (features must be a Kaldi matrix, one row per frame)")
    token, body = buf[2:end], buf[end + 1 :]
    if token in (b"FM", b"DM"):
        if len(body) < 10 or body[0] != 4 or body[5] != 4:
            raise ValueError(f"truncated or malformed {token.decode()} header")
        rows, cols = struct.unpack("<xixi", body[:10])
    else:
        if len(body) < 16:
            raise ValueError(f"truncated {token.decode()} header")
        rows, cols = struct.unpack("<8xii", body[:16])
    if rows < 0 or cols < 0:
        raise ValueError(f"negative matrix size {rows}x{cols} in header")
    return token, rows, cols


def _matrix_bytes(token: bytes, rows: int, cols: int) -> int:
    """Bytes of a binary Kaldi matrix, header included, as its header declares them."""
    if token in (b"FM", b"DM"):  # "\0BFM " + (\4 rows \4 cols) + data
        return 15 + rows * cols * (4 if token == b"FM" else 8)
    if token == b"CM":  # global header, 8 bytes per column, one byte per value
        return 21 + 8 * cols + rows * cols
    return 22 + rows * cols * (2 if token == b"CM2" else 1)


def _check_fits(fd: BinaryIO, start: int) -> None:
    """The matrix at ``start`` (a Kaldi matrix or a text one) declares no more bytes than
    the file holds: a truncated ark or a corrupt header is refused before kaldiio allocates
    what it claims."""
    fd.seek(start)
    header = _header(fd.read(24))
    if header is not None:
        held = os.fstat(fd.fileno()).st_size - start
        needed = _matrix_bytes(*header)
        if needed > held:
            token, rows, cols = header
            raise ValueError(
                f"{token.decode()} matrix of {rows}x{cols} needs {needed} bytes, the file holds "
                f"{held} from the offset; the ark is truncated or the header corrupt"
            )
    fd.seek(start)


def _range_shape(shape: tuple[int, int], suffix: str) -> tuple[int, int]:
    """Apply a Kaldi ``[r1:r2]`` / ``[r1:r2,c1:c2]`` range (inclusive ends) to a shape."""
    parts, sizes = suffix[1:-1].split(","), list(shape)
    for axis, part in enumerate(parts):
        bounds = [int(b) for b in part.split(":")] if part.strip() not in ("", ":") else []
        if len(parts) > 2 or len(bounds) > 2:
            raise ValueError(f"bad range {suffix!r}; use [r1:r2] or [r1:r2,c1:c2]")
        if bounds:
            sizes[axis] = len(range(sizes[axis])[bounds[0] : bounds[-1] + 1])
    return sizes[0], sizes[1]


def read_matrix_shape(
    rxfilename: str, *, fd_cache: dict[str, BinaryIO] | None = None
) -> tuple[int, int]:
    """Read the shape of a Kaldi matrix from its header, without reading the data.

    Binary ``FM``/``DM`` and compressed ``CM``/``CM2``/``CM3`` headers are parsed directly;
    text matrices, pipes and anything else fall back to ``kaldiio.load_mat``.

    Parameters
    ----------
    rxfilename : str
        ``path:offset`` with an optional ``[range]`` suffix, or a pipe.
    fd_cache : dict, optional
        Open handles keyed by path (as kaldiio's ``fd_dict``), reused across calls and kept
        to a few dozen; the caller closes them. Without it the file is opened and closed.

    Returns
    -------
    rows, cols : int
    """
    handles = {} if fd_cache is None else fd_cache
    try:
        path, offset, suffix = parse_rxfilename(rxfilename)
        if _is_pipe(rxfilename):
            return _matrix_shape(kaldiio.load_mat(rxfilename))
        fd = _cached_handle(handles, path)
        fd.seek(offset or 0)
        shape = _header_shape(fd.read(24))
        if shape is None:
            fd.seek(offset or 0)  # kaldiio does not seek when there is no offset
            return _matrix_shape(kaldiio.load_mat(rxfilename, fd_dict=handles))
        return _range_shape(shape, suffix) if suffix else shape
    except _READ_ERRORS as exc:
        raise DataError(rxfilename, f"cannot read the matrix header: {_reason(exc)}") from None
    finally:
        if fd_cache is None:
            _close_all(handles)


def _reason(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (kaldiio's span several), cut to ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _close_all(fd_cache: dict[str, BinaryIO]) -> None:
    """Close and forget every handle of ``fd_cache``."""
    for fd in fd_cache.values():
        fd.close()
    fd_cache.clear()


def _matrix_shape(mat: object) -> tuple[int, int]:
    """Shape of a loaded object that must be a 2-D matrix."""
    if not isinstance(mat, np.ndarray) or mat.ndim != 2:
        raise ValueError("not a matrix (features must be a Kaldi matrix, one row per frame)")
    return int(mat.shape[0]), int(mat.shape[1])


def load_feats(rxfilename: str) -> np.ndarray:
    """Load one feature matrix.

    Parameters
    ----------
    rxfilename : str
        Resolved rxfilename, as in :attr:`Utterance.rxfilename`.

    Returns
    -------
    feats : ndarray, shape (n_frames, dim)
        float32, C-contiguous and writable (double-precision data is converted).
    """
    handles: dict[str, BinaryIO] = {}
    try:
        if _is_pipe(rxfilename):
            mat = kaldiio.load_mat(rxfilename)
        else:
            path, offset, _ = parse_rxfilename(rxfilename)
            _check_fits(_cached_handle(handles, path), offset or 0)
            with np.errstate(all="ignore"):  # absurd values are the frame check's to report
                mat = kaldiio.load_mat(rxfilename, fd_dict=handles)
        _matrix_shape(mat)
    except _READ_ERRORS as exc:
        raise DataError(rxfilename, f"cannot read features: {_reason(exc)}") from None
    finally:
        _close_all(handles)
    with np.errstate(all="ignore"):  # values past float32 are the frame check's to report
        feats = np.ascontiguousarray(mat, dtype=np.float32)
    return feats if feats.flags.writeable else feats.copy()


def _read_feats_scp(scp: Path, data_dir: Path, allow_pipes: bool) -> _Entries:
    """Read ``feats.scp`` as ``(line, utt_id, resolved rxfilename)`` triples."""
    entries = _read_table(scp, "rxfilename")
    if not entries:
        raise DataError(scp, "no utterances; the file is empty")
    bases, cache = (Path.cwd(), data_dir, data_dir.parent), {}
    resolved = []
    for lineno, utt_id, rest in entries:
        is_pipe = rest.endswith("|")
        if _WS.search(rest) and not is_pipe:
            msg = f"expected 2 fields 'utt-id rxfilename', got {1 + len(_WS.split(rest))}"
            raise DataError(scp, msg, lineno)
        if is_pipe and not allow_pipes:
            msg = f"pipe entry {rest!r} runs a shell command; write the features to an ark file"
            raise DataError(scp, msg + " (copy-feats) or allow pipes explicitly", lineno)
        try:
            resolved.append(
                (lineno, utt_id, rest if is_pipe else _resolve_entry(rest, bases, cache))
            )
        except ValueError as exc:
            raise DataError(scp, str(exc), lineno) from None
    return resolved


def _shapes(scp: Path, feats: _Entries, num_frames: dict[str, int] | None,
            skip_empty: bool = False) -> tuple[list[int], int]:
    """Frame counts of all utterances and the common dim, from headers or utt2num_frames;
    a zero-frame utterance is an error, or counts 0 with ``skip_empty``."""
    cache: dict[str, BinaryIO] = {}
    counts: list[int] = []
    dim = -1
    try:
        for lineno, utt_id, rx in feats:
            if num_frames is not None and dim >= 0:
                if num_frames[utt_id] == 0 and not skip_empty:
                    raise DataError(scp, f"utterance {utt_id!r} has no frames (utt2num_frames); "
                                    "remove it, or train with --skip-bad-utts", lineno)
                counts.append(num_frames[utt_id])
                continue
            try:
                rows, cols = read_matrix_shape(rx, fd_cache=cache)
            except DataError as exc:
                raise DataError(scp, f"utterance {utt_id!r}: {exc}", lineno) from None
            if rows == 0 and skip_empty and dim in (-1, cols):
                counts.append(0)
                dim = cols if cols else dim
                continue
            if rows == 0 or cols == 0:
                raise DataError(scp, f"utterance {utt_id!r} has no frames; remove it, or train "
                                "with --skip-bad-utts", lineno)
            if dim >= 0 and cols != dim:
                msg = f"utterance {utt_id!r} has dim {cols} but earlier utterances have dim {dim}"
                raise DataError(scp, msg + "; all features must have the same dim", lineno)
            dim = cols
            counts.append(num_frames[utt_id] if num_frames is not None else rows)
    finally:
        _close_all(cache)
    return counts, dim


def load_data_dir(
    path: str | os.PathLike[str], *, require_labels: bool = True, allow_pipes: bool = False,
    skip_empty: bool = False,
) -> DataDir:
    """Read and validate a Kaldi data dir.

    Parameters
    ----------
    path : str or path-like
        The data dir (holding ``feats.scp``).
    require_labels : bool
        Word-model training: ``text`` must exist and label every utterance. When False,
        ``text`` is optional; labels are read when present, utterances without one get None.
    allow_pipes : bool
        Accept ``cmd |`` entries in ``feats.scp`` (they run shell commands).
    skip_empty : bool
        Leave zero-frame utterances out (listed in ``DataDir.empty``) instead of refusing
        them (``--skip-bad-utts``).

    Returns
    -------
    DataDir

    Raises
    ------
    UserError
        The dir or ``feats.scp`` is missing, or ``text`` is missing but required.
    DataError
        A file is malformed (the message names file and line).
    """
    data_dir = Path(os.path.abspath(path))
    scp = data_dir / "feats.scp"
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data dir not found; pass a Kaldi data dir with feats.scp")
    if not scp.is_file():
        raise UserError(f"{scp}: not found; a data dir needs feats.scp (utt-id rxfilename)")
    text = data_dir / "text"
    if require_labels and not text.is_file():
        msg = "word models need labels in text (utt-id label); or train one model with --global"
        raise UserError(f"{text}: not found; {msg}")
    feats = _read_feats_scp(scp, data_dir, allow_pipes)
    labels: dict[str, str] = {}
    if text.is_file():
        labels = _read_id_map(text, feats, "label", one_field=False, cover=require_labels)
    utt2spk_path, n_frames_path = data_dir / "utt2spk", data_dir / "utt2num_frames"
    utt2spk = _read_id_map(utt2spk_path, feats, "speaker-id") if utt2spk_path.is_file() else None
    num_frames = _read_num_frames(n_frames_path, feats) if n_frames_path.is_file() else None
    counts, dim = _shapes(scp, feats, num_frames, skip_empty)
    every = [Utterance(utt_id, rx, labels.get(utt_id), n)
             for (_, utt_id, rx), n in zip(feats, counts, strict=True)]
    if all(u.num_frames == 0 for u in every):
        raise DataError(scp, "no utterance has frames")
    utts = tuple(u for u in every if u.num_frames)
    empty = tuple(u for u in every if not u.num_frames)
    return DataDir(data_dir, utts, dim, text.is_file(), utt2spk, empty)


def split_by_frames(utts: Sequence[Utterance], nj: int) -> list[tuple[Utterance, ...]]:
    """Split utterances into contiguous shards with about equal frame totals.

    Shard ``j`` ends after the utterance where the cumulative frame count first reaches
    ``(j + 1) * total / n_shards``, moved where needed so that no shard is empty.

    Parameters
    ----------
    utts : sequence of Utterance
        In the order to keep (``DataDir.utts``).
    nj : int
        Requested number of shards (Kaldi's ``nj``), at least 1.

    Returns
    -------
    shards : list of tuple of Utterance
        ``min(nj, len(utts))`` non-empty shards; their concatenation is ``utts``.
    """
    if isinstance(nj, bool) or not isinstance(nj, (int, np.integer)) or nj < 1:
        raise UserError(f"number of jobs (nj) must be a positive integer, got {nj!r}")
    n = len(utts)
    n_shards = min(int(nj), n)
    if n_shards == 0:
        return []
    cumsum = np.cumsum([u.num_frames for u in utts], dtype=np.int64)
    # first index i with cumsum[i] >= j * total / n_shards, in exact integer arithmetic
    targets = np.arange(1, n_shards, dtype=np.int64) * int(cumsum[-1])
    firsts = np.searchsorted(cumsum * n_shards, targets, side="left")
    bounds = [0]
    for j, first in enumerate(firsts.tolist(), start=1):
        bounds.append(min(max(first + 1, bounds[-1] + 1), n - (n_shards - j)))
    bounds.append(n)
    return [tuple(utts[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
