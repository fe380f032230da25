"""A small, test-only reader of Kaldi TEXT-format global GMM files.

Reads ``<DiagGMM>`` and ``<FullGMM>`` models (as written by ``gmm-global-copy
--binary=false`` / ``fgmm-global-copy --binary=false``) and ``<GMMACCS>`` accumulators
(``gmm-global-sum-accs --binary=false``), following the layouts in
``shared/notes/kaldi-gmm.md`` §1.4-1.5. It is written from the format description, not from
emdist, so that tests can compare emdist with Kaldi's own output. Binary files are refused.

Kaldi stores the exponential form: a diagonal model holds ``means_invvars = μ/σ²`` and
``inv_vars = 1/σ²``; a full model holds ``Λμ`` and the packed lower triangle of ``Λ = Σ⁻¹``.
The reader converts back to weights, means and (co)variances in float64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ROW_SEPARATOR = re.compile(r"[\n;]")


@dataclass(frozen=True)
class KaldiGmm:
    """A Kaldi global GMM in the natural parametrisation.

    Attributes
    ----------
    weights : ndarray of shape (K,)
    means : ndarray of shape (K, D)
    covariances : ndarray of shape (K, D) or (K, D, D)
        Variances (``"diag"``) or covariance matrices (``"full"``).
    covariance_type : {"diag", "full"}
    gconsts : ndarray of shape (K,) or None
        The ``<GCONSTS>`` as written (Kaldi recomputes them on read).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str
    gconsts: np.ndarray | None


@dataclass(frozen=True)
class KaldiAccs:
    """A Kaldi ``AccumDiagGmm``: occupancies and uncentred first and second order sums.

    Attributes
    ----------
    dim, n_components, flags : int
    occupancy : ndarray of shape (K,)
    mean_accs : ndarray of shape (K, D) or (0, D)
        Σγx (empty when the flags lack ``m``).
    var_accs : ndarray of shape (K, D) or (0, D)
        Σγx², uncentred (empty when the flags lack ``v``).
    """

    dim: int
    n_components: int
    flags: int
    occupancy: np.ndarray
    mean_accs: np.ndarray
    var_accs: np.ndarray


