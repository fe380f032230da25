"""Model and statistics files: ``.npz`` archives of arrays plus JSON metadata, no pickle.

A model file holds one or more models of one kind keyed by label (one per word; ``global``
for a UBM). The header names the kind's format (:mod:`emdist.models.kind`); a GMM file::

    meta.npy              0-d unicode array: JSON {"format": "emdist-gmm", "version": 1,
                          "covariance_type", "dim", "labels": [...], "n_components": [...]}
    <i>.weights.npy       (K_i,)      for the i-th label in "labels"
    <i>.means.npy         (K_i, D)
    <i>.covariances.npy   (K_i, D) or (K_i, D, D)

HMM files (``emdist-hmm``) hold per label ``<i>.transitions`` and each state's arrays as
``<i>.<s>.weights``, ``<i>.<s>.means``, ``<i>.<s>.covariances``; codebooks (``emdist-vq``)
hold ``<i>.centres``. Files are read with ``numpy.load(path, allow_pickle=False)``. They are
written deterministically (fixed zip timestamps, no run options), so the same model gives
the same bytes, and atomically (temporary name in the same directory, then rename).
"""

from __future__ import annotations

import io
import json
import lzma
import math
import os
import secrets
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from emdist.errors import UserError, WriteFailure
from emdist.models.gmm import GMM
from emdist.models.kernel import natural_parameters
from emdist.models.kind import FILE_FORMATS, kind_of_format, kind_of_models, stats_type_named
from emdist.models.stats import GmmStats

STATS_FORMAT = "emdist-stats"
FORMAT_VERSION = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def open_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, ``.NAME.PID.HEX.tmp`` (exp dirs sweep such
    names after a kill), created like any new file (mode 0666 less the umask, where
    ``mkstemp`` would give 0600): its descriptor, open for writing, and its path."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename: ``path``
    holds its old content or the new one, never a part. A file-system error (no space, no
    permission, read-only) is a :class:`WriteFailure` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = open_temp(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteFailure(path, exc.strerror or str(exc)) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive of ``arrays`` whose bytes depend only on the arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def _meta_array(meta: dict) -> np.ndarray:
    return np.array(json.dumps(meta, sort_keys=True))


def save_models(path: str | os.PathLike, models: Mapping) -> None:
    """Write ``{label: model}`` (models of one kind, see :mod:`emdist.models.kind`) to
    ``path``, atomically and deterministically."""
    if not models:
        raise ValueError("no models to save")
    kind = kind_of_models(models)
    fields, arrays = kind.to_file(models)
    meta = {"format": kind.file_format, "version": FORMAT_VERSION, **fields}
    atomic_write_bytes(path, npz_bytes({"meta": _meta_array(meta), **arrays}))


# -- reading: every file from elsewhere is checked before use ------------------------------
#
# A file is refused with a UserError (exit 2, one line naming the file) when it is not an
# emdist file, is truncated or corrupt, has another format version, a header that does not
# describe its arrays, or parameters no model can have (NaN or infinite values, negative or
# unnormalised weights, non-positive variances, covariances that are not positive definite,
# HMM transitions that do not sum to one or go backwards). Reading never allocates more than
# the file can hold: every array's declared size is checked against its bytes first.

MAX_EXPANSION = 1100
"""A member of a model file may expand to at most this many times the file's size (deflate's
best ratio is about 1032:1; emdist stores members uncompressed): a larger claim is a corrupt
file, refused before anything is read."""

WEIGHT_TOLERANCE = 1e-6
"""How far a GMM's weights (or an HMM's transition rows) may sum from one."""

_GAUSSIAN = ("weights", "means", "covariances")
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_ARCHIVE_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, struct.error,
                   NotImplementedError, RuntimeError, ValueError, TypeError, KeyError,
                   OverflowError, IndexError, AttributeError)
"""What zipfile, zlib, lzma and numpy's ``.npy`` header parser raise on hostile bytes
(RecursionError is a RuntimeError; an encrypted member raises RuntimeError)."""

