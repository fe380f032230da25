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
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from emdist.errors import UserError, WriteFailure
from emdist.models.kind import FILE_FORMATS, kind_of_format, kind_of_models, stats_type_named
from emdist.models.stats import GmmStats

MODEL_FORMAT = "emdist-gmm"
STATS_FORMAT = "emdist-stats"
FORMAT_VERSION = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename: ``path``
    holds its old content or the new one, never a part. A file-system error (no space, no
    permission, read-only) is a :class:`WriteFailure` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def _open_archive(path: str | os.PathLike, fmt: str | tuple[str, ...]) -> tuple[dict, dict]:
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive")
        with loaded as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict) or not isinstance(meta.get("version", 0), int):
            raise ValueError("metadata is not an emdist header")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not an emdist file ({exc})") from None
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if meta.get("format") not in formats:
        raise UserError(f"{path}: expected a {' or '.join(formats)} file, found "
                        f"{meta.get('format')!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {meta['version']} is newer than this emdist "
            f"understands ({FORMAT_VERSION}); upgrade emdist"
        )
    return meta, arrays


def load_models(path: str | os.PathLike) -> dict:
    """Read a model file: ``{label: model}`` (a global model has the single label
    ``global``): :class:`GMM`, ``HMM`` or ``Codebook`` values, by the file's format.

    Examples
    --------
    >>> models = emdist.load_models("exp/digits/final.mdl")   # doctest: +SKIP
    >>> models["Z"].means.shape                                # doctest: +SKIP
    (5, 39)
    """
    meta, arrays = _open_archive(path, tuple(FILE_FORMATS))
    try:
        return kind_of_format(meta["format"]).from_file(meta, arrays)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: corrupt model file ({exc})") from None


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


def load_stats(path: str | os.PathLike) -> dict:
    """Read a statistics file written by :func:`save_stats`."""
    meta, arrays = _open_archive(path, STATS_FORMAT)
    stats_type = stats_type_named(meta.get("stats", "GmmStats"))
    if stats_type is None:
        raise UserError(f"{path}: unknown statistics type {meta.get('stats')!r}")
    try:
        return {label: stats_type.from_arrays(arrays, prefix=f"{i}.")
                for i, label in enumerate(meta["labels"])}
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: corrupt statistics file ({exc})") from None