class _Cursor:
    """Walks a Kaldi text stream: tokens, ``[ ... ]`` vectors, matrices, packed SpMatrix."""

    def __init__(self, text: str, path: Path):
        self.text = text
        self.pos = 0
        self.path = path

    def _fail(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: {message} (at character {self.pos})")

    def token(self) -> str:
        text, n = self.text, len(self.text)
        while self.pos < n and text[self.pos].isspace():
            self.pos += 1
        if self.pos == n:
            raise self._fail("unexpected end of file")
        if text[self.pos] in "[]":
            self.pos += 1
            return text[self.pos - 1]
        start = self.pos
        while self.pos < n and not text[self.pos].isspace() and text[self.pos] not in "[]":
            self.pos += 1
        return text[start : self.pos]

    def expect(self, *tokens: str) -> str:
        tok = self.token()
        if tok not in tokens:
            raise self._fail(f"expected {' or '.join(tokens)}, found {tok!r}")
        return tok

    def _bracketed(self) -> str:
        self.expect("[")
        end = self.text.find("]", self.pos)
        if end < 0:
            raise self._fail("unterminated '['")
        body = self.text[self.pos : end]
        self.pos = end + 1
        return body

    def vector(self) -> np.ndarray:
        body = self._bracketed()
        if "\n" in body.strip():
            raise self._fail("newline inside a vector")
        return np.array([float(v) for v in body.split()], dtype=np.float64)

    def rows(self) -> list[list[float]]:
        """The non-empty rows of a bracketed matrix (rows end at a newline or ``;``)."""
        body = self._bracketed()
        rows = [line.split() for line in _ROW_SEPARATOR.split(body)]
        return [[float(v) for v in row] for row in rows if row]

    def matrix(self, n_cols: int | None = None) -> np.ndarray:
        rows = self.rows()
        if not rows:
            return np.empty((0, n_cols or 0))
        if len({len(r) for r in rows}) != 1:
            raise self._fail("matrix rows of different lengths")
        return np.array(rows, dtype=np.float64)

    def sp_matrix(self) -> np.ndarray:
        """A packed lower-triangular symmetric matrix, returned as a full (D, D) array."""
        rows = self.rows()
        dim = len(rows)
        out = np.zeros((dim, dim))
        for i, row in enumerate(rows):
            if len(row) != i + 1:
                raise self._fail(f"SpMatrix row {i} has {len(row)} values, expected {i + 1}")
            out[i, : i + 1] = row
            out[: i + 1, i] = row
        return out


def _open(path: str | Path) -> _Cursor:
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\0B"):
        raise ValueError(f"{path}: binary Kaldi file; this reader reads text files only")
    return _Cursor(data.decode("ascii"), path)


def read_gmm(path: str | Path) -> KaldiGmm:
    """Read a text ``<DiagGMM>`` or ``<FullGMM>`` model."""
    cur = _open(path)
    start = cur.expect("<DiagGMM>", "<DiagGMMBegin>", "<FullGMM>")
    diag = start != "<FullGMM>"
    ends = ("</DiagGMM>", "<DiagGMMEnd>") if diag else ("</FullGMM>",)
    fields: dict[str, object] = {}
    while (tok := cur.token()) not in ends:
        if tok in ("<GCONSTS>", "<WEIGHTS>"):
            fields[tok] = cur.vector()
        elif tok in ("<MEANS_INVVARS>", "<INV_VARS>", "<MEANS_INVCOVARS>"):
            fields[tok] = cur.matrix()
        elif tok == "<INV_COVARS>" and not diag:
            fields[tok] = np.array([cur.sp_matrix() for _ in fields["<WEIGHTS>"]])
        else:
            raise cur._fail(f"unexpected token {tok!r}")
    weights = fields["<WEIGHTS>"]
    if diag:
        inv_vars = fields["<INV_VARS>"]
        covariances = 1.0 / inv_vars
        means = fields["<MEANS_INVVARS>"] / inv_vars
    else:
        covariances = np.linalg.inv(fields["<INV_COVARS>"])
        covariances = 0.5 * (covariances + covariances.transpose(0, 2, 1))
        means = np.einsum("kij,kj->ki", covariances, fields["<MEANS_INVCOVARS>"])
    return KaldiGmm(
        weights=weights,
        means=means,
        covariances=covariances,
        covariance_type="diag" if diag else "full",
        gconsts=fields.get("<GCONSTS>"),
    )


def read_accs(path: str | Path) -> KaldiAccs:
    """Read a text ``<GMMACCS>`` accumulator (``AccumDiagGmm``)."""
    cur = _open(path)
    cur.expect("<GMMACCS>")
    cur.expect("<VECSIZE>")
    dim = int(cur.token())
    cur.expect("<NUMCOMPONENTS>")
    n_components = int(cur.token())
    cur.expect("<FLAGS>")
    flags = int(cur.token())
    cur.expect("<OCCUPANCY>")
    occupancy = cur.vector()
    cur.expect("<MEANACCS>")
    mean_accs = cur.matrix(dim)
    cur.expect("<DIAGVARACCS>")
    var_accs = cur.matrix(dim)
    cur.expect("</GMMACCS>")
    if occupancy.shape != (n_components,):
        raise ValueError(f"{cur.path}: occupancy has {len(occupancy)} values, not {n_components}")
    for name, mat in (("MEANACCS", mean_accs), ("DIAGVARACCS", var_accs)):
        if mat.size and mat.shape != (n_components, dim):
            raise ValueError(f"{cur.path}: {name} has shape {mat.shape}")
    return KaldiAccs(dim, n_components, flags, occupancy, mean_accs, var_accs)
