"""Fuzz test of the readers (issue 12, point 7), and the reader bugs it found.

``scripts/fuzz_readers.py`` makes seeded random and mutated inputs for every reader -- a data
dir (``feats.scp``, ``text``, ``utt2spk``, ``utt2num_frames``), a Kaldi ark
(``read_matrix_shape``, ``load_feats``), an emdist model file, a statistics file, and Kaldi
model and accumulator bytes (refused until issue 11 registers a reader, then fuzzed) -- and
calls the reader in process. The only allowed outcomes are a return value or an
``EmdistError`` whose message is one line naming the file; another exception, a call slower
than 2 s, a ``MemoryError`` under an address-space limit of 512 MB above the process (a reader
that trusts a declared size) fails the test with the case's seed and input. Here a few
hundred cases of each target run (a few seconds); ``python scripts/fuzz_readers.py --seconds
600`` runs longer.

The regression tests below are the bugs the fuzzer found in the readers, each as the
smallest input that showed it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import time
import zipfile
from pathlib import Path

import kaldiio
import numpy as np
import pytest

from emdist.data.datadir import load_data_dir, load_feats, read_matrix_shape
from emdist.errors import DataError, UserError
from emdist.io.modelio import load_models, load_stats, npz_bytes, save_models

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_readers.py"


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_readers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_readers"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()

CASES = {"datadir": 500, "ark": 300, "model": 600, "stats": 400, "kaldi": 200}
"""Cases per target in CI (each ark case reads several offsets): about 5 s in all."""


@pytest.mark.timeout(120, method="thread")  # the fuzzer's own alarm uses SIGALRM
@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_readers_raise_only_emdist_errors(target, tmp_path):
    report = fuzz.run((target,), cases=CASES[target], seed=0, workdir=tmp_path, hang=2.0,
                      memory=512)
    print(report.summary())
    assert not report.findings, (
        f"{len(report.findings)} findings in {report.counts[f'{target}:tried']} calls:\n"
        + report.describe_findings()
    )
    assert report.counts[f"{target}:tried"] >= CASES[target]
    assert report.counts[f"{target}:clean"] > 0
    if target != "kaldi":  # some mutations leave a valid input: the readers are reached
        assert report.counts[f"{target}:ok"] > 0


# -- the harness itself: it would see what it looks for ------------------------------------


def _outcome(call, tmp_path, hang=2.0, memory=None):
    report = fuzz.Report()
    (tmp_path / "d").mkdir(exist_ok=True)
    with fuzz.memory_limit(memory):
        return fuzz.run_call(call, tmp_path / "d", hang, "model", 0, report)[0]


@pytest.mark.timeout(60, method="thread")
def test_the_harness_reports_other_exceptions_hangs_memory_and_vague_errors(tmp_path):
    def key_error(d):
        raise KeyError("x")

    def hang(d):
        time.sleep(5)

    def gigabytes(d):
        return np.ones(2**31, dtype=np.uint8)

    def vague(d):
        raise UserError("something is wrong")

    def two_lines(d):
        raise DataError(d / "text", "bad\nvery bad")

    def fine(d):
        raise DataError(d / "text", "bad", 3)

    assert _outcome(key_error, tmp_path) == "KeyError"
    assert _outcome(hang, tmp_path, hang=0.2) == "hang"
    if fuzz._vm_bytes() is not None:
        assert _outcome(gigabytes, tmp_path, memory=256) == "MemoryError"
    assert _outcome(vague, tmp_path) == "error naming no file"
    assert _outcome(two_lines, tmp_path) == "multi-line error"
    assert _outcome(fine, tmp_path) == ""


def test_cases_are_reproducible_from_their_seed(tmp_path):
    for target in fuzz.TARGETS:
        a = fuzz.make_case(target, 123, tmp_path)
        b = fuzz.make_case(target, 123, tmp_path)
        assert a.files == b.files and [n for n, _ in a.calls] == [n for n, _ in b.calls]


# -- arks: declared sizes are checked before anything is allocated --------------------------


def _ark_with(tmp_path: Path, body: bytes) -> str:
    good = io.BytesIO()
    kaldiio.matio.write_array(good, np.ones((3, 2), dtype=np.float32))
    path = tmp_path / "feats.ark"
    path.write_bytes(b"u1 " + body + good.getvalue() * 4)
    return f"{path}:3"


def _i32(value: int) -> bytes:
    return struct.pack("<i", value)


HUGE_HEADERS = {
    "FM 2^30 x 2^30": b"\0BFM \x04" + _i32(2**30) + b"\x04" + _i32(2**30),
    "DM (2^31-1) x 4": b"\0BDM \x04" + _i32(2**31 - 1) + b"\x04" + _i32(4),
    "CM cols 2^31-1": b"\0BCM " + struct.pack("<ff", 0, 1) + _i32(3) + _i32(2**31 - 1),
    "CM2 2^30 x 8": b"\0BCM2 " + struct.pack("<ff", 0, 1) + _i32(2**30) + _i32(8),
    "CM3 2^20 x 2^10": b"\0BCM3 " + struct.pack("<ff", 0, 1) + _i32(2**20) + _i32(2**10),
    "int32 vector 2^31-1": b"\0B\x04" + _i32(2**31 - 1),
    "FV 2^30": b"\0BFV \x04" + _i32(2**30),
}


@pytest.mark.parametrize("name", sorted(HUGE_HEADERS))
def test_huge_declared_size_is_refused_before_allocation(tmp_path, name):
    # kaldiio reads (and numpy allocates) what a header declares: up to 8 EB here
    rx = _ark_with(tmp_path, HUGE_HEADERS[name])
    start = time.perf_counter()
    with fuzz.memory_limit(64):
        with pytest.raises(DataError) as err:
            load_feats(rx)
        assert str(err.value).startswith(f"{rx}: cannot read features: ")
        assert "needs" in str(err.value) or "not a matrix" in str(err.value)
        if not name.startswith(("int32", "FV")):
            read_matrix_shape(rx)  # the shape alone is read from the header, as before
    assert time.perf_counter() - start < 1.0


def test_a_truncated_matrix_names_what_it_needs(tmp_path):
    rx = _ark_with(tmp_path, b"\0BFM \x04" + _i32(1000) + b"\x04" + _i32(39))
    with pytest.raises(DataError, match=r"FM matrix of 1000x39 needs 156015 bytes, the file "
                       r"holds \d+ from the offset; the ark is truncated"):
        load_feats(rx)


class _Mkdir:
    """A pickle that makes a directory when loaded (as any pickle may run code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_in_an_ark_is_never_loaded(tmp_path):
    # kaldiio unpickles an entry that starts with PKL; a data dir with utt2num_frames reads
    # the header of its first utterance only, so the others met kaldiio in load_feats
    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    data.mkdir()
    mats = {"a": np.ones((3, 2), np.float32), "b": np.ones((4, 2), np.float32)}
    kaldiio.save_ark(str(data / "feats.ark"), mats, scp=str(data / "feats.scp"))
    with open(data / "feats.ark", "ab") as fh:
        offset = fh.tell() + 2
        fh.write(b"c PKL" + pickle.dumps(_Mkdir(str(marker))))
    with open(data / "feats.scp", "a") as fh:
        fh.write(f"c {data / 'feats.ark'}:{offset}\n")
    (data / "utt2num_frames").write_text("a 3\nb 4\nc 5\n")
    loaded = load_data_dir(data, require_labels=False)
    with pytest.raises(DataError) as err:
        load_feats(loaded.utts[-1].rxfilename)
    assert not marker.exists()
    assert "not at the start of a Kaldi matrix" in str(err.value)
    (data / "utt2num_frames").unlink()
    with pytest.raises(DataError, match=r"feats.scp:3: utterance 'c'"):
        load_data_dir(data, require_labels=False)
    assert not marker.exists()


@pytest.mark.parametrize("body", [b"RIFF\x10\0\0\0WAVEfmt ", b"fLaC\0\0\0\x22",
                                  b"NPY\x01\x10", b"AUDIO\x01\x08"])
def test_other_kaldiio_objects_are_not_features(tmp_path, body):
    # kaldiio would read audio (soundfile: ModuleNotFoundError) or a numpy array
    rx = _ark_with(tmp_path, body)
    for read in (load_feats, read_matrix_shape):
        with pytest.raises(DataError, match="not at the start of a Kaldi matrix"):
            read(rx)


@pytest.mark.parametrize("suffix", ["[0:1,0:1,0:1]", "[0:1][2:3]", "[a:b]", "[1:2:3]"])
def test_bad_ranges_are_data_errors(tmp_path, suffix):
    rx = _ark_with(tmp_path, b"") + suffix  # kaldiio indexed a 2-D matrix on 3 axes
    for read in (load_feats, read_matrix_shape):
        try:
            read(rx)
        except DataError as exc:
            assert str(exc).startswith(rx) and "\n" not in str(exc)


def test_kaldiio_messages_become_one_line(tmp_path):
    rx = _ark_with(tmp_path, b"[ a b ]\n")
    for read in (load_feats, read_matrix_shape):
        with pytest.raises(DataError) as err:
            read(rx)
        assert "\n" not in str(err.value) and "is not a digit File format is wrong?" in \
            str(err.value)


@pytest.mark.parametrize("offset", ["99999999999999999999", "²"])
def test_odd_offsets_are_data_errors(tmp_path, offset):
    rx = f"{_ark_with(tmp_path, b'')[:-2]}:{offset}"
    for read in (load_feats, read_matrix_shape):
        with pytest.raises(DataError) as err:
            read(rx)
        assert str(err.value).startswith(rx)


def test_numpy_error_state_does_not_change_reading(tmp_path):
    # absurd float64 values past float32 are the frame check's to report, not a
    # FloatingPointError of the cast (under np.seterr(all="raise"))
    path = tmp_path / "feats.ark"
    kaldiio.save_ark(str(path), {"u": np.array([[1e300, 1e-300]])}, scp=str(tmp_path / "s"))
    rx = (tmp_path / "s").read_text().split()[1]
    with np.errstate(all="raise"):
        feats = load_feats(rx)
    assert feats.dtype == np.float32 and np.isinf(feats[0, 0])


# -- data dirs ---------------------------------------------------------------------------------


def _data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    mats = {f"u{i}": np.ones((3 + i, 2), np.float32) for i in range(3)}
    kaldiio.save_ark(str(data / "feats.ark"), mats, scp=str(data / "feats.scp"))
    return data


@pytest.mark.parametrize(("value", "fragment"), [
    ("9" * 5000, "is more than a Kaldi matrix holds (2147483647)"),  # int() refused it
    ("2147483648", "is more than a Kaldi matrix holds"),  # overflowed int64 sharding later
    ("0" * 5000, "is not a positive integer"),
])
def test_absurd_frame_counts(tmp_path, value, fragment):
    data = _data_dir(tmp_path)
    (data / "utt2num_frames").write_text(f"u0 3\nu1 {value}\nu2 5\n")
    with pytest.raises(DataError) as err:
        load_data_dir(data, require_labels=False)
    assert str(err.value).startswith(f"{data / 'utt2num_frames'}:2: frame count ")
    assert fragment in str(err.value) and len(str(err.value)) < 300


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_table_is_a_data_error(tmp_path):
    data = _data_dir(tmp_path)
    (data / "text").write_text("u0 a\nu1 b\nu2 a\n")
    (data / "text").chmod(0)
    with pytest.raises(DataError, match=f"{data / 'text'}: cannot read: Permission denied"):
        load_data_dir(data)


# -- model and statistics files ---------------------------------------------------------------


def _model_file(tmp_path: Path) -> Path:
    from emdist.models.gmm import GMM

    path = tmp_path / "m.mdl"
    save_models(path, {"a": GMM(np.ones(1), np.zeros((1, 2)), np.ones((1, 2)), "diag")})
    return path


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _rezip(path: Path, members: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize(("header", "fragment"), [
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }", "needs"),
    ("{'descr': '<U0', 'fortran_order': False, 'shape': (100000000000,), }", "not of numbers"),
    ("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", "not of numbers"),
    ("{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }", "not of numbers"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': ((1,),), }          \u00a0",
     "unreadable .npy header"),  # numpy's tokenize fallback raised TokenError
    ("{[]: 1}", "unreadable .npy header"),  # TypeError from ast
])
def test_npy_headers_are_checked_before_numpy_allocates(tmp_path, header, fragment):
    path = _model_file(tmp_path)
    members = _members(path)
    text = header.encode("utf-8")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    members["0.means.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + \
        bytes(16)
    _rezip(path, members)
    with fuzz.memory_limit(64), pytest.raises(UserError) as err:
        load_models(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)


def test_a_member_claiming_gigabytes_is_refused(tmp_path):
    # zipfile reads what the central directory claims in one piece: 2 GB here
    path = _model_file(tmp_path)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 20 : central + 24] = struct.pack("<I", 2**31 - 1)  # compressed size
    path.write_bytes(bytes(data))
    with fuzz.memory_limit(64), pytest.raises(UserError, match=f"{path}: truncated or corrupt "
                                              r"file \(member 'meta.npy' claims 2147483647"):
        load_models(path)


@pytest.mark.parametrize(("meta", "fragment"), [
    ("[" * 100000, "not an emdist file (maximum recursion depth"),
    (json.dumps({"format": "emdist-gmm", "version": 1, "labels": ["a"], "dim": 2,
                 "n_components": [1], "covariance_type": ["diag"]}), "'covariance_type'"),
    (json.dumps({"format": ["emdist-gmm"], "version": 1}), "found ['emdist-gmm']"),
    (json.dumps({"format": "emdist-gmm", "version": True}), "version True is not a number"),
    (json.dumps({"format": "emdist-gmm", "version": 1, "labels": ["a"], "dim": -2,
                 "n_components": [1], "covariance_type": "diag"}), "'dim' is -2"),
    (json.dumps({"format": "emdist-gmm", "version": 1, "labels": ["a"], "dim": 2,
                 "n_components": [10**9], "covariance_type": "diag"}),
     "0.weights has shape (1,), the header says (1000000000,)"),
])
def test_headers_of_every_shape_are_user_errors(tmp_path, meta, fragment):
    path = _model_file(tmp_path)
    members = _members(path)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array(meta))
    members["meta.npy"] = buf.getvalue()
    _rezip(path, members)
    with pytest.raises(UserError) as err:
        load_models(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)


