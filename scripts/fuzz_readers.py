"""Fuzz emdist's readers with seeded random and mutated inputs (issue 12, point 7).

Targets (each reader is called in process):

* ``datadir``: ``load_data_dir`` on a small valid data dir whose ``feats.scp``, ``text``,
  ``utt2spk`` and ``utt2num_frames`` are mutated line by line (random bytes, truncated lines,
  duplicated fields and lines, unsorted ids, unicode, huge numbers, NUL bytes, CR and CRLF,
  offsets and ranges, table specifiers and pipes) or replaced; then ``load_feats`` on what
  it accepted;
* ``ark``: ``read_matrix_shape`` and ``load_feats`` on a valid ark (float, double and
  compressed matrices and a text one) with flipped, overwritten, inserted or cut bytes and
  headers of every Kaldi type token (``FM``, ``DM``, ``CM``, ``CM2``, ``CM3``, vectors and
  kaldiio's ``PKL``, ``NPY``, ``RIFF``) declaring absurd sizes;
* ``model``: ``load_models`` on emdist GMM (diag and full), HMM and codebook files: bytes
  flipped or cut, members re-zipped with a correct CRC after their ``.npy`` bytes or header
  (shape, dtype) were changed, arrays spoilt (NaN, infinite, negative, wrong shape or
  dtype, missing, extra), the JSON header mutated (wrong types, missing keys, huge
  ``n_components``, negative dims, other versions), Kaldi-looking and foreign files;
* ``stats``: ``load_stats`` (then ``check_stats_fit`` against models) the same way;
* ``kaldi``: Kaldi model and accumulator bytes through ``load_models``/``load_stats``: refused
  in one line until a reader is registered in ``emdist.io.modelio.FOREIGN_READERS`` (issue
  11), then that reader is fuzzed with the same mutations.

A case passes when the reader returns or raises an ``emdist.errors.EmdistError`` whose
message is one line naming the file it read. Anything else is a finding: another exception,
a case slower than ``--hang`` seconds (2), a ``MemoryError`` (the address space is limited to
``--memory`` MB, 512, above what the process holds, so a reader that believes a declared size
fails), or an error that names no file. Cases are seeded by (target, case seed); a finding is
printed with both and its input, and ``--replay TARGET:SEED`` runs it again::

    python scripts/fuzz_readers.py --seconds 60 --seed 1
    python scripts/fuzz_readers.py --replay model:1000017

The test suite runs a few hundred cases of each target (``tests/test_fuzz_readers.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kaldiio
import numpy as np

from emdist.data.datadir import load_data_dir, load_feats, read_matrix_shape
from emdist.errors import EmdistError
from emdist.io import modelio
from emdist.io.modelio import check_stats_fit, load_models, load_stats
from emdist.models.gmm import GMM
from emdist.models.hmm import HMM, HmmStats
from emdist.models.stats import GmmStats
from emdist.models.vq import Codebook

TARGETS = ("datadir", "ark", "model", "stats", "kaldi")
DIR = b"@DIR@"
"""Stands for the case's directory in inputs (absolute paths), so that a case's bytes and
its mutations do not depend on where it runs."""

# -- mutations -------------------------------------------------------------------------------

TRICKY = [
    "\u00a0", "\u2028", "\u0085", "\ufeff", "é", "ü", "𝟘", "²", "١٢", "\u202e", "\u0301",
    "😀", "\x00", "\t", "\r", "\v", "\f", " ", "  ", "\x1b[31m", "'", '"', "\\", "$(id)",
    ";", "|", ":", "[", "]", "*", "?", "~", "..", "/", "%s",
]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]
NUMBERS = [
    "0", "-1", "1", "+5", "007", "1e999", "nan", "inf", "0x10", "2147483647", "2147483648",
    "4294967296", "9" * 11, "9" * 20, "9" * 5000, "1.5", "١٢٣", "²", "", " ", "-0",
]
RANGES = [
    "[0:1]", "[5:2]", "[,]", "[:]", "[0:1,0:1]", "[0:1,0:1,0:1]", "[a:b]", "[", "]",
    "[0:1][2:3]", "[1:2:3]", "[-5:-1]", "[0:99999999999999999999]", "[0:" + "9" * 5000 + "]",
    "[,0:0]", "[0]", "[]",
]
SIZES = [0, 1, 2, 3, -1, -(2**31), 2**31 - 1, 2**30, 2**16, 2**20 + 7, 123456789]
JSON_VALUES = [
    None, True, False, 0, 1, -1, 2, 99, 2**31, 10**30, -(10**12), 1.5, float("nan"), "x", "",
    "diag", "full", "emdist-gmm", "emdist-hmm", "emdist-vq", "emdist-stats", "GmmStats",
    "HmmStats", [], [1], [0], [-3], [10**9], ["a"], ["a", "a"], [""], [[1, 2]], [[]], [None],
    {}, {"a": 1}, ["Z", "one"], [2, 2], [[1, 1], [1]], "x" * 10000,
]


def mutate_bytes(rng: np.random.Generator, data: bytes, rounds: int | None = None) -> bytes:
    """Generic mutations: flip bits, overwrite, insert, delete, duplicate, cut, splice ints."""
    buf = bytearray(data)
    for _ in range(rounds or int(rng.integers(1, 4))):
        op = int(rng.integers(8))
        n = len(buf)
        at = int(rng.integers(n + 1))
        if op == 0 and n:  # flip a few bits
            for _ in range(int(rng.integers(1, 9))):
                i = int(rng.integers(n))
                buf[i] ^= 1 << int(rng.integers(8))
        elif op == 1 and n:  # overwrite a run with random bytes
            k = int(rng.integers(1, 17))
            buf[at : at + k] = rng.bytes(min(k, n - at) or 1)
        elif op == 2:  # insert random bytes
            buf[at:at] = rng.bytes(int(rng.integers(1, 33)))
        elif op == 3 and n:  # delete a run
            del buf[at : at + int(rng.integers(1, 65))]
        elif op == 4 and n:  # duplicate a run
            k = int(rng.integers(1, 65))
            buf[at:at] = buf[at : at + k]
        elif op == 5:  # cut
            del buf[at:]
        elif op == 6 and n >= 4:  # an interesting little-endian int32
            value = int(rng.choice(SIZES)) & 0xFFFFFFFF
            i = int(rng.integers(n - 3))
            buf[i : i + 4] = value.to_bytes(4, "little")
        else:  # a tricky byte string
            buf[at:at] = rng.choice(INVALID_UTF8 + [b"\0", b"\r\n", b"\n", b" ", b"\t"])
    return bytes(buf)


def _choice(rng, items):
    return items[int(rng.integers(len(items)))]


def mutate_lines(rng: np.random.Generator, text: bytes) -> bytes:
    """Line-level mutations of a Kaldi table file."""
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(16))
        i = int(rng.integers(len(lines))) if lines else 0
        line = lines[i] if lines else b""
        fields = line.split(b" ")
        if op == 0:  # random bytes
            new = rng.bytes(int(rng.integers(0, 41)))
        elif op == 1:  # truncated
            new = line[: int(rng.integers(len(line) + 1))]
        elif op == 2:  # a duplicated field
            new = b" ".join([fields[0], *fields])
        elif op == 3:  # an extra field, or the value dropped
            new = line + b" extra" if rng.random() < 0.5 else fields[0]
        elif op == 4 and lines:  # a duplicated line, or two swapped (unsorted ids)
            if rng.random() < 0.5:
                lines.insert(i, line)
            else:
                j = int(rng.integers(len(lines)))
                lines[i], lines[j] = lines[j], lines[i]
            continue
        elif op == 5 and lines:  # a line removed
            del lines[i]
            continue
        elif op == 6:  # unicode somewhere
            at = int(rng.integers(len(line) + 1))
            new = line[:at] + _choice(rng, TRICKY).encode() + line[at:]
        elif op == 7:  # invalid UTF-8
            at = int(rng.integers(len(line) + 1))
            new = line[:at] + _choice(rng, INVALID_UTF8) + line[at:]
        elif op == 8:  # a number in place of the value
            new = fields[0] + b" " + _choice(rng, NUMBERS).encode()
        elif op == 9:  # NUL bytes
            at = int(rng.integers(len(line) + 1))
            new = line[:at] + b"\0" * int(rng.integers(1, 4)) + line[at:]
        elif op == 10:  # CR, CRLF, other separators
            new = line.replace(b" ", _choice(rng, [b"\t", b"\r", b"\v", b"\f", b"  "])) \
                if rng.random() < 0.5 else line + b"\r"
        elif op == 11:  # an empty or blank line
            lines.insert(i, _choice(rng, [b"", b" ", b"\t", b"\r"]))
            continue
        elif op == 12:  # an offset or a range
            head = line.rsplit(b":", 1)[0] if b":" in line else line
            tail = _choice(rng, NUMBERS) if rng.random() < 0.5 else ""
            new = head + b":" + tail.encode() + _choice(rng, RANGES + [""] * 4).encode()
        elif op == 13:  # a table specifier, a pipe, stdin, a directory, a missing file
            new = fields[0] + b" " + _choice(rng, [
                b"ark:feats.ark:15", b"scp:feats.scp", b"cat feats.ark |", b"| cat", b"-",
                DIR, DIR + b"/nope.ark:15", b"feats.scp:0", b"text:0", b"/", b"..:3",
                DIR + b"/../d/feats.ark:15", b"feats.ark:" + b"1" * 30, b"feats.ark",
            ])
        elif op == 14:  # a very long line
            new = line + b"x" * int(rng.integers(1000, 20000))
        else:  # generic byte mutations of the line
            new = mutate_bytes(rng, line)
        if lines:
            lines[i] = new
        else:
            lines.append(new)
    ending = _choice(rng, [b"\n", b"\n", b"\n", b"\r\n", b"", b"\n\n"])
    return ending.join(lines) + (ending if lines and rng.random() < 0.9 else b"")


# -- the inputs ------------------------------------------------------------------------------


def _matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12345)
    return {f"u{i}": rng.normal(size=(5 + 3 * i, 4)).astype(np.float32) for i in range(4)}


def _ark() -> tuple[bytes, list[int]]:
    """A valid ark of float, double, compressed (CM, CM2, CM3) and text matrices."""
    out, offsets = io.BytesIO(), []
    for i, (utt, mat) in enumerate(_matrices().items()):
        out.write(utt.encode() + b" ")
        offsets.append(out.tell())
        if i == 0:
            kaldiio.matio.write_array(out, mat)
        elif i == 1:
            kaldiio.matio.write_array(out, mat.astype(np.float64))
        elif i == 2:
            kaldiio.matio.write_array(out, mat, compression_method=[2, 1, 5][i % 3])
        else:
            kaldiio.matio.write_array_ascii(out, mat)
    # two more compressed types after the text matrix
    for method in (2, 5):
        out.write(f"c{method} ".encode())
        offsets.append(out.tell())
        kaldiio.matio.write_array(out, _matrices()["u1"], compression_method=method)
    return out.getvalue(), offsets


ARK, OFFSETS = _ark()
UTTS = [*_matrices(), "c2", "c5"]


def _datadir_files() -> dict[str, bytes]:
    rels = [f"feats.ark:{o}" for o in OFFSETS[:3]] + \
        [f"{DIR.decode()}/feats.ark:{o}" for o in OFFSETS[3:]]
    ids = sorted(UTTS)
    rx = dict(zip(UTTS, rels, strict=True))
    n_frames = dict(zip(UTTS, [5, 8, 11, 14, 8, 8], strict=True))
    return {
        "feats.scp": "".join(f"{u} {rx[u]}\n" for u in ids).encode(),
        "text": "".join(f"{u} {'ab'[i % 2]}\n" for i, u in enumerate(ids)).encode(),
        "utt2spk": "".join(f"{u} s{i % 3}\n" for i, u in enumerate(ids)).encode(),
        "utt2num_frames": "".join(f"{u} {n_frames[u]}\n" for u in ids).encode(),
    }


def _models() -> dict[str, dict]:
    rng = np.random.default_rng(7)

    def gmm(k, d, cov):
        w = rng.dirichlet(np.ones(k))
        m = rng.normal(size=(k, d))
        if cov == "diag":
            return GMM(w, m, rng.uniform(0.5, 2, (k, d)), cov)
        a = rng.normal(size=(k, d, d))
        return GMM(w, m, a @ a.transpose(0, 2, 1) + d * np.eye(d), cov)

    trans = np.array([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3]])
    return {
        "gmm-diag": {"a": gmm(2, 3, "diag"), "b": gmm(1, 3, "diag")},
        "gmm-full": {"global": gmm(2, 3, "full")},
        "hmm": {"a": HMM((gmm(2, 3, "diag"), gmm(1, 3, "diag")), trans),
                "b": HMM((gmm(1, 3, "diag"), gmm(1, 3, "diag")), trans)},
        "vq": {"a": Codebook(rng.normal(size=(3, 3))), "b": Codebook(rng.normal(size=(2, 3)))},
    }


MODELS = _models()


def _stats() -> dict[str, dict]:
    rng = np.random.default_rng(8)

    def gs(k, d, cov="diag"):
        second = rng.uniform(1, 5, (k, d) if cov == "diag" else (k, d, d))
        return GmmStats(rng.uniform(1, 50, k), rng.normal(size=(k, d)), second,
                        float(-rng.uniform(10, 100)), int(rng.integers(1, 1000)))

    return {
        "gmm": {"a": gs(2, 3), "b": gs(1, 3)},
        "full": {"global": gs(2, 3, "full")},
        "hmm": {"a": HmmStats(gs(3, 3), rng.uniform(0, 9, (2, 3)), -50.0, 40, 3, 1),
                "b": HmmStats(gs(2, 3), rng.uniform(0, 9, (2, 3)), -20.0, 30, 2, 0)},
    }


STATS = _stats()


_BASE_FILES: dict[tuple[str, str], bytes] = {}


def _file_bytes(save: Callable, key: tuple[str, str], obj, tmp: Path) -> bytes:
    """The bytes ``save`` writes for ``obj`` (deterministic; kept once made)."""
    if key not in _BASE_FILES:
        save(tmp, obj)
        _BASE_FILES[key] = tmp.read_bytes()
        tmp.unlink()
    return _BASE_FILES[key]


KALDI_SEEDS = [
    b"<DiagGMM> \n<GCONSTS>  [ -5.2 -6.1 ]\n<WEIGHTS>  [ 0.4 0.6 ]\n<MEANS_INVVARS>  [\n"
    b"  0.1 0.2 0.3\n  -0.1 0.0 0.2 ]\n<INV_VARS>  [\n  1 1 1\n  2 2 2 ]\n</DiagGMM> \n",
    b"\0B<DiagGMM> <GCONSTS> FV \x04\x02\x00\x00\x00" + np.array([-5.2, -6.1], "<f4").tobytes()
    + b"<WEIGHTS> FV \x04\x02\x00\x00\x00" + np.array([0.4, 0.6], "<f4").tobytes()
    + b"</DiagGMM> ",
    b"<TransitionModel> \n<Topology> \n<TopologyEntry> \n<ForPhones> \n1 \n</ForPhones> \n"
    b"<State> 0 <PdfClass> 0 <Transition> 0 0.75 <Transition> 1 0.25 </State> \n"
    b"<State> 1 </State> \n</TopologyEntry> \n</Topology> \n",
    b"\0B<GMMACCS> <VECSIZE> \x04\x03\x00\x00\x00<NUMCOMPONENTS> \x04\x02\x00\x00\x00"
    b"<FLAGS> \x04\x07\x00\x00\x00<OCCUPANCY> DV \x04\x02\x00\x00\x00" + bytes(16)
    + b"</GMMACCS> ",
    b"\0BDV \x04\x03\x00\x00\x00" + bytes(24) + b"<NUMPDFS> \x04\x01\x00\x00\x00",
]


# -- targets ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One input: files to write into the case's directory and what to call on them."""

    files: dict[str, bytes]
    calls: list[tuple[str, Callable[[Path], object]]] = field(default_factory=list)

    def describe(self, limit: int = 400) -> str:
        out = []
        for name, data in self.files.items():
            shown = repr(data[:limit]) + (f"... ({len(data)} bytes)" if len(data) > limit else "")
            out.append(f"  {name}: {shown}")
        out.append("  calls: " + ", ".join(name for name, _ in self.calls))
        return "\n".join(out)