ForeignReader = Callable[[Path], dict]
FOREIGN_READERS: dict[str, ForeignReader] = {}
"""Readers of other tools' files, registered by the modules that implement them (issue 11):
``"kaldi-model"`` (Kaldi's ``.mdl`` and ``.ubm``: ``<TransitionModel>``, ``<DiagGMM>``,
``<FullGMM>``) and ``"kaldi-stats"`` (``gmm-acc-stats`` and ``gmm-global-acc-stats``
accumulators). :func:`load_models` and :func:`load_stats` hand a file that starts like a
Kaldi object (``\0B`` binary or ``<Token>`` text) to the registered reader, which returns
``{label: model}`` or ``{label: statistics}`` of emdist's types or raises :class:`UserError`
naming the file; its result then goes through the same checks as an emdist file
(:func:`check_models`, :func:`check_stats`). Without a reader such a file is refused."""


def _why(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _head(path: Path) -> bytes:
    """The first bytes of ``path``; a missing or unreadable file is a UserError."""
    try:
        with open(path, "rb") as fh:
            return fh.read(64)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a model file") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _why(exc)
        raise UserError(f"{path}: cannot read ({reason})") from None


def _looks_kaldi(head: bytes) -> bool:
    """A Kaldi object: binary ``\0B`` followed by a token or a matrix type, or text ``<Token>``."""
    return head.startswith(b"\0B") or head.lstrip().startswith(b"<")


def _npy_array(raw: bytes, name: str) -> np.ndarray:
    """One ``.npy`` member: a real number or unicode array whose declared size its bytes
    hold (checked before numpy allocates anything)."""
    fh = io.BytesIO(raw)
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{name}: .npy format {version[0]}.{version[1]} (emdist writes 1.0)")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "created on Python 2": a header numpy mends
        try:  # numpy parses the header with ast and tokenize, which raise what they like
            shape, _, dtype = read_header(fh)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any of them is a corrupt header
            raise ValueError(f"{name}: unreadable .npy header ({_why(exc, 80)})") from None
    if dtype.kind not in "biufU" or dtype.itemsize == 0:
        raise ValueError(f"{name}: an array of {dtype}, not of numbers")
    if any(n < 0 for n in shape):
        raise ValueError(f"{name}: negative shape {shape}")
    needed, held = math.prod(shape) * dtype.itemsize, len(raw) - fh.tell()
    if needed > held:
        raise EOFError(f"{name}: shape {shape} of {dtype} needs {needed} bytes, it has {held}")
    fh.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.lib.format.read_array(fh, allow_pickle=False)


def _read_archive(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive, each bounded by the bytes that hold it."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        declared = sum(info.file_size for info in infos)
        if declared > MAX_EXPANSION * size + 65536:
            raise EOFError(f"its members claim {declared} bytes, more than {size} bytes can hold")
        for info in infos:  # zipfile reads what a member claims to hold in one piece
            if info.compress_size > size:
                raise EOFError(f"member {info.filename!r} claims {info.compress_size} bytes, "
                               f"the file has {size}")
        arrays = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not a .npy array")
            arrays[info.filename[:-4]] = _npy_array(zf.read(info), info.filename)
    return arrays


def _meta_of(arrays: dict[str, np.ndarray]) -> dict:
    """The JSON header (``meta``), removed from ``arrays``."""
    if "meta" not in arrays:
        raise ValueError("no 'meta' header array")
    raw = arrays.pop("meta")
    if raw.dtype.kind != "U" or raw.shape != ():
        raise ValueError(f"the 'meta' header is a {raw.dtype} array of shape {raw.shape}, "
                         "not a JSON string")
    codes = raw.astype(raw.dtype.newbyteorder("=")).reshape(1).view(np.uint32)
    if (codes > 0x10FFFF).any():  # numpy would make a str Python's json cannot scan
        raise ValueError("the 'meta' header holds a character beyond Unicode")
    meta = json.loads(str(raw))
    if not isinstance(meta, dict):
        raise ValueError("the 'meta' header is not a JSON object")
    return meta


def _open_archive(path: str | os.PathLike, fmt: str | tuple[str, ...]) -> tuple[dict, dict]:
    """(header, arrays) of an emdist file of format ``fmt`` and a version this emdist reads."""
    path = Path(path)
    head = _head(path)
    formats = (fmt,) if isinstance(fmt, str) else fmt
    wanted = f"an {formats[0]}" if len(formats) == 1 else f"an {', '.join(formats[:-1])} or " \
        f"{formats[-1]}"
    if not head:
        raise UserError(f"{path}: empty file, not an emdist file")
    if head.startswith(_NPY_MAGIC):
        raise UserError(f"{path}: a single .npy array, not an emdist file (an .npz archive)")
    if not head.startswith(_ZIP_MAGIC):
        raise UserError(f"{path}: not an emdist file (expected {wanted} file, an .npz "
                        "archive)")
    try:
        arrays = _read_archive(path)
        meta = _meta_of(arrays)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError) as exc:
        raise UserError(f"{path}: truncated or corrupt file ({_why(exc)})") from None
    except _ARCHIVE_ERRORS as exc:
        raise UserError(f"{path}: not an emdist file ({_why(exc)})") from None
    found, version = meta.get("format"), meta.get("version")
    if found not in formats:
        raise UserError(f"{path}: expected {wanted} file, found {found!r}")
    if not _is_int(version):
        raise UserError(f"{path}: format version {version!r} is not a number; not an emdist "
                        "file, or a corrupt one")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {version} is newer than this emdist "
            f"understands ({FORMAT_VERSION}); upgrade emdist"
        )
    if version < 1:
        raise UserError(f"{path}: format version {version} was never written by emdist "
                        f"(this emdist reads version {FORMAT_VERSION})")
    return meta, arrays