def test_complex_parameters_are_refused(tmp_path):
    # numpy cast them to float with a ComplexWarning, dropping the imaginary part
    path = _model_file(tmp_path)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["0.means"] = arrays["0.means"] + 1j
    path.write_bytes(npz_bytes(arrays))
    with pytest.raises(UserError, match=r"0.means.npy: an array of complex128, not of numbers"):
        load_models(path)


def test_unknown_stats_type_of_another_json_type(tmp_path):
    path = tmp_path / "x.acc"
    path.write_bytes(npz_bytes({"meta": np.array(json.dumps(
        {"format": "emdist-stats", "version": 1, "labels": ["a"], "stats": ["HmmStats"]}))}))
    with pytest.raises(UserError, match=f"{path}: unknown statistics type"):  # was TypeError
        load_stats(path)


def test_a_header_beyond_unicode_is_refused(tmp_path):
    # numpy turned the UCS4 code 0x110000 into a str that json's scanner met with SystemError
    meta = np.array('{"format": "emdist-gmm", "version": 1}')
    codes = meta.reshape(1).view(np.uint32).copy()
    codes[3] = 0x110000
    path = tmp_path / "x.mdl"
    path.write_bytes(npz_bytes({"meta": codes.view(meta.dtype).reshape(())}))
    with pytest.raises(UserError, match=f"{path}: not an emdist file .*beyond Unicode"):
        load_models(path)
