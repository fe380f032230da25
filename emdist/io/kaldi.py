"""Kaldi's global GMM files, both directions: ``<DiagGMM>`` and ``<FullGMM>``, text and binary.

Kaldi stores a GMM in its exponential form, float32 (``shared/notes/kaldi-gmm.md`` §1.4)::

    <DiagGMM> [<GCONSTS> vec] <WEIGHTS> vec <MEANS_INVVARS> K×D <INV_VARS> K×D </DiagGMM>
    <FullGMM> [<GCONSTS> vec] <WEIGHTS> vec <MEANS_INVCOVARS> K×D <INV_COVARS> K packed </FullGMM>

with ``means_invvars = μ/σ²``, ``inv_vars = 1/σ²``, ``means_invcovars = Σ⁻¹μ`` and the
inverse covariances as packed lower-triangular ``SpMatrix``. A binary file starts with
``\\0B``; a text file has no header. :func:`read_kaldi_model` tells them apart by content,
reads the values as float32 as Kaldi does and returns an emdist :class:`GMM` in float64.
``<GCONSTS>`` are optional and never trusted (Kaldi recomputes them on read too).
:func:`write_kaldi_model` writes Kaldi's own layout: normalised weights, gconsts computed as
Kaldi's ``ComputeGconsts`` does, text numbers as C++ writes them with precision 7.

Every malformed file is a :class:`UserError` naming the file and the byte offset; no array
is allocated larger than the file can hold.

To let :func:`emdist.io.modelio.load_models` read Kaldi models, register
:func:`read_kaldi_models` as ``FOREIGN_READERS["kaldi-model"]``.

Kaldi's accumulators (``gmm-global-acc-stats``, ``fgmm-global-acc-stats``, ``*-sum-accs``)
both directions too: :func:`read_kaldi_accs` / :func:`write_kaldi_accs` (and
:func:`read_kaldi_stats`, the ``FOREIGN_READERS["kaldi-stats"]`` reader behind
:func:`emdist.io.modelio.load_stats`)::

    <GMMACCS> <VECSIZE> D <NUMCOMPONENTS> K <FLAGS> f <OCCUPANCY> vec <MEANACCS> K×D
              <DIAGVARACCS> K×D </GMMACCS>                      (AccumDiagGmm)
    <GMMACCS> ... <MEANACCS> K×D [<FULLVARACCS> K packed] </GMMACCS>  (AccumFullGmm)

Both start with ``<GMMACCS>`` (Kaldi has no ``<FULLGMMACCS>`` token) and write the flags
as a ``uint16`` (binary ``\\xFE`` + 2 bytes); the variance token tells diag from full.
Values are float32 (Kaldi sums in double, writes float); full second-order sums are stored
centred. :func:`kaldi_file_kind` tells a Kaldi model from Kaldi accumulators.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emdist.errors import EmdistWarning, UserError
from emdist.models.gmm import GMM
from emdist.models.mstep import augment_flags
from emdist.models.stats import GmmStats

GLOBAL_LABEL = "global"
_BINARY_HEADER = b"\0B"
_WHITESPACE = b" \t\n\r\v\f"
_NUMBER = re.compile(rb"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(rb"-?[A-Za-z]+")
_WORDS = {b"inf": math.inf, b"infinity": math.inf, b"nan": math.nan}
_M_LOG_2PI = 1.8378770664093454835606594728112  # Kaldi's M_LOG_2PI
_F32_MAX = float(np.finfo(np.float32).max)
_BEGIN = {b"<DiagGMM>": "diag", b"<DiagGMMBegin>": "diag",
          b"<FullGMM>": "full", b"<FullGMMBegin>": "full"}
_END = {"diag": (b"</DiagGMM>", b"<DiagGMMEnd>"), "full": (b"</FullGMM>", b"<FullGMMEnd>")}
_NAMES = {"diag": ("<MEANS_INVVARS>", "<INV_VARS>"), "full": ("<MEANS_INVCOVARS>", "<INV_COVARS>")}
_ACCS_BEGIN = b"<GMMACCS>"  # AccumDiagGmm and AccumFullGmm alike


def _show(raw: bytes, limit: int = 24) -> str:
    text = raw[:limit].decode("latin-1")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return repr(text + ("..." if len(raw) > limit else ""))


class _Reader:
    """Kaldi's ``ReadToken`` and ``Vector``/``Matrix``/``SpMatrix`` ``Read``, text or binary,
    over the bytes of one file; every failure is a UserError naming the file and offset."""

    def __init__(self, path: Path, data: bytes, what: str = "GMM file",
                 keep_double: bool = False) -> None:
        self.path, self.data = path, data
        self.what = what  # for messages: "GMM file", "accumulator file"
        self.keep_double = keep_double  # DV/DM/DP stay float64 (Kaldi's double accumulators)
        self.binary = data.startswith(_BINARY_HEADER)
        self.pos = 2 if self.binary else 0

    def fail(self, message: str, pos: int | None = None):
        where = self.pos if pos is None else pos
        kind = "binary" if self.binary else "text"
        raise UserError(f"{self.path}: not a valid Kaldi {kind} {self.what}: {message} "
                        f"(at byte {where})")

    def skip_space(self) -> None:
        data, pos = self.data, self.pos
        while pos < len(data) and data[pos] in _WHITESPACE:
            pos += 1
        self.pos = pos

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def token(self) -> bytes:
        """A token: non-blank bytes after optional blanks, then one blank (or the end)."""
        self.skip_space()
        start, data = self.pos, self.data
        if start >= len(data):
            self.fail("unexpected end of file, expected a token")
        end = start
        while end < len(data) and data[end] not in _WHITESPACE:
            end += 1
        self.pos = end + 1 if end < len(data) else end
        return data[start:end]

    def expect(self, token: str) -> None:
        start = self.pos
        got = self.token()
        if got != token.encode():
            self.fail(f"expected {token}, got {_show(got)}", start)

    # -- binary ----------------------------------------------------------------------------
    def int32(self) -> int:
        start = self.pos
        raw = self.data[start:start + 5]
        if len(raw) < 5:
            self.fail("unexpected end of file in a size", start)
        if raw[0] != 4:
            self.fail(f"expected a 4-byte integer, got size byte {raw[0]}", start)
        self.pos += 5
        value = int.from_bytes(raw[1:], "little", signed=True)
        if value < 0:
            self.fail(f"negative size {value}", start)
        return value

    def binary_values(self, kinds: tuple[bytes, bytes], shape_of) -> np.ndarray:
        """``F<x>``/``D<x>`` token, sizes (``shape_of`` reads them), then the raw values."""
        start = self.pos
        self.skip_space()  # (peek() is -1 at the end, which ``in bytes`` refuses)
        got = self.token()
        if got not in kinds:
            self.fail(f"expected {kinds[0].decode()} or {kinds[1].decode()}, got {_show(got)}",
                      start)
        dtype = np.dtype("<f4") if got == kinds[0] else np.dtype("<f8")
        shape, count = shape_of()
        nbytes = count * dtype.itemsize
        if nbytes > len(self.data) - self.pos:
            self.fail(f"{got.decode()} of {count} values needs {nbytes} bytes, the file has "
                      f"{len(self.data) - self.pos} left", start)
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += nbytes
        out = np.float64 if self.keep_double and dtype.itemsize == 8 else np.float32
        return values.astype(out).reshape(shape)

    def basic_int(self, size: int, what: str) -> int:
        """Kaldi's ``ReadBasicType`` of an integer: ``int32`` (``size`` 4) or ``uint16``
        (``size`` -2: unsigned, written with size byte ``\\xFE``); text: a decimal token."""
        start = self.pos
        nbytes, signed = abs(size), size > 0
        low, high = (-(1 << (8 * nbytes - 1)), (1 << (8 * nbytes - 1)) - 1) if signed else \
            (0, (1 << (8 * nbytes)) - 1)
        if self.binary:
            raw = self.data[start:start + 1 + nbytes]
            if len(raw) < 1 + nbytes:
                self.fail(f"unexpected end of file in {what}", start)
            if raw[0] != size & 0xFF:
                self.fail(f"{what}: expected size byte {size & 0xFF} ({size}), got {raw[0]}",
                          start)
            self.pos += 1 + nbytes
            return int.from_bytes(raw[1:], "little", signed=signed)
        got = self.token()
        if not re.fullmatch(rb"[-+]?\d{1,20}", got) or not low <= int(got) <= high:
            self.fail(f"{what}: expected an integer in [{low}, {high}], got {_show(got)}", start)
        return int(got)

    # -- text ------------------------------------------------------------------------------
    def text_number(self, row_ends: bytes) -> float:
        start, data = self.pos, self.data
        match = _NUMBER.match(data, start)
        if match is not None and data[start] not in b".":
            value = float(match.group())
        else:
            match = _WORD.match(data, start)
            word = match.group().lower() if match else b""
            sign = -1.0 if word.startswith(b"-") else 1.0
            if word.lstrip(b"-") not in _WORDS:
                end = start
                while end < len(data) and data[end] not in _WHITESPACE + b"]":
                    end += 1
                self.fail(f"expecting numeric data, got {_show(data[start:end])}", start)
            value = sign * _WORDS[word.lstrip(b"-")]
        end = match.end()
        if end < len(data) and data[end] not in _WHITESPACE + b"]" + row_ends:
            self.fail(f"expected a blank after the number {_show(data[start:end + 1])}", start)
        if math.isfinite(value) and abs(value) > _F32_MAX:
            self.fail(f"number {match.group().decode()} is out of range for float32", start)
        self.pos = end
        return value

    def open_bracket(self) -> bool:
        """Reads ``[`` (True) or ``[]`` (False: empty)."""
        self.skip_space()
        start, data = self.pos, self.data
        end = start
        while end < len(data) and data[end] not in _WHITESPACE:
            end += 1
        got = data[start:end]
        if got == b"[]":
            self.pos = end
            return False
        if got != b"[":
            self.fail(f"expected '[', got {_show(got)}" if got else "unexpected end of file",
                      start)
        self.pos = end
        return True

    def after_bracket(self) -> None:
        if self.data[self.pos:self.pos + 2] == b"\r\n":
            self.pos += 2
        elif self.data[self.pos:self.pos + 1] == b"\n":
            self.pos += 1

    def text_vector(self) -> np.ndarray:
        values: list[float] = []
        if self.open_bracket():
            while True:
                c = self.peek()
                if c == -1:
                    self.fail("end of file inside a vector")
                if c in b" \t\v\f":
                    self.pos += 1
                elif c in b"\n\r":
                    self.fail("newline inside a vector")
                elif c == ord("]"):
                    self.pos += 1
                    self.after_bracket()
                    break
                else:
                    values.append(self.text_number(b""))
        return np.array(values, dtype=np.float32)

    def text_rows(self) -> list[list[float]]:
        rows: list[list[float]] = [[]]
        if not self.open_bracket():
            return []
        while True:
            c = self.peek()
            if c == -1:
                self.fail("end of file inside a matrix")
            if c in b" \t\v\f\r":
                self.pos += 1
            elif c in b"\n;":
                self.pos += 1
                if rows[-1]:
                    rows.append([])
            elif c == ord("]"):
                self.pos += 1
                self.after_bracket()
                break
            else:
                rows[-1].append(self.text_number(b";"))
        return rows if rows[-1] else rows[:-1]

    # -- objects ---------------------------------------------------------------------------
    def vector(self) -> np.ndarray:
        if not self.binary:
            return self.text_vector()

        def shape():
            n = self.int32()
            return (n,), n
        return self.binary_values((b"FV", b"DV"), shape)

    def matrix(self) -> np.ndarray:
        start = self.pos
        if not self.binary:
            rows = self.text_rows()
            widths = {len(r) for r in rows}
            if len(widths) > 1:
                self.fail(f"matrix rows of different lengths {sorted(widths)}", start)
            return np.array(rows, dtype=np.float32).reshape(len(rows), widths.pop() if rows else 0)

        def shape():
            r, c = self.int32(), self.int32()
            return (r, c), r * c
        return self.binary_values((b"FM", b"DM"), shape)

    def packed(self) -> np.ndarray:
        """A packed lower-triangular ``SpMatrix``, as a full symmetric float32 matrix."""
        start = self.pos
        if not self.binary:
            rows = self.text_rows()
            for i, row in enumerate(rows):
                if len(row) != i + 1:
                    self.fail(f"packed matrix row {i} has {len(row)} values, not {i + 1}", start)
            flat = np.array([v for row in rows for v in row], dtype=np.float32)
            n = len(rows)
        else:
            holder = {}

            def shape():
                holder["n"] = self.int32()
                count = holder["n"] * (holder["n"] + 1) // 2
                return (count,), count
            flat = self.binary_values((b"FP", b"DP"), shape)
            n = holder["n"]
        full = np.zeros((n, n), dtype=np.float32)
        rows_i, cols_i = np.tril_indices(n)
        full[rows_i, cols_i] = flat
        full[cols_i, rows_i] = flat
        return full


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    """The file's bytes (the first ``limit``); a missing or unreadable file is a UserError."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a Kaldi model or accumulator file") \
            from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse(path: Path, data: bytes) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """``(covariance_type, weights, means_inv, inv)`` as float32, shapes checked."""
    r = _Reader(path, data)
    start = r.pos
    first = r.token()
    cov_type = _BEGIN.get(first)
    if cov_type is None:
        other = " (a Kaldi object, but not a global GMM)" if first.startswith(b"<") else ""
        if first == _ACCS_BEGIN:
            other = " (Kaldi accumulators, gmm-global-acc-stats output, not a model)"
        r.fail(f"expected <DiagGMM> or <FullGMM>, got {_show(first)}{other}", start)
    start = r.pos
    token = r.token()
    gconsts = None
    if token == b"<GCONSTS>":
        gconsts = r.vector()
        start = r.pos
        token = r.token()
    if token != b"<WEIGHTS>":
        r.fail(f"expected <GCONSTS> or <WEIGHTS>, got {_show(token)}", start)
    weights = r.vector()
    means_name, inv_name = _NAMES[cov_type]
    r.expect(means_name)
    start = r.pos
    means_inv = r.matrix()
    k = len(weights)
    if k == 0:
        r.fail("the model has no Gaussians (empty <WEIGHTS>)", start)
    if means_inv.shape[0] != k or means_inv.shape[1] == 0:
        r.fail(f"{means_name} is {means_inv.shape[0]}x{means_inv.shape[1]}, expected {k} rows "
               "(one per weight) of at least one value", start)
    d = means_inv.shape[1]
    if gconsts is not None and len(gconsts) != k:
        r.fail(f"<GCONSTS> has {len(gconsts)} values but <WEIGHTS> has {k}")
    r.expect(inv_name)
    if cov_type == "diag":
        start = r.pos
        inv = r.matrix()
        if inv.shape != (k, d):
            r.fail(f"<INV_VARS> is {inv.shape[0]}x{inv.shape[1]}, expected {k}x{d}", start)
    else:
        inv = np.empty((k, d, d), dtype=np.float32)
        for c in range(k):
            start = r.pos
            prec = r.packed()
            if prec.shape != (d, d):
                r.fail(f"inverse covariance {c} is {len(prec)}x{len(prec)}, expected {d}x{d}",
                       start)
            inv[c] = prec
    start = r.pos
    end = r.token()
    if end not in _END[cov_type]:
        r.fail(f"expected {_END[cov_type][0].decode()}, got {_show(end)}", start)
    r.skip_space()
    if r.pos != len(data):
        r.fail(f"unexpected data after {end.decode()}: {_show(data[r.pos:])}")
    return cov_type, weights, means_inv, inv


class KaldiWeightsWarning(EmdistWarning):
    """A Kaldi model's weights do not sum to one. Kaldi reads such a file as it is, and
    ``gmm-global-est --remove-low-count-gaussians=false`` writes one when it floors the
    weights of starved Gaussians at ``--min-gaussian-weight`` (up to K times that over one);
    emdist reads it normalised, which shifts every log-likelihood by the same amount."""


def _fail(path: Path, message: str):
    raise UserError(f"{path}: not a usable Kaldi GMM: {message}")


@np.errstate(all="ignore")
def _to_gmm(path: Path, cov_type, weights, means_inv, inv) -> GMM:
    w = weights.astype(np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        bad = int(np.argmax(~np.isfinite(w) | (w < 0)))
        _fail(path, f"weight of Gaussian {bad} is {w[bad]:g}")
    total = w.sum()
    if not total > 0:
        _fail(path, "every weight is 0")
    if abs(total - 1.0) > 1e-4:
        warnings.warn(f"{path}: weights sum to {total:.7g}, not 1; read normalised, so "
                      f"each frame's log-likelihood is Kaldi's {-math.log(total):+.4g}",
                      KaldiWeightsWarning, stacklevel=3)
    w = w / total
    b = means_inv.astype(np.float64)
    if not np.isfinite(b).all():
        k = int(np.argwhere(~np.isfinite(b))[0][0])
        _fail(path, f"{_NAMES[cov_type][0]} of Gaussian {k} holds NaN or inf")
    if cov_type == "diag":
        iv = inv.astype(np.float64)
        bad = ~(np.isfinite(iv) & (iv > 0))
        if bad.any():
            k, d = (int(i) for i in np.argwhere(bad)[0])
            _fail(path, f"inverse variance of Gaussian {k} (dim {d}) is {iv[k, d]:g}, "
                        "not a positive number")
        return GMM(w, b / iv, 1.0 / iv, "diag")
    k, d = b.shape
    means = np.empty((k, d))
    covs = np.empty((k, d, d))
    eye = np.eye(d)
    for c in range(k):
        prec = inv[c].astype(np.float64)
        if not np.isfinite(prec).all():
            _fail(path, f"inverse covariance of Gaussian {c} holds NaN or inf")
        try:
            chol = np.linalg.cholesky(prec)
        except np.linalg.LinAlgError:
            _fail(path, f"inverse covariance of Gaussian {c} is not positive definite")
        inv_chol = np.linalg.solve(chol, eye)
        cov = inv_chol.T @ inv_chol
        covs[c] = 0.5 * (cov + cov.T)
        means[c] = covs[c] @ b[c]
    return GMM(w, means, covs, "full")


def read_kaldi_model(path: str | os.PathLike) -> GMM:
    """Read a Kaldi ``<DiagGMM>`` or ``<FullGMM>`` file, text or binary (told apart by the
    ``\\0B`` header), as an emdist :class:`GMM` (float64 from Kaldi's float32).

    Raises :class:`UserError` naming the file (and the byte offset) for anything malformed:
    truncated, another Kaldi object, sizes that do not agree, non-numbers, inverse
    variances that are not positive, negative weights or weights that are all 0.
    Weights that do not sum to one are read normalised, with a :class:`KaldiWeightsWarning`
    when they are more than 1e-4 off.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        parsed = _parse(path, data)
        gmm = _to_gmm(path, *parsed)
    except UserError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError, MemoryError) as exc:
        raise UserError(f"{path}: corrupt Kaldi GMM file ({type(exc).__name__}: {exc})") \
            from None
    from emdist.io.modelio import check_models

    check_models({GLOBAL_LABEL: gmm}, path)
    return gmm


def read_kaldi_models(path: str | os.PathLike, label: str = GLOBAL_LABEL) -> dict:
    """``{label: read_kaldi_model(path)}``: the shape of a ``FOREIGN_READERS`` reader."""
    return {label: read_kaldi_model(path)}


# -- writing ------------------------------------------------------------------------------

def _logf(x: np.ndarray) -> np.ndarray:
    """C's ``logf`` of float32 values: the correctly rounded float32 logarithm."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x.astype(np.float64)).astype(np.float32)


def _base_gconsts(weights: np.ndarray, dim: int) -> np.ndarray:
    """``Log(weights_(mix)) + offset`` in float arithmetic, as Kaldi's ComputeGconsts."""
    offset = np.float32(-0.5 * _M_LOG_2PI * dim)
    return (_logf(weights) + offset).astype(np.float32)


def kaldi_diag_gconsts(weights, means_invvars, inv_vars) -> np.ndarray:
    """``DiagGmm::ComputeGconsts`` of float32 parameters, step for step: a float ``gc``
    plus, per dimension, a double ``0.5*Log(iv) - 0.5*miv*miv/iv`` rounded back."""
    gc = _base_gconsts(np.asarray(weights, np.float32), np.shape(means_invvars)[1])
    miv = np.asarray(means_invvars, np.float32).astype(np.float64)
    iv = np.asarray(inv_vars, np.float32)
    log_iv = _logf(iv).astype(np.float64)
    iv = iv.astype(np.float64)
    with np.errstate(all="ignore"):
        for d in range(miv.shape[1]):
            term = 0.5 * log_iv[:, d] - 0.5 * miv[:, d] * miv[:, d] / iv[:, d]
            gc = (gc.astype(np.float64) + term).astype(np.float32)
    return np.where(np.isposinf(gc), -gc, gc).astype(np.float32)


def kaldi_full_gconsts(weights, means_invcovars, inv_covars) -> np.ndarray:
    """``FullGmm::ComputeGconsts`` of float32 parameters: the covariance is the inverse
    (in double) rounded to float, its log-determinant from a Cholesky factor, and
    ``gc -= 0.5 * (logdet + b'Σb)``. Kaldi's float BLAS sums in its own order, so the last
    bit can differ from Kaldi's file (the text form, 7 digits, almost always agrees)."""
    weights = np.asarray(weights, np.float32)
    b = np.asarray(means_invcovars, np.float32)
    gc = _base_gconsts(weights, b.shape[1])
    out = np.empty_like(gc)
    for c, prec in enumerate(np.asarray(inv_covars, np.float32)):
        cov = np.linalg.inv(prec.astype(np.float64)).astype(np.float32)
        chol = np.linalg.cholesky(cov.astype(np.float64)).astype(np.float32)
        logdet = np.float32(2.0 * np.log(np.diagonal(chol).astype(np.float64)).sum())
        quad = np.float32(b[c] @ (cov @ b[c]))
        out[c] = np.float32(float(gc[c]) - 0.5 * float(np.float32(logdet + quad)))
    return out


def _kaldi_arrays(gmm: GMM) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(gconsts, weights, means_inv, inv)`` in float32, weights normalised."""
    w = np.asarray(gmm.weights, np.float64)
    w32 = (w / w.sum()).astype(np.float32)
    if gmm.covariance_type == "diag":
        var = np.asarray(gmm.covariances, np.float64)
        iv = (1.0 / var).astype(np.float32)
        miv = (gmm.means / var).astype(np.float32)
        return kaldi_diag_gconsts(w32, miv, iv), w32, miv, iv
    k, d = gmm.means.shape
    prec = np.empty((k, d, d))
    eye = np.eye(d)
    for c in range(k):
        chol = np.linalg.cholesky(gmm.covariances[c])
        inv_chol = np.linalg.solve(chol, eye)
        p = inv_chol.T @ inv_chol
        prec[c] = 0.5 * (p + p.T)
    b32 = np.einsum("kij,kj->ki", prec, gmm.means).astype(np.float32)
    prec32 = prec.astype(np.float32)
    return kaldi_full_gconsts(w32, b32, prec32), w32, b32, prec32


def format_float(x) -> str:
    """A float32 value as C++'s ``operator<<`` writes it at precision 7."""
    v = float(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.7g}"


def format_text_vector(v: np.ndarray) -> str:
    """A vector as Kaldi's text writer puts it: `` [ 1 2.5 ]`` and a newline."""
    return " [ " + "".join(format_float(x) + " " for x in v) + "]\n"


def _text_matrix(m: np.ndarray) -> str:
    if m.size == 0:
        return " [ ]\n"
    return " [" + "".join("\n  " + "".join(format_float(x) + " " for x in row) for row in m) + "]\n"


def _text_packed(p: np.ndarray) -> str:
    n = len(p)
    rows = ["".join(format_float(p[i, j]) + " " for j in range(i + 1)) for i in range(n)]
    return "[\n" + "\n".join(rows) + "]\n"


def _bin_token(t: str) -> bytes:
    return t.encode() + b" "


def _bin_int(n: int) -> bytes:
    return b"\x04" + int(n).to_bytes(4, "little", signed=True)


def format_binary_vector(v: np.ndarray) -> bytes:
    """A float32 vector as Kaldi's binary writer puts it (``FV``, its size, the values)."""
    return b"FV " + _bin_int(len(v)) + np.ascontiguousarray(v, "<f4").tobytes()


def _bin_matrix(m: np.ndarray) -> bytes:
    return b"FM " + _bin_int(m.shape[0]) + _bin_int(m.shape[1]) + \
        np.ascontiguousarray(m, "<f4").tobytes()


def _bin_packed(p: np.ndarray) -> bytes:
    rows, cols = np.tril_indices(len(p))
    return b"FP " + _bin_int(len(p)) + np.ascontiguousarray(p[rows, cols], "<f4").tobytes()


def kaldi_model_bytes(gmm: GMM, binary: bool = True) -> bytes:
    """The bytes of ``gmm`` as Kaldi's ``DiagGmm::Write`` / ``FullGmm::Write`` produce them."""
    gconsts, weights, means_inv, inv = _kaldi_arrays(gmm)
    diag = gmm.covariance_type == "diag"
    begin, end = ("<DiagGMM>", "</DiagGMM>") if diag else ("<FullGMM>", "</FullGMM>")
    means_name, inv_name = _NAMES[gmm.covariance_type]
    if binary:
        out = [_BINARY_HEADER, _bin_token(begin), _bin_token("<GCONSTS>"),
               format_binary_vector(gconsts), _bin_token("<WEIGHTS>"),
               format_binary_vector(weights), _bin_token(means_name), _bin_matrix(means_inv),
               _bin_token(inv_name)]
        out += [_bin_matrix(inv)] if diag else [_bin_packed(p) for p in inv]
        out.append(_bin_token(end))
        return b"".join(out)
    text = [begin, " \n<GCONSTS> ", format_text_vector(gconsts), "<WEIGHTS> ",
            format_text_vector(weights), means_name, " ", _text_matrix(means_inv), inv_name, " "]
    text += [_text_matrix(inv)] if diag else [_text_packed(p) for p in inv]
    text += [end, " \n"]
    return "".join(text).encode("ascii")


def write_kaldi_model(path: str | os.PathLike, gmm: GMM, binary: bool = True) -> None:
    """Write ``gmm`` as a Kaldi model file (binary by default, as Kaldi), atomically."""
    from emdist.io.modelio import atomic_write_bytes

    if not isinstance(gmm, GMM):
        raise UserError(f"{path}: Kaldi model files hold GMMs, not {type(gmm).__name__}")
    atomic_write_bytes(path, kaldi_model_bytes(gmm, binary))


# -- accumulators: AccumDiagGmm and AccumFullGmm ------------------------------------------

_FLAG_BITS = {"m": 1, "v": 2, "w": 4, "t": 8}  # kGmmMeans, kGmmVariances, kGmmWeights, ...
_FLAGS_ALL = 15  # kGmmAll, the letter "a"
_ACCS_TOKENS = (b"<OCCUPANCY>", b"<MEANACCS>", b"<DIAGVARACCS>", b"<FULLVARACCS>")
_WHITESPACE_END = tuple(bytes([c]) for c in _WHITESPACE)
_MAX_ZERO_VALUES = 1 << 25
"""The most values of zero statistics made up for orders a file does not hold (flags
without ``m`` or ``v``): their size is only a header number, not bytes of the file."""


@dataclass(frozen=True)
class KaldiAccs:
    """A Kaldi accumulator file (``gmm-global-acc-stats``, ``fgmm-global-acc-stats``, their
    ``-sum-accs``) as emdist statistics.

    ``stats`` holds the occupancies, Σγx and the uncentred Σγx² (diag) or Σγxxᵀ (full) in
    float64; orders the flags leave out (no ``m`` or no ``v``) are zeros of the right
    shape. Kaldi's accumulators carry no log-likelihood and no frame count: ``loglike`` is
    0.0 and ``frames`` is the occupancy sum rounded to an integer (the frame count when
    every frame has posterior mass one). ``flags`` are Kaldi's letters in Kaldi's order
    (``GmmFlagsToString``: m, v, w, t), e.g. ``"mvw"``.
    """

    stats: GmmStats
    flags: str


def _augment_flags(bits: int) -> int:
    """Kaldi's ``AugmentGmmFlags``: v implies m, m implies w."""
    if bits & 2:
        bits |= 1
    if bits & 1:
        bits |= 4
    return bits


def kaldi_flags_bits(flags: str) -> int:
    """Kaldi's ``StringToGmmFlags`` then ``AugmentGmmFlags`` (letters m, v, w, t, a in any
    order; ``"mvw"`` and ``"v"`` are both 7), as :func:`emdist.models.mstep.augment_flags`
    reads them. Raises UserError for other letters."""
    return sum(_FLAG_BITS[c] for c in augment_flags(flags))


def kaldi_flags_string(bits: int) -> str:
    """Kaldi's ``GmmFlagsToString``: ``7`` is ``"mvw"``."""
    return "".join(c for c, b in _FLAG_BITS.items() if bits & b)


def kaldi_file_kind(path: str | os.PathLike) -> str | None:
    """``"model"`` for a Kaldi ``<DiagGMM>``/``<FullGMM>`` file, ``"accs"`` for Kaldi
    accumulators (``<GMMACCS>``, diag or full), None for anything else (e.g. an emdist
    file), by the first token, text or binary. A missing or unreadable file is a UserError."""
    head = _read_bytes(Path(path), 64)
    body = head[2:] if head.startswith(_BINARY_HEADER) else head
    words = body.split(None, 1)
    first = words[0] if words else b""
    if first in _BEGIN:
        return "model"
    if first == _ACCS_BEGIN:
        return "accs"
    return None


def _check_finite(r: _Reader, values: np.ndarray, name: str, start: int) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        where = np.argwhere(bad)[0]
        at = f" (row {where[0]})" if values.ndim > 1 else f" (value {where[0]})"
        r.fail(f"{name} holds NaN or inf{at}", start)


def _parse_accs(path: Path, data: bytes):
    """``(covariance_type, flag bits, K, D, occupancy, means, second)``, shapes checked; absent
    orders are None; full second-order statistics are un-centred as Kaldi's Read does."""
    r = _Reader(path, data, "accumulator file", keep_double=True)
    start = r.pos
    first = r.token()
    if first != _ACCS_BEGIN:
        if first in _BEGIN:
            why = " (a Kaldi GMM model, not accumulators)"
        elif first == b"<FULLGMMACCS>":
            why = " (Kaldi writes full-covariance accumulators with <GMMACCS> too)"
        elif first.startswith(b"<"):
            why = " (a Kaldi object, but not GMM accumulators)"
        else:
            why = ""
        r.fail(f"expected <GMMACCS>, got {_show(first)}{why}", start)
    r.expect("<VECSIZE>")
    start = r.pos
    dim = r.basic_int(4, "<VECSIZE>")
    if dim <= 0:
        r.fail(f"<VECSIZE> is {dim}, not a positive dimension", start)
    r.expect("<NUMCOMPONENTS>")
    start = r.pos
    k = r.basic_int(4, "<NUMCOMPONENTS>")
    if k <= 0:
        r.fail(f"<NUMCOMPONENTS> is {k}, not a positive number of Gaussians", start)
    r.expect("<FLAGS>")
    start = r.pos
    raw_flags = r.basic_int(-2, "<FLAGS>")
    bits = _augment_flags(raw_flags)
    if raw_flags & ~_FLAGS_ALL or not bits & 4:
        r.fail(f"<FLAGS> {raw_flags} are not Kaldi GMM flags (m=1 v=2 w=4 t=8, at least w)",
               start)
    flag_text = kaldi_flags_string(bits)
    want_means, want_vars = bool(bits & 1), bool(bits & 2)

    occ = means = second = None
    cov_type = None
    seen: set[bytes] = set()
    while True:
        start = r.pos
        token = r.token()
        if token == b"</GMMACCS>":
            if r.pos == len(data) and not data.endswith(_WHITESPACE_END):
                r.fail("no blank after </GMMACCS> (the file is cut short)", start)
            break
        if token not in _ACCS_TOKENS:
            r.fail(f"expected one of {', '.join(t.decode() for t in _ACCS_TOKENS)} or "
                   f"</GMMACCS>, got {_show(token)}", start)
        if token in seen or (token.endswith(b"VARACCS>") and cov_type is not None):
            r.fail(f"a second {token.decode()}" if token in seen else
                   "both <DIAGVARACCS> and <FULLVARACCS>", start)
        seen.add(token)
        start = r.pos
        if token == b"<OCCUPANCY>":
            occ = r.vector()
            if occ.shape != (k,):
                r.fail(f"<OCCUPANCY> has {len(occ)} values but <NUMCOMPONENTS> is {k}", start)
            _check_finite(r, occ, "<OCCUPANCY>", start)
        elif token in (b"<MEANACCS>", b"<DIAGVARACCS>"):
            mat = r.matrix()
            wanted = want_means if token == b"<MEANACCS>" else want_vars
            shape = (k, dim) if wanted else (0, 0)
            if mat.shape != shape:
                expect = f"{k}x{dim} (<NUMCOMPONENTS> x <VECSIZE>)" if wanted else \
                    f"empty (flags {flag_text!r})"
                r.fail(f"{token.decode()} is {mat.shape[0]}x{mat.shape[1]}, expected {expect}",
                       start)
            _check_finite(r, mat, token.decode(), start)
            if token == b"<MEANACCS>":
                means = mat if wanted else None
            else:
                cov_type, second = "diag", (mat if wanted else None)
        else:  # <FULLVARACCS>: K packed matrices, centred (AccumFullGmm::Write)
            if not want_vars:
                r.fail(f"<FULLVARACCS> with flags {flag_text!r} (no variances)", start)
            if occ is None or means is None:
                r.fail("<FULLVARACCS> before <OCCUPANCY> and <MEANACCS> (Kaldi needs both to "
                       "un-centre it)", start)
            full = []
            for c in range(k):
                start = r.pos
                centred = r.packed()
                if centred.shape != (dim, dim):
                    r.fail(f"<FULLVARACCS> matrix {c} is {len(centred)}x{len(centred)}, "
                           f"expected {dim}x{dim} (<VECSIZE>)", start)
                _check_finite(r, centred, f"<FULLVARACCS> matrix {c}", start)
                full.append(_uncentre(centred, means[c], occ[c]))
            cov_type, second = "full", np.stack(full)
    r.skip_space()
    if r.pos != len(data):
        r.fail(f"unexpected data after </GMMACCS>: {_show(data[r.pos:])}")
    if occ is None:
        r.fail("no <OCCUPANCY> before </GMMACCS>")
    if want_means and means is None:
        r.fail(f"no <MEANACCS> before </GMMACCS> (flags {flag_text!r})")
    if want_vars and second is None:
        r.fail(f"no <DIAGVARACCS> or <FULLVARACCS> before </GMMACCS> (flags {flag_text!r})")
    cov_type = cov_type or "full"  # only AccumFullGmm leaves the variance token out
    zeros = k * dim * (dim if cov_type == "full" else 1) * (second is None) + \
        k * dim * (means is None)
    if zeros > _MAX_ZERO_VALUES:
        r.fail(f"flags {flag_text!r} with <NUMCOMPONENTS> {k} and <VECSIZE> {dim} would need "
               f"{zeros} zero statistics the file does not hold (more than {_MAX_ZERO_VALUES})")
    return cov_type, bits, k, dim, occ, means, second


def _uncentre(centred: np.ndarray, mean: np.ndarray, occ) -> np.ndarray:
    """``AccumFullGmm::Read``: ``Σγxxᵀ = C + (1/occ)·mmᵀ`` in double, when occ ≠ 0."""
    out = centred.astype(np.float64)
    if occ != 0:
        m = mean.astype(np.float64)
        out = out + np.outer(m, (1.0 / float(occ)) * m)
        low = np.tril(out)
        out = low + np.tril(out, -1).T
    return out


def read_kaldi_accs(path: str | os.PathLike) -> KaldiAccs:
    """Read a Kaldi accumulator file (``<GMMACCS>``, as written by ``gmm-global-acc-stats``,
    ``fgmm-global-acc-stats`` and their ``-sum-accs``), text or binary (told apart by the
    ``\\0B`` header), diagonal (``<DIAGVARACCS>``) or full (``<FULLVARACCS>``, stored centred
    and un-centred here as Kaldi's ``Read`` does).

    Float (``FV``/``FM``/``FP``, what Kaldi writes) and double (``DV``/``DM``/``DP``) values
    are accepted, double kept as double. Text numbers are read as float32: Kaldi writes its
    float32 values with 7 significant digits, so a text file agrees with the binary one to
    half a unit in the 7th digit (the binary values printed that way give the text file
    byte for byte). See :class:`KaldiAccs` for loglike and frames.

    Raises :class:`UserError` on one line naming the file and the byte offset for anything
    malformed: truncated, another Kaldi object (e.g. a model), sizes that disagree with
    ``<VECSIZE>``/``<NUMCOMPONENTS>`` or the flags, NaN or inf, bytes that are not Kaldi's.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        cov_type, bits, k, dim, occ, means, second = _parse_accs(path, data)
        zeroth = occ.astype(np.float64)
        first = np.zeros((k, dim)) if means is None else means.astype(np.float64)
        if second is None:
            second = np.zeros((k, dim) if cov_type == "diag" else (k, dim, dim))
        stats = GmmStats(zeroth, first, second.astype(np.float64), loglike=0.0,
                         frames=int(round(float(zeroth.sum()))))
    except UserError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError, MemoryError) as exc:
        raise UserError(f"{path}: corrupt Kaldi accumulator file ({type(exc).__name__}: "
                        f"{exc})") from None
    return KaldiAccs(stats, kaldi_flags_string(bits))


def read_kaldi_stats(path: str | os.PathLike, label: str = GLOBAL_LABEL) -> dict:
    """``{label: read_kaldi_accs(path).stats}``: the shape of a ``FOREIGN_READERS`` reader
    (``"kaldi-stats"``, so :func:`emdist.io.modelio.load_stats` reads Kaldi accumulators)."""
    return {label: read_kaldi_accs(path).stats}


def _float32_of(path, name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as float32, refusing NaN, inf and values float32 cannot hold."""
    values = np.asarray(values, np.float64)
    if not np.isfinite(values).all() or (np.abs(values) > _F32_MAX).any():
        raise UserError(f"{path}: cannot write Kaldi accumulators: the {name} statistics hold "
                        "NaN, inf or values beyond float32")
    return values.astype(np.float32)


def kaldi_accs_bytes(stats: GmmStats, binary: bool = True, flags: str = "mvw",
                     path: str | os.PathLike = "<bytes>") -> bytes:
    """The bytes of ``stats`` as Kaldi's ``AccumDiagGmm::Write`` (diag statistics) or
    ``AccumFullGmm::Write`` (full) produce them: float32 values, flags as Kaldi's augmented
    ``uint16`` (``"w"``, ``"mw"``, ``"mvw"``; ``"v"`` means ``"mvw"``), orders the flags
    leave out written empty (diag) or left out (full variances), full second-order
    statistics centred (``Σγxxᵀ − (1/occ)·(Σγx)(Σγx)ᵀ`` in double, when occ ≠ 0).
    ``loglike`` and ``frames`` are not written: Kaldi's accumulators have no place for them.
    ``path`` only names the destination in error messages."""
    bits = kaldi_flags_bits(flags)
    k, dim = stats.n_components, stats.dim
    if k == 0 or dim == 0:
        raise UserError(f"{path}: cannot write Kaldi accumulators of {k} Gaussians of "
                        f"dimension {dim}")
    diag = stats.covariance_type == "diag"
    occ = _float32_of(path, "zeroth-order", stats.zeroth)
    empty = np.zeros((0, 0), np.float32)
    means = _float32_of(path, "first-order", stats.first) if bits & 1 else empty
    var: np.ndarray | list = empty
    if bits & 2 and diag:
        var = _float32_of(path, "second-order", stats.second)
    elif bits & 2:
        centred = []
        for c in range(k):
            acc = np.array(stats.second[c], np.float64)
            if stats.zeroth[c] != 0:
                m = stats.first[c]
                acc = acc + np.outer(m, (-1.0 / stats.zeroth[c]) * m)
            centred.append(_float32_of(path, "second-order", np.tril(acc) + np.tril(acc, -1).T))
        var = centred
    if binary:
        out = [_BINARY_HEADER, _bin_token("<GMMACCS>"), _bin_token("<VECSIZE>"), _bin_int(dim),
               _bin_token("<NUMCOMPONENTS>"), _bin_int(k), _bin_token("<FLAGS>"),
               b"\xfe" + bits.to_bytes(2, "little"), _bin_token("<OCCUPANCY>"),
               format_binary_vector(occ), _bin_token("<MEANACCS>"), _bin_matrix(means)]
        if diag:
            out += [_bin_token("<DIAGVARACCS>"), _bin_matrix(var)]
        elif bits & 2:
            out += [_bin_token("<FULLVARACCS>")] + [_bin_packed(p) for p in var]
        out.append(_bin_token("</GMMACCS>"))
        return b"".join(out)
    text = [f"<GMMACCS> <VECSIZE> {dim} <NUMCOMPONENTS> {k} <FLAGS> {bits} <OCCUPANCY> ",
            format_text_vector(occ), "<MEANACCS> ", _text_matrix(means)]
    if diag:
        text += ["<DIAGVARACCS> ", _text_matrix(var)]
    elif bits & 2:
        text += ["<FULLVARACCS> "] + [_text_packed(p) for p in var]
    text.append("</GMMACCS> ")
    return "".join(text).encode("ascii")


def write_kaldi_accs(path: str | os.PathLike, stats: GmmStats, binary: bool = True,
                     flags: str = "mvw") -> None:
    """Write ``stats`` as a Kaldi accumulator file (binary by default, as Kaldi),
    atomically; see :func:`kaldi_accs_bytes`. Kaldi's ``gmm-global-sum-accs``,
    ``gmm-global-est`` (diag) and ``fgmm-global-*`` (full) read it."""
    from emdist.io.modelio import atomic_write_bytes

    if not isinstance(stats, GmmStats):
        raise UserError(f"{path}: Kaldi accumulator files hold GMM statistics, not "
                        f"{type(stats).__name__}")
    atomic_write_bytes(path, kaldi_accs_bytes(stats, binary, flags, path))