# -- the header and the arrays of a model file ---------------------------------------------


def _check_header(meta: dict, fmt: str) -> None:
    """The header fields of a model file of format ``fmt`` (ValueError naming the field)."""
    labels, dim, sizes = meta.get("labels"), meta.get("dim"), meta.get("n_components")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"header field 'labels' is {labels!r}, not a list of labels")
    if not all(isinstance(lab, str) and lab for lab in labels):
        raise ValueError("header field 'labels' holds a label that is not a non-empty string")
    if len(set(labels)) != len(labels):
        raise ValueError("header field 'labels' names a label twice")
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"header field 'dim' is {dim!r}, not a positive integer")
    if not isinstance(sizes, list) or len(sizes) != len(labels):
        raise ValueError(f"header field 'n_components' is not a list of {len(labels)} entries")
    for lab, k in zip(labels, sizes, strict=True):
        if fmt == "emdist-hmm":
            if not (isinstance(k, list) and k and all(_is_int(n) and n >= 1 for n in k)):
                raise ValueError(f"header field 'n_components' of {lab!r} is {k!r}, not a list "
                                 "of positive integers (Gaussians per state)")
        elif not (_is_int(k) and k >= 1):
            raise ValueError(f"header field 'n_components' of {lab!r} is {k!r}, not a positive "
                             "integer")
    if fmt != "emdist-vq" and meta.get("covariance_type") not in ("diag", "full"):
        raise ValueError(f"header field 'covariance_type' is {meta.get('covariance_type')!r}, "
                         "not 'diag' or 'full'")


def _check_layout(meta: dict, arrays: Mapping[str, np.ndarray], fmt: str) -> None:
    """Every array the header describes is there, of its shape, and no other."""
    expected = kind_of_format(fmt).file_layout(meta)
    for name, (label, shape) in expected.items():
        if name not in arrays:
            raise ValueError(f"model {label!r}: array {name} is missing")
        arr = arrays[name]
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"model {label!r}: array {name} holds {arr.dtype}, not numbers")
        if arr.shape != shape:
            raise ValueError(f"model {label!r}: array {name} has shape {arr.shape}, the header "
                             f"says {shape} (dim {meta['dim']})")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise ValueError(f"array {extra[0]} belongs to no model of the header")


# -- parameters a model can have ---------------------------------------------------------------