def case_datadir(rng: np.random.Generator) -> Case:
    files = dict(_datadir_files())
    files["feats.ark"] = ARK
    for name in ("utt2spk", "utt2num_frames"):
        if rng.random() < 0.4:
            del files[name]
    names = [n for n in files if n != "feats.ark"]
    for _ in range(int(rng.integers(1, 3))):
        name = _choice(rng, names)
        r = rng.random()
        if r < 0.75:
            files[name] = mutate_lines(rng, files[name])
        elif r < 0.85:
            files[name] = mutate_bytes(rng, files[name])
        elif r < 0.95:
            files[name] = rng.bytes(int(rng.integers(0, 200)))
        else:
            files[name] = b""
    if rng.random() < 0.15:
        files["feats.ark"] = mutate_bytes(rng, ARK)
    require = bool(rng.random() < 0.5)
    skip = bool(rng.random() < 0.3)

    def call(d: Path):
        data = load_data_dir(d, require_labels=require, skip_empty=skip)
        for u in data.utts:
            load_feats(u.rxfilename)
        return data

    return Case(files, [(f"load_data_dir(require_labels={require}, skip_empty={skip})"
                         " + load_feats", call)])


def _header_bytes(rng: np.random.Generator) -> bytes:
    """A Kaldi (or kaldiio) object header declaring an absurd size."""
    token = _choice(rng, [b"FM", b"DM", b"CM", b"CM2", b"CM3", b"FV", b"DV", b"BFM", b"SM",
                          b"\x04", b""])
    rows, cols = int(_choice(rng, SIZES)), int(_choice(rng, SIZES))
    i32 = lambda v: (v & 0xFFFFFFFF).to_bytes(4, "little")  # noqa: E731
    kind = int(rng.integers(6))
    if kind == 0:  # as Kaldi writes FM/DM/FV/DV
        return b"\0B" + token + b" \x04" + i32(rows) + b"\x04" + i32(cols)
    if kind == 1:  # a compressed global header: min, range, rows, cols
        return b"\0B" + token + b" " + np.array([0.0, 1.0], "<f4").tobytes() + i32(rows) \
            + i32(cols)
    if kind == 2:  # an int32 vector
        return b"\0B\x04" + i32(rows)
    if kind == 3:  # kaldiio's other objects (PKL would unpickle, never reached)
        return _choice(rng, [b"PKL\x80\x04K\x01.", b"NPY\x01\x10", b"RIFF\xff\xff\xff\x7fWAVE",
                             b"fLaC\0\0\0\x22", b"AUDIO\x01\xff"])
    if kind == 4:  # a text matrix
        return _choice(rng, [b"[ 1 2\n 3 4 ]\n", b"[\n", b" [ 1 2 3 ", b"[ 1e999 nan ]\n",
                             b"[ 99999999999 1 ]\n", b"[ ]\n", b"[ a b ]\n", b"1 2 3\n",
                             b"[ 1 2\n 3 ]\n"])
    return b"\0B" + token + b" " + rng.bytes(int(rng.integers(0, 20)))


