"""Kaldi tables for the command-line tools: features and Gaussian selections in from an
rspecifier; per-utterance floats, vectors or Gaussian selections out to a wspecifier.

:func:`read_features` reads ``scp:feats.scp``, ``ark:feats.ark``, ``ark:-`` (stdin),
``ark:cmd |`` and ``scp:-`` with Kaldi's read options (``ark,s,cs:``, ``scp,p:``...), and
yields ``(utt_id, matrix)`` in table order. Archives are parsed with kaldiio's matrix
readers (binary ``FM``/``DM``, compressed ``CM``/``CM2``/``CM3`` and text matrices; never
kaldiio's pickle or numpy entries); each scp entry is read with
:func:`emdist.data.datadir.load_feats` (which checks a file's matrix header first; an entry
that is a command, ``cmd |``, goes to ``kaldiio.load_mat`` as it is). Every problem is a
:class:`UserError` of one line naming the rspecifier, and the scp line or archive entry.

:class:`TableWriter` writes Kaldi's ``BaseFloatWriter`` (one float per key) or
``BaseFloatVectorWriter`` (one vector per key) tables, binary or text, to ``ark:PATH``,
``ark,t:PATH``, ``ark:-`` / ``ark,t:-`` (stdout), ``ark:| command`` and ``ark,scp:ARK,SCP``;
files are written under a temporary name and renamed when the ``with`` block ends without
an exception. :func:`read_gselect` and the same writer handle ``gmm-gselect``'s tables of
int32 vectors of vectors (each frame's selected Gaussians).

Kaldi's bytes (``base/io-funcs.cc``, ``util/kaldi-holder-inl.h``, ``VectorBase::Write``)::

    binary float   key ␠ \\0B \\x04 <float32>
    text float     key ␠ <value> ␠ \\n
    binary vector  key ␠ \\0B FV ␠ \\x04 <int32 n> <n float32>
    text vector    key ␠ ␠[␠ <v1> ␠ <v2> ␠ ... ]\\n
    binary gselect key ␠ \\0B \\x04 <int32 T> then per frame \\x04 <int32 N> (\\x04 <int32>)×N
    text gselect   key ␠ <g> ␠ <g> ␠ ; ␠ <g> ␠ <g> ␠ ; ␠ \\n    (';' ends each frame's list)

text numbers as C++ prints a float at precision 7. An scp line is ``key ARK:OFFSET`` with the
offset of the byte after ``key ␠`` (the ``\\0B`` in binary), as Kaldi and kaldiio write it.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from numbers import Real
from pathlib import Path
from typing import BinaryIO

import numpy as np
from kaldiio.matio import read_ascii_mat, read_matrix_or_vector, read_token
from kaldiio.utils import MultiFileDescriptor, open_like_kaldi

from emdist.data.datadir import load_feats, parse_rxfilename
from emdist.errors import DataError, EmdistWarning, UserError, WriteFailure
from emdist.io.kaldi import format_binary_vector, format_float, format_text_vector
from emdist.io.modelio import open_temp

RSPECIFIER_USAGE = ("FEATURES is a data dir or a Kaldi rspecifier like scp:feats.scp or "
                    "ark:feats.ark")
GSELECT_USAGE = ("give the selections as ark:PATH, ark:-, 'ark,s,cs:gunzip -c PATH.gz |' "
                 "or scp:PATH")
WSPECIFIER_USAGE = ("give a Kaldi wspecifier like ark:out.ark, ark,t:out.txt or "
                    "ark,scp:out.ark,out.scp")
_READ_OPTIONS = frozenset({"b", "t", "o", "no", "s", "ns", "cs", "ncs", "p", "np", "bg"})
"""Kaldi's rspecifier options; only ``p``/``np`` (permissive) change sequential reading."""
_WRITE_OPTIONS = frozenset({"b", "t", "f", "nf", "p"})
"""Kaldi's wspecifier options: binary, text, flush, no flush, permissive (ignored)."""
_READ_ERRORS = (OSError, ValueError, AssertionError, struct.error, EOFError, RuntimeError,
                OverflowError, IndexError, KeyError, MemoryError)