@np.errstate(all="ignore")  # NaN and overflow are what they look for
def _nonfinite(name: str, arr: np.ndarray, unit: str = "Gaussian", prefix: str = "") -> str | None:
    """Where ``arr`` holds NaN or an infinite value, or None; ``prefix`` names the file's
    array (``0.means``)."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    what = "NaN" if np.isnan(arr[first]) else "an infinite value"
    array = f" (array {prefix}{name})" if prefix else ""
    return f"{name} hold {what}{array} at {unit} {first[0]}"


@np.errstate(all="ignore")  # NaN and overflow are what they look for
def _gaussians_problem(weights, means, covariances, covariance_type: str,
                       prefix: str = "") -> str | None:
    """What makes these parameters no GMM, or None."""
    w, m, c = (np.asarray(a, dtype=np.float64) for a in (weights, means, covariances))
    for name, arr in (("weights", w), ("means", m), ("covariances", c)):
        problem = _nonfinite(name, arr, prefix=prefix)
        if problem:
            return problem
    weights, covs = (f" (array {prefix}{n})" if prefix else "" for n in _GAUSSIAN[::2])
    if (w < 0).any():
        k = int(np.argmax(w < 0))
        return f"weight of Gaussian {k} is negative ({w[k]:g}){weights}"
    if abs(w.sum() - 1.0) > WEIGHT_TOLERANCE:
        return f"weights sum to {w.sum():.10g}, not 1{weights}"
    if covariance_type == "diag":
        bad = ~(c >= np.finfo(np.float64).tiny)
        if bad.any():
            k, d = (int(i) for i in np.argwhere(bad)[0])
            return f"variance of Gaussian {k} (dim {d}) is not positive ({c[k, d]:g}){covs}"
    else:
        scale = np.abs(c).max(axis=(1, 2), initial=0.0)
        asym = np.abs(c - c.transpose(0, 2, 1)).max(axis=(1, 2), initial=0.0) > 1e-6 * scale
        if asym.any():
            return f"covariance of Gaussian {int(np.argmax(asym))} is not symmetric{covs}"
        try:
            np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            for k in range(len(c)):
                try:
                    np.linalg.cholesky(c[k])
                except np.linalg.LinAlgError:
                    return f"covariance of Gaussian {k} is not positive definite{covs}"
    return _scoring_problem(w, m, c, covariance_type)


def _scoring_problem(w, m, c, covariance_type: str) -> str | None:
    """The constants the E-step computes from the parameters must be finite in float32."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        try:
            lin, gconst = natural_parameters(GMM(w, m, c, covariance_type), np.zeros(m.shape[1]))
        except (UserError, ValueError, np.linalg.LinAlgError) as exc:
            return _why(exc)
        big = np.finfo(np.float32).max
        finite = gconst[np.isfinite(gconst) | np.isnan(gconst)]  # -inf: a weight of zero
        if not (np.abs(lin) < big).all() or not (np.abs(finite) < big).all():
            return "parameters out of range (means too large or variances too small to score)"
    return None


@np.errstate(all="ignore")  # NaN and overflow are what they look for
def _transitions_problem(trans, prefix: str = "") -> str | None:
    t = np.asarray(trans, dtype=np.float64)
    s = t.shape[0]
    problem = _nonfinite("transitions", t, "state", prefix)
    if problem:
        return problem
    if (t < 0).any():
        r, j = (int(i) for i in np.argwhere(t < 0)[0])
        return f"transition {r} -> {j} is negative ({t[r, j]:g})"
    sums = t.sum(axis=1)
    off = np.abs(sums - 1.0) > WEIGHT_TOLERANCE
    if off.any():
        r = int(np.argmax(off))
        return f"transitions of state {r} sum to {sums[r]:.10g}, not 1"
    back = np.tril(t[:, :s], -1) > 0
    if back.any():
        r, j = (int(i) for i in np.argwhere(back)[0])
        return (f"transition {r} -> {j} goes back ({t[r, j]:g}); emdist HMMs are "
                "left-to-right")
    return None


@np.errstate(all="ignore")  # NaN and overflow are what they look for
def _centres_problem(centres, prefix: str = "") -> str | None:
    c = np.asarray(centres, dtype=np.float64)
    problem = _nonfinite("centres", c, "centre", prefix)
    if problem:
        return problem
    if not np.isfinite(np.einsum("kd,kd->k", c, c)).all():
        return "centres out of range (too large to compute a distance)"
    return None


def _check_arrays(meta: dict, arrays: Mapping[str, np.ndarray], fmt: str, path: Path) -> None:
    """The parameters of every model of an emdist file (UserError naming file and model)."""
    cov = meta.get("covariance_type", "diag")
    for i, label in enumerate(meta["labels"]):
        if fmt == "emdist-vq":
            problem = _centres_problem(arrays[f"{i}.centres"], f"{i}.")
            where = ""
        elif fmt == "emdist-gmm":
            problem = _gaussians_problem(*(arrays[f"{i}.{n}"] for n in _GAUSSIAN), cov, f"{i}.")
            where = ""
        else:
            problem, where = _transitions_problem(arrays[f"{i}.transitions"], f"{i}."), ""
            for s in range(len(meta["n_components"][i])):
                if problem:
                    break
                problem = _gaussians_problem(*(arrays[f"{i}.{s}.{n}"] for n in _GAUSSIAN), cov,
                                             f"{i}.{s}.")
                where = f" state {s}"
        if problem:
            raise UserError(f"{path}: model {label!r}{where}: {problem}")