def case_ark(rng: np.random.Generator) -> Case:
    ark = bytearray(ARK)
    offsets = list(OFFSETS)
    r = rng.random()
    if r < 0.5:  # a header replaced by one declaring other types and sizes
        at = _choice(rng, offsets)
        new = _header_bytes(rng)
        keep = int(rng.integers(0, 40))
        ark[at : at + len(new) + keep] = new if rng.random() < 0.5 else new + rng.bytes(keep)
        if rng.random() < 0.3:
            del ark[at + len(new) + int(rng.integers(0, 64)) :]
    elif r < 0.9:
        ark = bytearray(mutate_bytes(rng, bytes(ark)))
    else:
        ark = bytearray(rng.bytes(int(rng.integers(0, 300))))
    if rng.random() < 0.3:  # offsets anywhere, ranges, offsets past the end
        offsets = offsets + [int(rng.integers(0, len(ARK) + 100)), 10**12, 2**63 + 5]
    suffixes = [""] * 6 + RANGES
    rxs = [f"feats.ark:{o}" + _choice(rng, suffixes) for o in offsets]
    if rng.random() < 0.2:
        rxs.append("feats.ark" + _choice(rng, suffixes))

    cache: dict = {}  # shared by the calls of the case, as load_data_dir shares it

    def calls(rx: str):
        def shape(d: Path):
            return read_matrix_shape(f"{d}/{rx}")

        def cached(d: Path):
            try:
                return read_matrix_shape(f"{d}/{rx}", fd_cache=cache)
            finally:
                if rx == rxs[-1]:
                    for fd in cache.values():
                        fd.close()

        def feats(d: Path):
            return load_feats(f"{d}/{rx}")

        return [(f"read_matrix_shape({rx})", shape),
                (f"read_matrix_shape({rx}, fd_cache)", cached), (f"load_feats({rx})", feats)]

    return Case({"feats.ark": bytes(ark), "rxfilenames": "\n".join(rxs).encode()},
                [c for rx in rxs for c in calls(rx)])


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, raw in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), raw,
                        compress_type=compression)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_header(rng: np.random.Generator, raw: bytes) -> bytes:
    """A .npy member whose header declares another shape, dtype or order, or is broken."""
    choices = [
        "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 4), }",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (-3, 2), }",
        "{'descr': '<U0', 'fortran_order': False, 'shape': (100000000000,), }",
        "{'descr': '|V2147483647', 'fortran_order': False, 'shape': (1,), }",
        "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }",
        "{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,), }",
        "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }",
        "{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f8', 'fortran_order': 1, 'shape': (2,), }",
        "{'descr': '<f8', 'shape': (2,), }",
        "{'descr': 'x', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f8', 'fortran_order': False, 'shape': ((((((((((((1,),),),),),),),),),),), }",
        "(" * 150 + ")" * 150,
        "{[]: 1}",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'x': " + "9" * 5000 + "}",
        "not a dict",
    ]
    header = _choice(rng, choices).encode("latin1")
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    version = _choice(rng, [b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x09"])
    length = len(header).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    body = raw[128:] if rng.random() < 0.8 else b""
    return b"\x93NUMPY" + version + length + header + body


def _spoil_array(rng: np.random.Generator, arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr)
    op = int(rng.integers(10))
    if op <= 3 and arr.size and arr.dtype.kind == "f":
        value = _choice(rng, [np.nan, np.inf, -np.inf, -1.0, 0.0, 1e300, 1e-320, -1e-300, 2.0])
        arr.flat[int(rng.integers(arr.size))] = value
        return arr
    if op == 4:
        return arr.T.copy() if arr.ndim > 1 else arr[None]
    if op == 5:
        return arr[:-1] if arr.ndim else np.array([arr, arr])
    if op == 6:
        return arr.reshape(-1)
    if op == 7:
        return np.zeros((0,) + arr.shape[1:])
    if op == 8:
        dtype = _choice(rng, [np.int64, np.bool_, np.complex128, np.float16, np.uint8, ">f8",
                              "U3", "S3"])
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            return arr.astype(dtype)
        return arr
    return np.full(arr.shape, _choice(rng, [np.nan, 0.0, -1.0, 1e308]))


def _mutate_archive(rng: np.random.Generator, data: bytes) -> bytes:
    """Mutate an emdist .npz: its bytes, a member's bytes or header, an array, the meta."""
    r = rng.random()
    try:  # a second round may meet an archive the first one broke (read it as emdist does)
        members = _members(data)
        arrays = {n: modelio._npy_array(raw, n) for n, raw in members.items()}
        meta = json.loads(str(arrays["meta.npy"]))
        if not isinstance(meta, dict):
            raise ValueError("meta")
    except Exception:  # noqa: BLE001
        r = 0.0
    if r < 0.15:
        return mutate_bytes(rng, data)
    names = sorted(members)
    compression = zipfile.ZIP_DEFLATED if rng.random() < 0.2 else zipfile.ZIP_STORED
    if r < 0.3:  # a member's bytes (CRC recomputed)
        name = _choice(rng, names)
        members[name] = mutate_bytes(rng, members[name])
    elif r < 0.4:  # a member's .npy header
        name = _choice(rng, names)
        members[name] = _npy_header(rng, members[name])
    elif r < 0.65:  # arrays spoilt, removed, added or renamed
        name = _choice(rng, [n for n in names if n != "meta.npy"])
        op = rng.random()
        if op < 0.7:
            arrays[name] = _spoil_array(rng, arrays[name])
        elif op < 0.8:
            del arrays[name]
        elif op < 0.9:
            arrays["9." + name] = arrays[name]
        else:
            arrays[name.replace(".npy", ".x.npy")] = arrays.pop(name)
        members = {n: _npy(a) for n, a in arrays.items()}
    elif r < 0.95:  # the JSON header
        for _ in range(int(rng.integers(1, 3))):
            keys = sorted(meta) + ["extra"]
            key = _choice(rng, keys)
            op = rng.random()
            if op < 0.2:
                meta.pop(key, None)
            elif op < 0.9:
                meta[key] = _choice(rng, JSON_VALUES)
            elif isinstance(meta.get(key), list) and meta[key]:
                meta[key] = meta[key][::-1] if rng.random() < 0.5 else meta[key][:-1]
        text = json.dumps(meta)
        if rng.random() < 0.1:
            text = _choice(rng, ["[" * 100000, "{", "1.5", '"x"', "null", text[:-1], "\udcff"])
        members["meta.npy"] = _npy(np.array(text))
    else:  # the whole meta replaced by another array
        members["meta.npy"] = _npy(_choice(rng, [np.ones(3), np.array(1.5), np.array(["a", "b"]),
                                                 np.zeros((2, 2), np.int8), np.array(b"{}")]))
    return _zip(members, compression)


def _foreign_bytes(rng: np.random.Generator) -> bytes:
    return _choice(rng, [
        b"", b"\x93NUMPY" + rng.bytes(50), _npy(np.ones(3)), b"PK\x03\x04" + rng.bytes(40),
        b"PK\x05\x06" + bytes(18), rng.bytes(int(rng.integers(1, 200))), b"hello\n",
        _choice(rng, KALDI_SEEDS), b"\0B" + rng.bytes(30), b"  <" + rng.bytes(10),
    ])


def case_model(rng: np.random.Generator, tmp: Path) -> Case:
    kind = _choice(rng, sorted(MODELS))
    base = _file_bytes(modelio.save_models, ("model", kind), MODELS[kind], tmp)
    data = _foreign_bytes(rng) if rng.random() < 0.08 else _mutate_archive(rng, base)
    if rng.random() < 0.1:
        data = _mutate_archive(rng, data) if data.startswith(b"PK\x03\x04") else data

    def call(d: Path):
        return load_models(d / "x.mdl")

    return Case({"x.mdl": data}, [(f"load_models ({kind})", call)])


def case_stats(rng: np.random.Generator, tmp: Path) -> Case:
    kind = _choice(rng, sorted(STATS))
    base = _file_bytes(modelio.save_stats, ("stats", kind), STATS[kind], tmp)
    data = _foreign_bytes(rng) if rng.random() < 0.08 else _mutate_archive(rng, base)
    against = _choice(rng, sorted(MODELS))

    def call(d: Path):
        stats = load_stats(d / "x.acc")
        check_stats_fit(stats, MODELS[against], d / "x.acc")
        return stats

    return Case({"x.acc": data}, [(f"load_stats ({kind}) + check_stats_fit ({against})",
                                   call)])


def case_kaldi(rng: np.random.Generator) -> Case:
    data = _choice(rng, KALDI_SEEDS)
    if rng.random() < 0.8:
        data = mutate_bytes(rng, data)
    data = b"\0B<" + data if rng.random() < 0.1 else data

    load = load_models if rng.random() < 0.5 else load_stats

    def call(d: Path):
        return load(d / "x.mdl")

    readers = ", ".join(sorted(modelio.FOREIGN_READERS)) or "no reader registered"
    return Case({"x.mdl": data}, [(f"{load.__name__} ({readers})", call)])


# -- running ---------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm in a case that runs too long."""


def _on_alarm(signum, frame):
    raise Hang()


@dataclass
class Finding:
    target: str
    seed: int
    kind: str
    detail: str
    case: Case

    def describe(self) -> str:
        return (f"{self.target}:{self.seed} {self.kind}: {self.detail}\n{self.case.describe()}\n"
                f"  reproduce: python scripts/fuzz_readers.py --replay {self.target}:{self.seed}")


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)
    slowest: tuple[float, str] = (0.0, "")

    def summary(self) -> str:
        lines = []
        for target in TARGETS:
            c = {k.split(":", 1)[1]: v for k, v in self.counts.items()
                 if k.startswith(target + ":")}
            if c:
                lines.append(f"{target:8s} tried {c.get('tried', 0):6d}  returned "
                             f"{c.get('ok', 0):6d}  clean errors {c.get('clean', 0):6d}  "
                             f"findings {c.get('finding', 0)}")
        total = {k: sum(v for kk, v in self.counts.items() if kk.endswith(":" + k))
                 for k in ("tried", "ok", "clean", "finding")}
        lines.append(f"{'all':8s} tried {total['tried']:6d}  returned {total['ok']:6d}  "
                     f"clean errors {total['clean']:6d}  findings {total['finding']}")
        lines.append(f"slowest case {self.slowest[0]:.3f} s ({self.slowest[1]})")
        for where, n in self.warnings.most_common(8):
            lines.append(f"warning x{n}: {where}")
        return "\n".join(lines)

    def describe_findings(self, limit: int = 10) -> str:
        return "\n\n".join(f.describe() for f in self.findings[:limit])


def make_case(target: str, seed: int, tmp: Path) -> Case:
    rng = np.random.default_rng([TARGETS.index(target), seed])
    if target == "datadir":
        return case_datadir(rng)
    if target == "ark":
        return case_ark(rng)
    if target == "model":
        return case_model(rng, tmp / "base.tmp")
    if target == "stats":
        return case_stats(rng, tmp / "base.tmp")
    return case_kaldi(rng)


def _write(case: Case, d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, data in case.files.items():
        (d / name).write_bytes(data.replace(DIR, str(d).encode()))


def _names_a_file(message: str, d: Path) -> bool:
    return str(d) in message


def run_case(target: str, seed: int, workdir: Path, hang: float, report: Report) -> None:
    """Write case ``seed`` of ``target`` and run each of its calls; count and keep findings."""
    case = make_case(target, seed, workdir)
    d = workdir / "d"
    _write(case, d)
    for name, call in case.calls:
        kind, detail = run_call(call, d, hang, target, seed, report)
        if kind:
            report.counts[f"{target}:finding"] += 1
            report.findings.append(Finding(target, seed, kind, f"{name}: {detail}", case))


def run_call(call, d: Path, hang: float, target: str, seed: int,
              report: Report) -> tuple[str, str]:
    """(kind of finding, detail) of one reader call, ("", "") when it behaved."""
    report.counts[f"{target}:tried"] += 1
    kind, detail = "", ""
    caught: list = []
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, hang)
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="raise"):
            warnings.simplefilter("always")  # a reader must not depend on numpy's error
            call(d)                          # state: overflow, NaN are FloatingPointErrors
        report.counts[f"{target}:ok"] += 1
    except EmdistError as exc:
        message = str(exc)
        if "\n" in message or "\r" in message:
            kind, detail = "multi-line error", repr(message[:500])
        elif not _names_a_file(message, d):
            kind, detail = "error naming no file", repr(message[:500])
        else:
            report.counts[f"{target}:clean"] += 1
    except Hang:
        kind, detail = "hang", f"still running after {hang} s"
    except MemoryError:
        kind, detail = "MemoryError", traceback.format_exc(limit=-6)
    except Exception as exc:  # noqa: BLE001 -- what the fuzzer is looking for
        kind, detail = type(exc).__name__, traceback.format_exc(limit=-6)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed = time.perf_counter() - start
    for w in caught:  # not findings (no exception), but counted and shown by origin
        where = f"{Path(w.filename).name}:{w.lineno} {w.category.__name__}: {w.message}"
        report.warnings[" ".join(re.sub(r"0x[0-9a-f]+", "0x...", where).split())[:150]] += 1
    if elapsed > report.slowest[0]:
        report.slowest = (elapsed, f"{target}:{seed}")
    if not kind and elapsed > hang:
        kind, detail = "slow", f"took {elapsed:.2f} s"
    return kind, detail