"""What kaldiio raises on bad bytes (asserts, struct and numpy errors, a size too large to
allocate, UnicodeDecodeError for a key that is not UTF-8)."""


class TableWarning(EmdistWarning):
    """An entry of a permissive (``p``) rspecifier was skipped because it could not be read."""


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line of printable characters, cut to ``limit``."""
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "a size in a header is too large to allocate"
    return _one_line(str(exc)) or type(exc).__name__


def _is_pipe(name: str) -> bool:
    return name.strip().endswith("|") or name.strip().startswith("|")


def _split_specifier(spec: str, allowed: frozenset[str], usage: str) -> tuple[list[str], str]:
    """Options (before the first ``:``) and the rest of a Kaldi r/wspecifier."""
    if not isinstance(spec, str):
        raise UserError(f"{spec!r} is not a Kaldi table specifier; {usage}")
    head, sep, rest = spec.partition(":")
    options = [o.strip() for o in head.split(",")]
    if not sep or not ({"ark", "scp"} & set(options)):
        raise UserError(f"{spec!r} is not a Kaldi table specifier (no 'ark:' or 'scp:'); {usage}")
    unknown = [o for o in options if o not in allowed | {"ark", "scp"}]
    if unknown:
        known = ", ".join(sorted(allowed))
        raise UserError(f"{spec}: unknown option {unknown[0]!r} before ':' (Kaldi's options "
                        f"here are ark, scp, {known}); remove it")
    for twice in ("ark", "scp"):
        if options.count(twice) > 1:
            raise UserError(f"{spec}: {twice!r} given twice before ':'; give it once")
    return options, rest


# -- reading -------------------------------------------------------------------------------

def read_features(rspecifier: str) -> Iterator[tuple[str, np.ndarray]]:
    """Read the feature matrices of a Kaldi rspecifier in table order.

    Parameters
    ----------
    rspecifier : str
        ``scp:PATH``, ``ark:PATH``, ``ark:-`` (stdin), ``scp:-``, ``ark:cmd |``, with Kaldi's
        options before the colon (``ark,s,cs:``, ``scp,p:``...). Only ``p`` (permissive)
        matters: an unreadable scp entry is skipped, an unreadable archive entry ends the
        archive, each with a :class:`TableWarning`. A relative path in an scp is relative
        to the current directory, as in Kaldi.

    Returns
    -------
    iterator of (str, ndarray)
        ``(utt_id, feats)``, feats float32 of shape (n_frames, dim), C-contiguous and
        writable, the same dim throughout. An empty table yields nothing.

    Raises
    ------
    UserError
        At the call (bad rspecifier, missing file, malformed scp line) or while iterating
        (an archive truncated or not an archive, a value that is not a matrix, no frames,
        differing dims, a failing command): one line naming the rspecifier and the scp line
        or archive entry.
    """
    options, target = _split_specifier(rspecifier, _READ_OPTIONS, RSPECIFIER_USAGE)
    if "ark" in options and "scp" in options:
        raise UserError(f"{rspecifier}: an rspecifier reads one table: give scp:PATH or "
                        "ark:PATH, not both")
    if not target:
        raise UserError(f"{rspecifier}: no file after ':'; {RSPECIFIER_USAGE}")
    permissive = _last(options, "p") > _last(options, "np")
    if target != "-" and not _is_pipe(target):
        if not os.path.exists(target):
            raise UserError(f"{rspecifier}: {target} not found (relative to {os.getcwd()}); "
                            "check the path")
        if os.path.isdir(target):
            raise UserError(f"{rspecifier}: {target} is a directory; give the "
                            f"{'scp' if 'scp' in options else 'archive'} file (a data dir "
                            "is given without 'scp:' or 'ark:')")
    if "scp" in options:
        return _read_scp(rspecifier, _scp_entries(rspecifier, target), permissive)
    return _read_ark(rspecifier, target, permissive)


def _last(options: list[str], option: str) -> int:
    return max((i for i, o in enumerate(options) if o == option), default=-1)


def _scp_entries(spec: str, target: str) -> list[tuple[int, str, str]]:
    """``(line number, utt_id, rxfilename)`` of every scp line; malformed lines refused."""
    try:
        if target == "-":
            data = sys.stdin.buffer.read()
        else:
            fd = open_like_kaldi(target, "rb")
            try:
                data = fd.read()
            finally:
                status = fd.close()
            if _is_pipe(target) and status:
                raise UserError(f"{spec}: the command exited with status {status >> 8}; "
                                "run it alone to see why")
    except OSError as exc:
        raise UserError(f"{spec}: cannot read {target}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    entries = []
    for lineno, raw in enumerate(lines, start=1):
        where = f"{spec}: line {lineno}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"{where}: not valid UTF-8 (is {target} an archive? then read "
                            f"it as ark:{target})") from None
        fields = line.split(None, 1)
        if len(fields) < 2:
            got = "an empty line" if not fields else f"{_one_line(line, 60)!r}"
            raise UserError(f"{where}: expected 'utt-id rxfilename', got {got}; fix or "
                            "remove the line")
        entries.append((lineno, fields[0], fields[1]))
    return entries


def _read_scp(spec: str, entries: list[tuple[int, str, str]],
              permissive: bool) -> Iterator[tuple[str, np.ndarray]]:
    checker = _Checker(spec)
    for lineno, utt_id, rx in entries:
        where = f"{spec}: line {lineno}: utterance {utt_id!r}"
        path = parse_rxfilename(rx)[0]
        if not _is_pipe(rx) and not os.path.isfile(path):
            problem = (f"file {path!r} not found (a relative path is relative to the current "
                       f"directory, {os.getcwd()}); fix the path")
        else:
            try:
                feats = load_feats(rx)
            except DataError as exc:
                problem = f"{rx}: {exc.message}"
            else:
                yield utt_id, checker(where, feats)
                continue
        if permissive:
            warnings.warn(f"{where}: skipped: {problem}", TableWarning, stacklevel=2)
            continue
        raise UserError(f"{where}: {problem}")


def _read_ark(spec: str, target: str, permissive: bool, read_value=None, checker=None,
              holds: str = "matrices") -> Iterator[tuple[str, np.ndarray]]:
    read_value = read_value or _read_value
    checker = checker or _Checker(spec)
    try:
        fd = open_like_kaldi(target, "rb")
    except OSError as exc:
        raise UserError(f"{spec}: cannot read {target}: {exc.strerror or exc}") from None
    done = False
    try:
        entry, utt_id = 0, None
        while True:
            entry, prev = entry + 1, utt_id
            utt_id = None
            try:
                utt_id = _read_key(fd)
                if utt_id is None:
                    break
                value = read_value(fd)
            except _READ_ERRORS as exc:
                what = f"utterance {utt_id!r}" if utt_id is not None else (
                    f"the key after {prev!r}" if prev is not None else "the first key")
                problem = (f"entry {entry}: cannot read {what}: {_reason(exc)}; the archive is "
                           f"truncated or not a Kaldi archive of {holds}")
                if permissive:
                    warnings.warn(f"{spec}: {problem}; reading stops here", TableWarning,
                                  stacklevel=2)
                    break
                raise UserError(f"{spec}: {problem}") from None
            yield utt_id, checker(f"{spec}: entry {entry}: utterance {utt_id!r}", value)
        done = True
    finally:
        status = fd.close()
    if done and _is_pipe(target) and status:
        raise UserError(f"{spec}: the command exited with status {status >> 8}; run it alone "
                        "to see why")


def _read_key(fd: BinaryIO) -> str | None:
    """The next key of an archive (blanks before it skipped), None at its end."""
    while True:
        token = read_token(fd)
        if token is None:
            return None
        key = token.strip()
        if key:
            if any(c.isspace() for c in key):
                raise ValueError(f"key {key!r} holds whitespace")
            return key


def _read_value(fd: BinaryIO) -> np.ndarray:
    """A binary (``\\0B``) or text (``[``) matrix or vector after a key, by kaldiio's
    readers; anything else (a text float, kaldiio's pickle or numpy entries) is refused."""
    head = fd.read(1)
    while head in (b" ", b"\t", b"\r", b"\n"):
        head = fd.read(1)
    if not head:
        raise EOFError("the archive ends after the key")
    if head == b"[":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on empty text; the checks report it
            return read_ascii_mat(MultiFileDescriptor(io.BytesIO(head), fd))
    head += fd.read(2)
    if head == b"\0B\x04":
        raise ValueError("an integer vector, not a matrix")
    if head[:2] != b"\0B":
        shown = _one_line(repr((head + fd.read(12)).decode("latin-1")), 40)
        raise ValueError(f"expected a Kaldi matrix ('\\0B' binary or '[' text), got {shown}")
    # no seeking back: stdin and pipes work
    return read_matrix_or_vector(MultiFileDescriptor(io.BytesIO(head), fd))


class _Checker:
    """Features are 2-D matrices with frames, all of one dim; returns them float32."""

    def __init__(self, spec: str) -> None:
        self.spec, self.dim = spec, None

    def __call__(self, where: str, value) -> np.ndarray:
        if not isinstance(value, np.ndarray) or value.ndim != 2:
            what = (f"a vector of {value.shape[0]} values" if isinstance(value, np.ndarray)
                    and value.ndim == 1 else f"a {type(value).__name__}")
            raise UserError(f"{where}: is {what}, not a matrix; features must be a Kaldi "
                            "matrix, one row per frame")
        rows, cols = value.shape
        if rows == 0 or cols == 0:
            raise UserError(f"{where}: has no frames ({rows}x{cols} matrix); remove it from "
                            "the table")
        if self.dim is not None and cols != self.dim:
            raise UserError(f"{where}: has dim {cols} but earlier utterances have dim "
                            f"{self.dim}; all features must have the same dim")
        self.dim = cols
        with np.errstate(all="ignore"):  # values past float32 are for the frame checks
            feats = np.ascontiguousarray(value, dtype=np.float32)
        return feats if feats.flags.writeable else feats.copy()


def read_gselect(rspecifier: str) -> Iterator[tuple[str, np.ndarray]]:
    """Read a table of Gaussian selections, as ``gmm-gselect`` writes them (Kaldi's
    ``Int32VectorVectorWriter``: per utterance, each frame's selected Gaussians).

    Parameters
    ----------
    rspecifier : str
        ``ark:PATH``, ``ark:-``, ``ark:cmd |`` (``ark,s,cs:gunzip -c gselect.1.gz |``) or
        ``scp:PATH`` (entries ``utt ARK:OFFSET``), with Kaldi's options before the colon.

    Returns
    -------
    iterator of (str, ndarray)
        ``(utt_id, indices)``, indices int64 of shape (n_frames, N): the same N for every
        frame of an utterance (emdist's selected E-step needs it).

    Raises
    ------
    UserError
        As :func:`read_features`: one line naming the rspecifier and the entry.
    """
    options, target = _split_specifier(rspecifier, _READ_OPTIONS, GSELECT_USAGE)
    if not target or ("ark" in options) == ("scp" in options):
        raise UserError(f"{rspecifier}: {GSELECT_USAGE}")
    permissive = _last(options, "p") > _last(options, "np")
    if target != "-" and not _is_pipe(target) and not os.path.isfile(target):
        raise UserError(f"{rspecifier}: {target} not found (relative to {os.getcwd()}); "
                        "check the path")
    if "ark" in options:
        return _read_ark(rspecifier, target, permissive, _read_int_vectors,
                         _check_selection, "int32 vectors of vectors (gselect)")
    return _read_gselect_scp(rspecifier, _scp_entries(rspecifier, target))


def _read_gselect_scp(spec: str, entries) -> Iterator[tuple[str, np.ndarray]]:
    for lineno, utt_id, rx in entries:
        where = f"{spec}: line {lineno}: utterance {utt_id!r}"
        path, offset, ranges = parse_rxfilename(rx)
        if ranges or _is_pipe(rx):
            raise UserError(f"{where}: {rx!r}: a selection is read from an archive file and "
                            "offset (ARK:OFFSET), without ranges or commands")
        try:
            with open(path, "rb") as fd:
                if offset is not None:
                    fd.seek(offset)
                value = _read_int_vectors(fd)
        except _READ_ERRORS as exc:
            raise UserError(f"{where}: cannot read {rx}: {_reason(exc)}") from None
        yield utt_id, _check_selection(where, value)


def _read_int_vectors(fd: BinaryIO) -> np.ndarray:
    """One ``std::vector<std::vector<int32>>`` after a key, binary (``\\0B``, then each size
    and value as ``\\x04`` and 4 bytes) or text (``1 2 3 ; 4 5 6 ;`` to the end of the
    line), as a (frames, N) array; frames with different N are refused."""
    head = fd.read(1)
    while head in (b" ", b"\t"):
        head = fd.read(1)
    if not head:
        raise EOFError("the archive ends after the key")
    if head != b"\0":
        line = head + (fd.readline() if head != b"\n" else b"")
        pieces = line.decode("ascii").split(";")
        if pieces[-1].strip():
            raise ValueError(f"text after the last ';': {_one_line(pieces[-1].strip(), 40)!r}")
        rows = [[int(v) for v in piece.split()] for piece in pieces[:-1]]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("frames select different numbers of Gaussians")
        return np.array(rows, dtype=np.int64).reshape(len(rows), len(rows[0]) if rows else 0)
    if fd.read(1) != b"B":
        raise ValueError("expected '\\0B' (a binary value) or a text line")
    frames = _read_int(fd)
    if frames == 0:
        return np.zeros((0, 0), dtype=np.int64)
    n = _read_int(fd)
    raw = _read_exact(fd, frames * (1 + n) * 5 - 5)
    cells = np.frombuffer(b"\x04" + struct.pack("<i", n) + raw, dtype=np.uint8)
    cells = cells.reshape(frames, 1 + n, 5)
    if (cells[:, :, 0] != 4).any():
        raise ValueError("a size or value is not a 4-byte integer")
    values = np.ascontiguousarray(cells[:, :, 1:]).view("<i4")[:, :, 0]
    if (values[:, 0] != n).any():
        raise ValueError("frames select different numbers of Gaussians")
    return values[:, 1:].astype(np.int64)


def _read_exact(fd: BinaryIO, size: int, piece: int = 2**26) -> bytes:
    """``size`` bytes, read in pieces: a size read from damaged bytes is never allocated
    before the bytes are there."""
    pieces, left = [], size
    while left:
        data = fd.read(min(left, piece))
        if not data:
            raise EOFError("the value is truncated")
        pieces.append(data)
        left -= len(data)
    return b"".join(pieces)


def _read_int(fd: BinaryIO) -> int:
    raw = fd.read(5)
    if len(raw) != 5:
        raise EOFError("the value is truncated")
    if raw[0] != 4:
        raise ValueError(f"expected a 4-byte integer, got size byte {raw[0]}")
    value = struct.unpack("<i", raw[1:])[0]
    if value < 0:
        raise ValueError(f"negative size {value}")
    return value


def _check_selection(where: str, value: np.ndarray) -> np.ndarray:
    if len(value) == 0:
        raise UserError(f"{where}: selects nothing (no frames); remove it from the table")
    if value.shape[1] == 0:
        raise UserError(f"{where}: selects no Gaussian for its frames")
    if value.min() < 0:
        raise UserError(f"{where}: selects Gaussian {int(value.min())}; indices start at 0")
    return value


# -- writing -------------------------------------------------------------------------------

class _Output:
    """One output file, written under a temporary name in its directory; stdout; or the
    standard input of a command (``| gzip -c > out.gz``, as Kaldi's wxfilenames)."""

    def __init__(self, spec: str, path: str) -> None:
        self.spec, self.path, self.tmp, self.proc = spec, path, None, None
        self.pos = 0
        if path == "-":
            self.fh = sys.stdout.buffer
            return
        if path.strip().startswith("|"):
            command = path.strip()[1:].strip()
            if not command:
                raise UserError(f"{spec}: no command after '|'")
            self.proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE)
            self.fh = self.proc.stdin
            return
        if _is_pipe(path):
            raise UserError(f"{spec}: {path!r} reads from a command; an output command is "
                            "written '| command'")
        if os.path.isdir(path):
            raise UserError(f"{spec}: cannot write {path}: it is a directory; give a file name")
        try:
            fd, tmp = open_temp(Path(path))
        except OSError as exc:
            raise UserError(f"{spec}: cannot write {path}: {exc.strerror or exc}; check that "
                            "its directory exists and is writable") from None
        self.tmp, self.fh = tmp, os.fdopen(fd, "wb")

    def _failed(self, exc: OSError) -> Exception:
        """A write error as a WriteFailure naming the file; a reader of standard output that
        went away (``... ark,t:- | head``) stays a BrokenPipeError, which the CLI ends
        quietly, as Kaldi's tools and other Unix filters do; an output command that went
        away is named with its status."""
        if isinstance(exc, BrokenPipeError) and self.path == "-":
            return exc
        if self.proc is not None:
            return self._command_failed("stopped reading")
        return WriteFailure(self.path, exc.strerror or str(exc))

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except OSError as exc:
            raise self._failed(exc) from None
        self.pos += len(data)

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def _command_failed(self, what: str = "exited") -> UserError:
        try:
            status = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        return UserError(f"{self.spec}: the command {self.path.strip()[1:].strip()!r} {what} "
                         f"(exit status {status}); run it alone to see why")

    def finish(self) -> None:
        """Flush; a file is synced and renamed to its name; a command's input is closed
        and the command waited for (a status other than 0 is an error)."""
        if self.proc is not None:
            try:
                self.fh.close()
            except OSError:
                raise self._command_failed("stopped reading") from None
            if self.proc.wait() != 0:
                raise self._command_failed()
            return
        try:
            self.fh.flush()
            if self.tmp is not None:
                os.fsync(self.fh.fileno())
                self.fh.close()
                os.replace(self.tmp, self.path)
                self.tmp = None
        except OSError as exc:
            raise self._failed(exc) from None

    def discard(self) -> None:
        """Close and remove the temporary file (stdout is left alone); a command is ended
        (what it wrote is its own)."""
        if self.proc is not None:
            self.proc.kill()
            try:
                self.fh.close()
            except OSError:
                pass
            self.proc.wait()
            return
        if self.tmp is not None:
            try:
                self.fh.close()
            except OSError:
                pass
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


class TableWriter:
    """Write a Kaldi table of floats, float vectors or Gaussian selections to a wspecifier;
    a context manager.

    ``TableWriter("ark,t:likes.txt")`` with ``.write(key, value)`` for each utterance,
    ``value`` a float (Kaldi's ``BaseFloatWriter``), a 1-D vector written as float32
    (``BaseFloatVectorWriter``) or a 2-D integer array, one row per frame
    (``Int32VectorVectorWriter``, as ``gmm-gselect`` writes); one table holds one of these.
    Forms: ``ark:PATH``, ``ark,t:PATH``, ``ark:-`` and ``ark,t:-`` (stdout),
    ``ark:| command`` (the command's standard input, e.g. ``| gzip -c > out.gz``; a status
    other than 0 is an error), ``ark,scp:ARK,SCP`` and ``ark,t,scp:ARK,SCP`` (the scp names
    the archive as written in the wspecifier). Kaldi's ``b``, ``f`` (flush each entry),
    ``nf`` and ``p`` options are accepted.

    Files are written under a temporary name in their directory and renamed when the
    ``with`` block ends without an exception (or on :meth:`close`); an exception removes
    them (or :meth:`abort`). Output to stdout or a command is written as it comes (an
    exception ends the command).

    Raises
    ------
    UserError
        A bad wspecifier, an unwritable path (at construction), a key that is empty or
        holds whitespace (at :meth:`write`).
    WriteFailure
        Writing failed after the files were opened (no space left...).
    """

    def __init__(self, wspecifier: str) -> None:
        options, rest = _split_specifier(wspecifier, _WRITE_OPTIONS, WSPECIFIER_USAGE)
        if "ark" not in options:
            raise UserError(f"{wspecifier}: writing only an scp is not supported; "
                            "give ark:PATH or ark,scp:ARK,SCP")
        self.spec = wspecifier
        self.binary = _last(options, "b") >= _last(options, "t")
        self.flush = _last(options, "f") > _last(options, "nf")
        if "scp" in options:
            ark, comma, scp = rest.partition(",")
            if not comma or not ark or not scp:
                raise UserError(f"{wspecifier}: 'ark,scp:' needs two files, "
                                "ark,scp:ARK,SCP (archive first)")
            if ark == "-" or ark.strip().startswith("|"):
                raise UserError(f"{wspecifier}: an scp needs the archive's offsets; write "
                                "the archive to a file, not to stdout")
        else:
            ark, scp = rest, None
            if not ark:
                raise UserError(f"{wspecifier}: no file after ':'; {WSPECIFIER_USAGE}")
        self._kind: str | None = None
        self._closed = False
        self._ark = _Output(wspecifier, ark)
        try:
            self._scp = None if scp is None else _Output(wspecifier, scp)
        except BaseException:
            self._ark.discard()
            raise
        self._ark_name = ark

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, key: str, value: float | np.ndarray) -> None:
        """Append ``value`` under ``key``: a float, or a 1-D vector (written as float32)."""
        if self._closed:
            raise ValueError("TableWriter is closed")
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            raise UserError(f"{self.spec}: key {key!r} is empty or holds whitespace; Kaldi "
                            "keys are non-empty and without whitespace")
        kind, data = _encode(value, self.binary)
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            raise TypeError(f"a table holds one type: this one holds {self._kind}s, "
                            f"got a {kind} for {key!r}")
        self._ark.write(key.encode("utf-8") + b" ")
        offset = self._ark.pos
        self._ark.write(data)
        if self._scp is not None:
            self._scp.write(f"{key} {self._ark_name}:{offset}\n".encode())
        if self.flush:
            self._ark.flush()
            if self._scp is not None:
                self._scp.flush()

    def close(self) -> None:
        """Finish: flush, and rename files to their names (the archive first)."""
        if self._closed:
            return
        try:
            self._ark.finish()
            if self._scp is not None:
                self._scp.finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop what was written to files (their old content, if any, stays)."""
        self._ark.discard()
        if self._scp is not None:
            self._scp.discard()
        self._closed = True


def _encode(value, binary: bool) -> tuple[str, bytes]:
    """(``'float'``, ``'vector'`` or ``'selection'``, the bytes Kaldi writes for ``value``
    after the key); a selection is a 2-D integer array, one row per frame."""
    if isinstance(value, np.ndarray) and value.ndim == 2:
        if value.dtype.kind not in "iu":
            raise TypeError(f"a selection holds integers, got dtype {value.dtype}")
        return "selection", _encode_selection(value.astype("<i4"), binary)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        if value.dtype.kind not in "fiu":
            raise TypeError(f"a vector must hold numbers, got dtype {value.dtype}")
        with np.errstate(all="ignore"):
            vector = value.astype(np.float32)
        return "vector", (b"\0B" + format_binary_vector(vector) if binary
                          else format_text_vector(vector).encode())
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"a value is a float or a 1-D vector, got {type(value).__name__}"
                        + (f" of shape {value.shape}" if isinstance(value, np.ndarray) else ""))
    with np.errstate(all="ignore"):
        number = np.float32(value)
    if binary:
        return "float", b"\0B\x04" + number.astype("<f4").tobytes()
    return "float", f"{format_float(number)} \n".encode()


def _encode_selection(rows: np.ndarray, binary: bool) -> bytes:
    """Kaldi's ``BasicVectorVectorHolder<int32>``: binary, the frame count, then each frame's
    size and values, every integer as ``\\x04`` and 4 bytes; text, ``1 2 3 ; 4 5 6 ; ``
    and a newline (';' ends each frame's list)."""
    if not binary:
        return ("".join("".join(f"{v} " for v in row) + "; " for row in rows.tolist())
                + "\n").encode()
    frames, n = rows.shape
    cells = np.empty((frames, 1 + n, 5), dtype=np.uint8)
    cells[:, :, 0] = 4
    ints = np.empty((frames, 1 + n), dtype="<i4")
    ints[:, 0], ints[:, 1:] = n, rows
    cells[:, :, 1:] = ints.view(np.uint8).reshape(frames, 1 + n, 4)
    return b"\0B\x04" + struct.pack("<i", frames) + cells.tobytes()