def check_models(models: Mapping, path: str | os.PathLike) -> None:
    """Check models that came from a file (``path``, for the message) before use: one kind,
    one dimension and covariance type, and parameters a model can have (as
    :func:`load_models` checks an emdist file). Readers of other formats
    (:data:`FOREIGN_READERS`) get the same checks. Raises UserError naming the file."""
    if not models:
        raise UserError(f"{path}: holds no model")
    kinds = {getattr(type(m), "kind", None) for m in models.values()}
    if len(kinds) != 1 or None in kinds:
        raise UserError(f"{path}: holds models of several kinds ({sorted(map(str, kinds))})")
    layouts = {(m.dim, getattr(m, "covariance_type", "")) for m in models.values()}
    if len(layouts) != 1:
        raise UserError(f"{path}: models of several dimensions or covariance types "
                        f"({sorted(layouts)}); one file holds models of one layout")
    kind = kinds.pop()
    for label, model in sorted(models.items()):
        where = ""
        if kind == "kmeans":
            problem = _centres_problem(model.centres)
        elif kind == "gmm":
            problem = _gaussians_problem(model.weights, model.means, model.covariances,
                                         model.covariance_type)
        else:
            problem = _transitions_problem(model.transitions)
            for s, gmm in enumerate(model.states):
                if problem:
                    break
                problem = _gaussians_problem(gmm.weights, gmm.means, gmm.covariances,
                                             gmm.covariance_type)
                where = f" state {s}"
        if problem:
            raise UserError(f"{path}: model {label!r}{where}: {problem}")


def _foreign(path: Path, reader_name: str, what: str):
    """Read a Kaldi file with the reader registered for it (issue 11), or refuse it."""
    reader = FOREIGN_READERS.get(reader_name)
    if reader is None:
        raise UserError(f"{path}: a Kaldi file; emdist does not read Kaldi {what} yet, only "
                        "its own files (emdist train writes them)")
    try:
        return reader(path)
    except UserError:
        raise
    except (OSError, *_ARCHIVE_ERRORS) as exc:
        raise UserError(f"{path}: truncated or corrupt Kaldi {what} ({_why(exc)})") from None


def load_models(path: str | os.PathLike) -> dict:
    """Read a model file: ``{label: model}`` (a global model has the single label
    ``global``): :class:`GMM`, ``HMM`` or ``Codebook`` values, by the file's format.

    The file is checked before use (see :func:`check_models`); anything wrong is a
    :class:`UserError` naming the file and what is wrong: truncated or corrupt, another
    format or version, a header that does not match the arrays, NaN or infinite parameters,
    weights or transitions that do not sum to one, variances that are not positive.

    Examples
    --------
    >>> models = emdist.load_models("exp/digits/final.mdl")   # doctest: +SKIP
    >>> models["Z"].means.shape                                # doctest: +SKIP
    (32, 39)
    """
    path = Path(path)
    if _looks_kaldi(_head(path)):
        models = _foreign(path, "kaldi-model", "models")
        check_models(models, path)
        return models
    meta, arrays = _open_archive(path, tuple(FILE_FORMATS))
    fmt = meta["format"]
    try:
        _check_header(meta, fmt)
        _check_layout(meta, arrays, fmt)
    except ValueError as exc:
        raise UserError(f"{path}: corrupt model file: {_why(exc, 240)}") from None
    _check_arrays(meta, arrays, fmt, path)
    try:
        return kind_of_format(fmt).from_file(meta, arrays)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: corrupt model file ({_why(exc)})") from None


def check_models_fit(models: Mapping, data, path: str | os.PathLike | None = None) -> None:
    """Models (read from ``path``, when they come from a file) meet a data dir (``emdist
    test``, a resumed ``emdist train``, the recognizer): their dimension must be the
    features' and, for word models, every label of the data's ``text`` needs a model.
    UserError naming the model file otherwise."""
    where = f"{path}: " if path is not None else ""
    dims = sorted({m.dim for m in models.values()})
    if dims != [data.dim]:
        shown = dims[0] if len(dims) == 1 else dims
        raise UserError(f"{where}the models have dimension {shown} but the features of "
                        f"{data.path} have dimension {data.dim}; use models trained on "
                        "features like these")
    if set(models) != {"global"} and getattr(data, "has_text", False):
        unknown = sorted(set(data.labels) - set(models))
        if unknown:
            raise UserError(f"{where}no model for label {unknown[0]!r} of {data.path}/text "
                            f"(models: {', '.join(map(repr, sorted(models)))})")