def _vm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def memory_limit(extra_mb: int | None):
    """Limit the address space to what the process holds plus ``extra_mb``: a reader that
    trusts a declared size gets a MemoryError instead of overcommitted gigabytes."""
    vm = _vm_bytes()
    if not extra_mb or vm is None:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra_mb * 2**20
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


@contextlib.contextmanager
def _inside(workdir: Path):
    """Run in ``workdir`` (relative rxfilenames resolve against the cwd first)."""
    old = os.getcwd()
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(old)


def run(targets=TARGETS, *, cases: int | None = None, seconds: float | None = None,
        seed: int = 0, workdir: Path, hang: float = 2.0, memory: int | None = 512,
        progress: Callable[[Report], None] | None = None) -> Report:
    """Run ``cases`` cases of each target (or round robin for ``seconds``) from case seed
    ``seed * 1_000_000`` on; return the counts and findings."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report()
    first = seed * 1_000_000
    deadline = None if seconds is None else time.monotonic() + seconds
    old_handler = signal.getsignal(signal.SIGALRM)
    try:
        with _inside(workdir), memory_limit(memory):
            i = 0
            while (cases is None or i < cases) and \
                    (deadline is None or time.monotonic() < deadline):
                for target in targets:
                    run_case(target, first + i, workdir, hang, report)
                i += 1
                if progress and i % 500 == 0:
                    progress(report)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    return report


def replay(spec: str, workdir: Path, hang: float, memory: int | None) -> Report:
    target, seed = spec.split(":")
    report = Report()
    with _inside(workdir), memory_limit(memory):
        run_case(target, int(seed), workdir, hang, report)
    case = make_case(target, int(seed), workdir)
    print(f"{spec}:\n{case.describe(limit=4000)}")
    return report


def _all_line(report: Report) -> str:
    return next(line for line in report.summary().splitlines() if line.startswith("all"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="run this long")
    parser.add_argument("--cases", type=int, default=None, help="or this many per target")
    parser.add_argument("--seed", type=int, default=1, help="first case seed / 1e6")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--hang", type=float, default=2.0, help="seconds a case may take")
    parser.add_argument("--memory", type=int, default=512,
                        help="MB a case may allocate (0: no limit)")
    parser.add_argument("--replay", help="TARGET:SEED of one case to run again")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="emdist-fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.replay:
            report = replay(args.replay, workdir, args.hang, args.memory)
        else:
            targets = tuple(t for t in args.targets.split(",") if t)
            unknown = set(targets) - set(TARGETS)
            if unknown:
                parser.error(f"unknown targets {sorted(unknown)}; use {', '.join(TARGETS)}")
            report = run(targets, cases=args.cases,
                         seconds=None if args.cases else args.seconds, seed=args.seed,
                         workdir=workdir, hang=args.hang, memory=args.memory or None,
                         progress=lambda r: print(_all_line(r), flush=True))
    print(report.summary())
    if report.findings:
        kinds = Counter(f"{f.target} {f.kind}" for f in report.findings)
        print("\nfindings: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
        print("\n" + report.describe_findings())
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