# -- statistics ----------------------------------------------------------------------------


def save_stats(path: str | os.PathLike, stats: Mapping) -> None:
    """Write ``{label: statistics}`` (float64, additive; of one kind) to ``path``."""
    labels = sorted(stats)
    meta = {"format": STATS_FORMAT, "version": FORMAT_VERSION, "labels": labels}
    types = {type(s) for s in stats.values()}
    if types - {GmmStats}:
        meta["stats"] = types.pop().__name__
    arrays = {"meta": _meta_array(meta)}
    for i, label in enumerate(labels):
        arrays.update(stats[label].to_arrays(prefix=f"{i}."))
    atomic_write_bytes(path, npz_bytes(arrays))


def _stats_names(name: str, i: int) -> tuple[str, list[str]]:
    """(prefix of the GMM part, all array names) of the ``i``-th label's statistics."""
    gmm = f"{i}.gmm_" if name == "HmmStats" else f"{i}."
    names = [gmm + n for n in ("zeroth", "first", "second", "loglike", "frames")]
    if name == "HmmStats":
        names += [f"{i}.{n}" for n in ("transitions", "loglike", "frames", "utts", "unaligned")]
    return gmm, names


def _check_stats_layout(meta: dict, arrays: Mapping[str, np.ndarray], name: str) -> None:
    """Every array of every label's statistics is there with a consistent shape, no other."""
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"header field 'labels' is {labels!r}, not a list of labels")
    if not all(isinstance(lab, str) and lab for lab in labels) or len(set(labels)) < len(labels):
        raise ValueError("header field 'labels' holds an empty, repeated or non-string label")
    expected, dims = set(), set()
    for i, label in enumerate(labels):
        gmm, names = _stats_names(name, i)
        for n in names:
            if n not in arrays:
                raise ValueError(f"statistics of {label!r}: array {n} is missing")
            if arrays[n].dtype.kind not in "biuf":
                raise ValueError(f"statistics of {label!r}: array {n} holds {arrays[n].dtype}")
            if n.endswith(_SCALARS) and arrays[n].shape != ():
                raise ValueError(f"statistics of {label!r}: array {n} has shape "
                                 f"{arrays[n].shape}, not a number")
        expected.update(names)
        zeroth, first, second = (arrays[gmm + n] for n in ("zeroth", "first", "second"))
        if zeroth.ndim != 1 or first.ndim != 2 or len(first) != len(zeroth) or \
                second.shape not in (first.shape, (*first.shape, first.shape[1])):
            raise ValueError(f"statistics of {label!r}: inconsistent shapes {zeroth.shape}, "
                             f"{first.shape}, {second.shape} (zeroth, first, second order)")
        dims.add(first.shape[1])
        if name == "HmmStats":
            t = arrays[f"{i}.transitions"]
            if t.ndim != 2 or t.shape[1] != t.shape[0] + 1 or not 1 <= t.shape[0] <= len(zeroth):
                raise ValueError(f"statistics of {label!r}: transition counts of shape "
                                 f"{t.shape} for {len(zeroth)} Gaussians")
    if len(dims) > 1:
        raise ValueError(f"statistics of several dimensions {sorted(dims)}")
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"array {extra[0]} belongs to no label of the header")


_SCALARS = ("loglike", "frames", "utts", "unaligned")


@np.errstate(all="ignore")  # NaN and overflow are what they look for
def _stats_problem(stats) -> str | None:
    gmm = getattr(stats, "gmm", stats)
    arrays = [("zeroth", gmm.zeroth), ("first", gmm.first), ("second", gmm.second)]
    if hasattr(stats, "transitions"):
        arrays.append(("transition counts", stats.transitions))
    for name, arr in arrays:
        problem = _nonfinite(name, arr, "row")
        if problem:
            return problem
    if not math.isfinite(stats.loglike):
        return f"log-likelihood is {stats.loglike}"
    if (gmm.zeroth < 0).any():
        return f"occupancy of Gaussian {int(np.argmax(gmm.zeroth < 0))} is negative"
    if hasattr(stats, "transitions") and (stats.transitions < 0).any():
        return "a transition count is negative"
    for name in ("frames", "utts", "unaligned"):
        if getattr(stats, name, 0) < 0:
            return f"{name} count is negative"
    return None


def check_stats(stats: Mapping, path: str | os.PathLike) -> None:
    """Statistics read from ``path``: finite, non-negative counts, one dimension."""
    dims = {s.dim for s in stats.values()}
    if len(dims) > 1:
        raise UserError(f"{path}: statistics of several dimensions {sorted(dims)}")
    for label, s in sorted(stats.items()):
        problem = _stats_problem(s)
        if problem:
            raise UserError(f"{path}: statistics of {label!r}: {problem}")


def load_stats(path: str | os.PathLike) -> dict:
    """Read a statistics file written by :func:`save_stats`, checked like a model file
    (truncated, corrupt, another version, inconsistent shapes, NaN: UserError naming it).
    :func:`check_stats_fit` checks them against the models they are used with."""
    path = Path(path)
    if _looks_kaldi(_head(path)):
        stats = _foreign(path, "kaldi-stats", "accumulators")
        check_stats(stats, path)
        return stats
    meta, arrays = _open_archive(path, STATS_FORMAT)
    name = meta.get("stats", "GmmStats")
    stats_type = stats_type_named(name) if isinstance(name, str) else None
    if stats_type is None:
        raise UserError(f"{path}: unknown statistics type {name!r}")
    try:
        _check_stats_layout(meta, arrays, stats_type.__name__)
        stats = {label: stats_type.from_arrays(arrays, prefix=f"{i}.")
                 for i, label in enumerate(meta["labels"])}
    except (KeyError, ValueError, TypeError, IndexError, OverflowError) as exc:
        raise UserError(f"{path}: corrupt statistics file: {_why(exc, 240)}") from None
    check_stats(stats, path)
    return stats


def stats_shape(stats) -> tuple:
    """The shape of a statistics value: its second-order array's, with an HMM's transition
    counts' (statistics of the same models have the same shape)."""
    gmm = getattr(stats, "gmm", stats)
    trans = getattr(stats, "transitions", None)
    return gmm.second.shape if trans is None else (gmm.second.shape, trans.shape)


def _model_shape(model) -> tuple:
    kind = type(model).kind
    if kind == "kmeans":
        return model.centres.shape
    if kind == "gmm":
        return model.covariances.shape
    stacked = (model.n_components, model.dim) if model.covariance_type == "diag" else \
        (model.n_components, model.dim, model.dim)
    return stacked, model.transitions.shape


def check_stats_fit(stats: Mapping, models: Mapping, path: str | os.PathLike) -> None:
    """Statistics read from ``path`` are those of ``models``: the same labels' models, of
    the same kind, with the same numbers of Gaussians (and states) and dimension. Otherwise
    a UserError naming the statistics file and both shapes (second-order statistics against
    covariances; with an HMM's transition counts against its transitions)."""
    for label, s in sorted(stats.items()):
        if label not in models:
            raise UserError(f"{path}: statistics of {label!r}, which the models do not have "
                            f"(models: {', '.join(map(repr, sorted(models)))})")
        model = models[label]
        kind = type(model).kind
        want = "HmmStats" if kind == "hmm" else "GmmStats"
        if type(s).__name__ != want:
            raise UserError(f"{path}: statistics of {label!r} are {type(s).__name__}, but the "
                            f"model is a {kind} model (it needs {want})")
        got, need = stats_shape(s), _model_shape(model)
        if kind == "kmeans":  # hard statistics of a codebook are diagonal
            got = got[:2] if len(got) == 3 else got
        if got != need:
            raise UserError(f"{path}: statistics of {label!r} have shape {got} but its model "
                            f"has {need}; statistics of a different model")


def _register_kaldi_readers() -> None:
    """Kaldi's global GMM files (``gmm-global-copy``, ``fgmm-global-copy``) and their
    accumulators (``gmm-global-acc-stats``, ``fgmm-global-acc-stats``, ``*-sum-accs``), text
    or binary, are read by :mod:`emdist.io.kaldi` (issue 11)."""
    from emdist.io.kaldi import read_kaldi_models, read_kaldi_stats

    FOREIGN_READERS.setdefault("kaldi-model", read_kaldi_models)
    FOREIGN_READERS.setdefault("kaldi-stats", read_kaldi_stats)


_register_kaldi_readers()
