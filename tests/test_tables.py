"""Tests for emdist.io.tables: features from Kaldi rspecifiers, floats and vectors to
Kaldi wspecifiers."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import kaldiio
import numpy as np
import pytest

from emdist.errors import UserError
from emdist.io.tables import RSPECIFIER_USAGE, TableWarning, TableWriter, read_features


def _mats(n: int = 3, dim: int = 4, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"u{i}": rng.standard_normal((5 + 3 * i, dim)).astype(dtype) for i in range(n)}


def _python(code: str, stdin: bytes = b"", cwd: Path | None = None):
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                          cwd=cwd, timeout=60)


def _same(got: list[tuple[str, np.ndarray]], mats: dict[str, np.ndarray], atol: float = 0.0):
    assert [k for k, _ in got] == list(mats)
    for key, feats in got:
        assert feats.dtype == np.float32 and feats.flags.c_contiguous and feats.flags.writeable
        np.testing.assert_allclose(feats, mats[key], atol=atol, rtol=0)


# -- reading -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["ark:{d}/f.ark", "scp:{d}/f.scp", "ark,s,cs:{d}/f.ark",
                                  "scp,p:{d}/f.scp", "scp,o,s,cs,bg:{d}/f.scp",
                                  "ark:cat {d}/f.ark |", "ark,b:{d}/f.ark", "ark,t:{d}/f.ark"])
def test_reads_binary_tables_in_every_form(tmp_path, spec):
    mats = _mats()
    kaldiio.save_ark(str(tmp_path / "f.ark"), mats, scp=str(tmp_path / "f.scp"))
    _same(list(read_features(spec.format(d=tmp_path))), mats)


@pytest.mark.parametrize("method", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("kind", ["ark", "scp"])
def test_reads_compressed_matrices_as_kaldiio_does(tmp_path, method, kind):
    mats = _mats(seed=1)
    kaldiio.save_ark(str(tmp_path / "c.ark"), mats, scp=str(tmp_path / "c.scp"),
                     compression_method=method)
    assert b"\0BCM" in (tmp_path / "c.ark").read_bytes()
    expected = dict(kaldiio.load_ark(str(tmp_path / "c.ark")))
    _same(list(read_features(f"{kind}:{tmp_path}/c.{kind}")), expected)


def test_reads_text_and_double_archives(tmp_path):
    mats = _mats(seed=2)
    kaldiio.save_ark(str(tmp_path / "t.ark"), mats, text=True)
    _same(list(read_features(f"ark:{tmp_path}/t.ark")), mats, atol=1e-6)
    doubles = _mats(seed=3, dtype=np.float64)
    kaldiio.save_ark(str(tmp_path / "d.ark"), doubles, scp=str(tmp_path / "d.scp"))
    for spec in (f"ark:{tmp_path}/d.ark", f"scp:{tmp_path}/d.scp"):
        _same(list(read_features(spec)), {k: v.astype(np.float32) for k, v in doubles.items()})


def test_an_archive_may_end_in_blank_space_and_an_empty_table_yields_nothing(tmp_path):
    mats = _mats()
    kaldiio.save_ark(str(tmp_path / "t.ark"), mats, text=True)
    with open(tmp_path / "t.ark", "ab") as fh:
        fh.write(b"\n\n")
    _same(list(read_features(f"ark:{tmp_path}/t.ark")), mats, atol=1e-6)
    (tmp_path / "e.ark").write_bytes(b"")
    (tmp_path / "e.scp").write_bytes(b"")
    assert list(read_features(f"ark:{tmp_path}/e.ark")) == []
    assert list(read_features(f"scp:{tmp_path}/e.scp")) == []


def test_relative_scp_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    mats = _mats()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    kaldiio.save_ark("data/f.ark", mats, scp="data/f.scp")
    assert (tmp_path / "data/f.scp").read_text().startswith("u0 data/f.ark:")
    _same(list(read_features("scp:data/f.scp")), mats)
    monkeypatch.chdir(tmp_path / "data")  # Kaldi: relative to the cwd, not to the scp
    with pytest.raises(UserError, match=r"scp:f\.scp: line 1: utterance 'u0': file "
                                        r"'data/f\.ark' not found"):
        list(read_features("scp:f.scp"))


def test_reads_ark_and_scp_from_stdin(tmp_path):
    mats = _mats()
    kaldiio.save_ark(str(tmp_path / "f.ark"), mats, scp=str(tmp_path / "f.scp"))
    code = ("from emdist.io.tables import read_features\n"
            "for k, m in read_features({spec!r}):\n"
            "    print(k, m.shape[0], m.shape[1], repr(float(m.sum())))")
    expected = "".join(f"{k} {m.shape[0]} {m.shape[1]} {float(m.sum())!r}\n"
                       for k, m in mats.items())
    for spec, stdin in (("ark:-", (tmp_path / "f.ark").read_bytes()),
                        ("ark,s,cs:-", (tmp_path / "f.ark").read_bytes()),
                        ("scp:-", (tmp_path / "f.scp").read_bytes())):
        out = _python(code.format(spec=spec), stdin)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode() == expected


def test_bad_stdin_is_a_one_line_error(tmp_path):
    code = ("import sys\nfrom emdist.errors import UserError\n"
            "from emdist.io.tables import read_features\n"
            "try:\n    list(read_features('ark:-'))\n"
            "except UserError as e:\n    print(e)\n    sys.exit(2)\n")
    out = _python(code, b"u1 \0BFM \x04\x05\x00\x00\x00\x04\x03\x00\x00\x00" + b"\0" * 7)
    assert out.returncode == 2, out.stderr.decode()
    assert out.stdout.decode().startswith("ark:-: entry 1: cannot read utterance 'u1': ")
    assert out.stdout.decode().count("\n") == 1


def _setup_bad(tmp_path: Path, case: str) -> tuple[str, str]:
    """Write the files of a bad-input case; return (rspecifier, expected message part)."""
    d = tmp_path
    good = _mats()
    kaldiio.save_ark(str(d / "good.ark"), good, scp=str(d / "good.scp"))
    scp_lines = (d / "good.scp").read_text().splitlines()
    raw = (d / "good.ark").read_bytes()
    if case == "no prefix":
        return f"{d}/good.scp", RSPECIFIER_USAGE
    if case == "a data dir path":
        return str(d), RSPECIFIER_USAGE
    if case == "unknown option":
        return f"ark,zz:{d}/good.ark", "unknown option 'zz'"
    if case == "ark and scp":
        return f"ark,scp:{d}/good.ark,{d}/good.scp", "not both"
    if case == "nothing after the colon":
        return "ark:", "no file after ':'"
    if case == "missing scp":
        return f"scp:{d}/nope.scp", "not found"
    if case == "missing ark":
        return f"ark:{d}/nope.ark", "not found"
    if case == "a directory":
        return f"scp:{d}", "is a directory"
    if case == "scp one field":
        (d / "bad.scp").write_text(f"{scp_lines[0]}\nu1\n{scp_lines[2]}\n")
        return f"scp:{d}/bad.scp", "line 2: expected 'utt-id rxfilename', got 'u1'"
    if case == "scp empty line":
        (d / "bad.scp").write_text(f"{scp_lines[0]}\n\n{scp_lines[2]}\n")
        return f"scp:{d}/bad.scp", "line 2: expected 'utt-id rxfilename', got an empty line"
    if case == "scp not utf-8":
        (d / "bad.scp").write_bytes(raw)
        return f"scp:{d}/bad.scp", "line 1: not valid UTF-8"
    if case == "scp missing ark":
        (d / "bad.scp").write_text(f"{scp_lines[0]}\nu1 {d}/gone.ark:3\n")
        return f"scp:{d}/bad.scp", f"line 2: utterance 'u1': file '{d}/gone.ark' not found"
    if case == "scp bad offset":
        (d / "bad.scp").write_text(f"{scp_lines[0]}\nu1 {d}/good.ark:7\n")
        return f"scp:{d}/bad.scp", "line 2: utterance 'u1'"
    if case == "scp offset past the end":
        (d / "bad.scp").write_text(f"u0 {d}/good.ark:99999\n")
        return f"scp:{d}/bad.scp", "line 1: utterance 'u0'"
    if case == "scp truncated ark":
        (d / "good.ark").write_bytes(raw[:-10])
        return f"scp:{d}/good.scp", "line 3: utterance 'u2'"
    if case == "truncated data":
        (d / "bad.ark").write_bytes(raw[:-10])
        return f"ark:{d}/bad.ark", "entry 3: cannot read utterance 'u2'"
    if case == "truncated at a value boundary":
        (d / "bad.ark").write_bytes(raw[:-8])
        return f"ark:{d}/bad.ark", "entry 3: cannot read utterance 'u2'"
    if case == "truncated header":
        cut = raw.index(b"u2 ") + 9
        (d / "bad.ark").write_bytes(raw[:cut])
        return f"ark:{d}/bad.ark", "entry 3: cannot read utterance 'u2'"
    if case == "truncated after a key":
        cut = raw.index(b"u2 ") + 3
        (d / "bad.ark").write_bytes(raw[:cut])
        return f"ark:{d}/bad.ark", "entry 3: cannot read utterance 'u2'"
    if case == "huge header":
        (d / "bad.ark").write_bytes(b"u0 \0BFM \x04" + struct.pack("<i", 2**31 - 1) + b"\x04"
                                    + struct.pack("<i", 2**31 - 1) + b"\0" * 64)
        return f"ark:{d}/bad.ark", "entry 1: cannot read utterance 'u0'"
    if case == "negative size":
        (d / "bad.ark").write_bytes(b"u0 \0BFM \x04" + struct.pack("<i", -5) + b"\x04"
                                    + struct.pack("<i", 3) + b"\0" * 64)
        return f"ark:{d}/bad.ark", "entry 1: cannot read utterance 'u0'"
    if case == "text, not an ark":
        (d / "bad.ark").write_text("hello world\n")
        return f"ark:{d}/bad.ark", "entry 1: cannot read utterance 'hello'"
    if case == "an scp read as an ark":
        return f"ark:{d}/good.scp", "entry 1: cannot read utterance 'u0'"
    if case == "random bytes":
        (d / "bad.ark").write_bytes(bytes(range(256)) * 4)
        return f"ark:{d}/bad.ark", "entry 1: cannot read"
    if case == "pickle entry":
        kaldiio.save_ark(str(d / "bad.ark"), {"u0": good["u0"]}, write_function="pickle")
        return f"ark:{d}/bad.ark", "entry 1: cannot read utterance 'u0'"
    if case == "int vector":
        (d / "bad.ark").write_bytes(b"u0 \0B\x04\x02\x00\x00\x00\x04\x01\x00\x00\x00"
                                    b"\x04\x02\x00\x00\x00")
        return f"ark:{d}/bad.ark", "entry 1: cannot read utterance 'u0'"
    if case == "failing command":
        return "ark:exit 3 |", "the command exited with status 3"
    vectors = {"u0": good["u0"], "u1": np.arange(4, dtype=np.float32), "u2": good["u2"]}
    empty = {"u0": good["u0"], "u1": np.zeros((0, 4), np.float32)}
    dims = {"u0": good["u0"], "u1": np.ones((3, 5), np.float32)}
    floats = {"u0": good["u0"], "u1": np.float32(1.5)}
    for name, mats, message in (
            ("vector", vectors, "utterance 'u1': is a vector of 4 values, not a matrix"),
            ("zero frames", empty, "utterance 'u1': has no frames (0x4 matrix)"),
            ("differing dims", dims, "utterance 'u1': has dim 5 but earlier utterances have "
                                     "dim 4"),
            ("text float", floats, "cannot read utterance 'u1': expected a Kaldi matrix "
                                   "('\\0B' binary or '[' text), got '1.5 \\n'")):
        if case == f"ark {name}":
            if name == "text float":
                (d / "bad.ark").write_bytes(b"u0 " + _text_mat(good["u0"]) + b"u1 1.5 \n")
            else:
                kaldiio.save_ark(str(d / "bad.ark"), mats)
            return f"ark:{d}/bad.ark", f"entry 2: {message}"
        if case == f"scp {name}" and name != "text float":
            kaldiio.save_ark(str(d / "bad.ark"), mats, scp=str(d / "bad.scp"))
            return f"scp:{d}/bad.scp", f"line 2: {message}" if name != "vector" else \
                "line 2: utterance 'u1'"
    raise AssertionError(case)


def _text_mat(m: np.ndarray) -> bytes:
    rows = "".join("\n  " + " ".join(f"{x:.7g}" for x in row) + " " for row in m)
    return f" [{rows}]\n".encode()


BAD_CASES = [
    "no prefix", "a data dir path", "unknown option", "ark and scp", "nothing after the colon",
    "missing scp", "missing ark", "a directory", "scp one field", "scp empty line",
    "scp not utf-8", "scp missing ark", "scp bad offset", "scp offset past the end",
    "scp truncated ark", "truncated data", "truncated at a value boundary", "truncated header",
    "truncated after a key", "huge header", "negative size", "text, not an ark",
    "an scp read as an ark", "random bytes", "pickle entry", "int vector", "failing command",
    "ark vector", "scp vector", "ark zero frames", "scp zero frames", "ark differing dims",
    "scp differing dims", "ark text float",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_one_line_user_error_naming_the_rspecifier(tmp_path, case):
    spec, part = _setup_bad(tmp_path, case)
    with pytest.raises(UserError) as info:
        list(read_features(spec))
    message = str(info.value)
    assert type(info.value) is UserError
    assert spec in message and part in message, message
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(spec if case not in ("no prefix", "a data dir path")
                              else repr(spec)), message


def test_the_rspecifier_and_scp_are_checked_at_the_call(tmp_path):
    (tmp_path / "bad.scp").write_text("u0\n")
    with pytest.raises(UserError, match="line 1"):
        read_features(f"scp:{tmp_path}/bad.scp")  # not iterated
    with pytest.raises(UserError, match="not found"):
        read_features(f"ark:{tmp_path}/nope.ark")


def test_permissive_skips_unreadable_scp_entries_and_ends_a_bad_archive(tmp_path):
    mats = _mats()
    kaldiio.save_ark(str(tmp_path / "f.ark"), mats, scp=str(tmp_path / "f.scp"))
    lines = (tmp_path / "f.scp").read_text().splitlines()
    (tmp_path / "p.scp").write_text(f"{lines[0]}\nux {tmp_path}/gone.ark:3\n{lines[2]}\n")
    with pytest.warns(TableWarning, match="line 2: utterance 'ux': skipped"):
        got = list(read_features(f"scp,p:{tmp_path}/p.scp"))
    _same(got, {"u0": mats["u0"], "u2": mats["u2"]})
    with pytest.raises(UserError, match="line 2"):  # np after p: not permissive
        list(read_features(f"scp,p,np:{tmp_path}/p.scp"))
    (tmp_path / "cut.ark").write_bytes((tmp_path / "f.ark").read_bytes()[:-10])
    with pytest.warns(TableWarning, match="entry 3: .*reading stops here"):
        got = list(read_features(f"ark,p:{tmp_path}/cut.ark"))
    _same(got, {"u0": mats["u0"], "u1": mats["u1"]})


# -- writing -------------------------------------------------------------------------------

# values kaldiio prints as C++ prints them at precision 7: kaldiio writes a text number as
# the repr of its double value (its write_array_ascii gets "<" as the format), which differs
# from Kaldi's for whole numbers ("1.0" against "1") and for values a float32 holds only
# approximately (0.1 is "0.10000000149011612" against "0.1")
SHORT = np.array([0.5, -1.25, 3.75, 0.375, -1024.5, 0.0078125, 12345.5], dtype=np.float32)


def _vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"a": rng.standard_normal(5).astype(np.float32), "b-2": np.zeros(0, np.float32),
            "c_3": rng.standard_normal(1).astype(np.float32)}


@pytest.mark.parametrize("opts", ["ark", "ark,scp", "ark,f", "ark,b,scp"])
def test_binary_vectors_are_byte_for_byte_kaldiio_s(tmp_path, monkeypatch, opts):
    files = "o.ark,o.scp" if "scp" in opts else "o.ark"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (ours, theirs):
        d.mkdir()
    monkeypatch.chdir(ours)
    with TableWriter(f"{opts}:{files}") as writer:
        for key, vec in _vectors().items():
            writer.write(key, vec)
    monkeypatch.chdir(theirs)
    with kaldiio.WriteHelper(f"{opts.replace(',b', '').replace(',f', '')}:{files}") as w:
        for key, vec in _vectors().items():
            w(key, vec)
    for name in files.split(","):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes()
    assert (ours / "o.ark").read_bytes().startswith(b"a \0BFV \x04\x05\x00\x00\x00")


def test_text_vectors_are_byte_for_byte_kaldiio_s_and_kaldi_s(tmp_path):
    vecs = {"a": SHORT, "b": SHORT[:2], "e": np.zeros(0, np.float32)}
    with TableWriter(f"ark,t,scp:{tmp_path}/o.ark,{tmp_path}/o.scp") as writer:
        for key, vec in vecs.items():
            writer.write(key, vec)
    with kaldiio.WriteHelper(f"ark,t,scp:{tmp_path}/k.ark,{tmp_path}/k.scp") as w:
        for key, vec in vecs.items():
            w(key, vec)
    assert (tmp_path / "o.ark").read_bytes() == (tmp_path / "k.ark").read_bytes()
    scp = (tmp_path / "o.scp").read_text()
    assert scp == (tmp_path / "k.scp").read_text().replace("k.ark", "o.ark")
    # Kaldi's VectorBase::Write in text: " [ " then each value and a space, then "]\n"
    assert (tmp_path / "o.ark").read_bytes() == (
        b"a  [ 0.5 -1.25 3.75 0.375 -1024.5 0.0078125 12345.5 ]\n"
        b"b  [ 0.5 -1.25 ]\ne  [ ]\n")


def test_text_vectors_print_numbers_as_cpp_at_precision_7(tmp_path):
    vec = np.array([1.0, 1 / 3, -2.0e7, 123456789.0, 1e-30, np.inf, -np.inf], np.float32)
    with TableWriter(f"ark,t:{tmp_path}/o.ark") as writer:
        writer.write("u", vec.astype(np.float64))  # written as float32, as Kaldi's BaseFloat
    assert (tmp_path / "o.ark").read_bytes() == (
        b"u  [ 1 0.3333333 -2e+07 1.234568e+08 1e-30 inf -inf ]\n")
    with TableWriter(f"ark,t:{tmp_path}/f.ark") as writer:
        for i, value in enumerate([*vec.tolist(), float("nan"), -1e-5]):
            writer.write(f"k{i}", value)
    assert (tmp_path / "f.ark").read_bytes() == (
        b"k0 1 \nk1 0.3333333 \nk2 -2e+07 \nk3 1.234568e+08 \nk4 1e-30 \nk5 inf \n"
        b"k6 -inf \nk7 nan \nk8 -1e-05 \n")


@pytest.mark.parametrize("text", [False, True])
def test_vectors_read_back_with_kaldiio(tmp_path, text):
    opts = "ark,t,scp" if text else "ark,scp"
    vecs = {k: v for k, v in _vectors().items() if v.size}  # kaldiio reads " [ ]" as 0-d
    with TableWriter(f"{opts}:{tmp_path}/o.ark,{tmp_path}/o.scp") as writer:
        for key, vec in vecs.items():
            writer.write(key, vec)
    atol = 1e-6 if text else 0.0
    for loaded in (dict(kaldiio.load_ark(str(tmp_path / "o.ark"))),
                   dict(kaldiio.load_scp(str(tmp_path / "o.scp")))):
        assert list(loaded) == list(vecs)
        for key, vec in vecs.items():
            np.testing.assert_allclose(loaded[key].reshape(-1), vec, atol=atol, rtol=1e-6)


def test_text_floats_read_back_with_kaldiio(tmp_path):
    # kaldiio reads "1e-05", a number without ".", as an int32 and fails, and misreads a
    # last entry of under 5 bytes after the key: neither here
    floats = {"a": 1.5, "b": -2.0, "e": 7, "d": np.float32(-0.001), "c": np.float64(1 / 3)}
    with TableWriter(f"ark,t,scp:{tmp_path}/o.ark,{tmp_path}/o.scp") as writer:
        for key, value in floats.items():
            writer.write(key, value)
    # Kaldi's BasicHolder<float>: WriteBasicType writes the value and a space, then "\n"
    assert (tmp_path / "o.ark").read_bytes() == (
        b"a 1.5 \nb -2 \ne 7 \nd -0.001 \nc 0.3333333 \n")
    assert (tmp_path / "o.scp").read_text() == (
        f"a {tmp_path}/o.ark:2\nb {tmp_path}/o.ark:9\ne {tmp_path}/o.ark:15\n"
        f"d {tmp_path}/o.ark:20\nc {tmp_path}/o.ark:30\n")
    for loaded in (dict(kaldiio.load_ark(str(tmp_path / "o.ark"))),
                   dict(kaldiio.load_scp(str(tmp_path / "o.scp")))):
        assert list(loaded) == list(floats)
        for key, value in floats.items():
            assert loaded[key].shape == (1,)
            assert float(loaded[key][0]) == pytest.approx(float(value), rel=1e-6)


def test_binary_floats_are_kaldi_s_bytes(tmp_path):
    # kaldiio cannot read binary floats ("\0B\x04" is its int32 vector), so the bytes are
    # built here from Kaldi's format: key, space, "\0B", WriteBasicType<float>: size byte 4
    # then the float32 little-endian
    values = {"utt-1": 1.5, "utt-2": np.float64(-1 / 3), "utt-3": np.float32(1e30)}
    with TableWriter(f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp") as writer:
        for key, value in values.items():
            writer.write(key, value)
    expected = b"".join(key.encode() + b" \0B\x04" + struct.pack("<f", value)
                        for key, value in values.items())
    raw = (tmp_path / "o.ark").read_bytes()
    assert raw == expected
    lines = (tmp_path / "o.scp").read_text().splitlines()
    assert [line.split()[0] for line in lines] == list(values)
    for line, value in zip(lines, values.values(), strict=True):
        offset = int(line.rsplit(":", 1)[1])
        assert line.split()[1] == f"{tmp_path}/o.ark:{offset}"
        assert raw[offset:offset + 3] == b"\0B\x04"  # the offset points at "\0B"
        assert struct.unpack("<f", raw[offset + 3:offset + 7])[0] == np.float32(value)


def test_the_scp_names_the_archive_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with TableWriter("ark,scp:o.ark,o.scp") as writer:
        writer.write("a", np.ones(2, np.float32))
    assert (tmp_path / "o.scp").read_text() == "a o.ark:2\n"
    np.testing.assert_array_equal(kaldiio.load_scp("o.scp")["a"], np.ones(2, np.float32))


def test_an_exception_inside_the_with_leaves_no_file(tmp_path):
    (tmp_path / "old.ark").write_bytes(b"old")
    for spec in (f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp", f"ark,t:{tmp_path}/old.ark"):
        with pytest.raises(KeyboardInterrupt):
            with TableWriter(spec) as writer:
                writer.write("a", 1.0)
                raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.ark"]
    assert (tmp_path / "old.ark").read_bytes() == b"old"


def test_files_appear_only_when_the_with_ends(tmp_path):
    with TableWriter(f"ark:{tmp_path}/o.ark") as writer:
        writer.write("a", 1.0)
        assert not (tmp_path / "o.ark").exists()
    assert (tmp_path / "o.ark").read_bytes() == b"a \0B\x04" + struct.pack("<f", 1.0)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o.ark").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("key", ["", "a b", "a\tb", "a\n", " a"])
def test_bad_keys_are_user_errors(tmp_path, key):
    with pytest.raises(UserError, match="empty or holds whitespace") as info:
        with TableWriter(f"ark:{tmp_path}/o.ark") as writer:
            writer.write(key, 1.0)
    assert "\n" not in str(info.value).replace(repr(key), "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec, part", [
    ("likes.ark", "no 'ark:' or 'scp:'"),
    ("scp:{d}/o.scp", "writing only an scp is not supported"),
    ("ark,scp:{d}/o.ark", "needs two files"),
    ("ark,zz:{d}/o.ark", "unknown option 'zz'"),
    ("ark,scp:-,{d}/o.scp", "write the archive to a file, not to stdout"),
    ("ark:", "no file after ':'"),
    ("ark:gzip > {d}/o.gz |", "an output command is written '| command'"),
    ("ark:|", "no command after '|'"),
    ("ark,scp:| gzip,{d}/o.scp", "an scp needs the archive's offsets"),
    ("ark:{d}/missing/o.ark", "cannot write {d}/missing/o.ark"),
    ("ark:{d}", "cannot write {d}: it is a directory"),
    ("ark,scp:{d}/o.ark,{d}/missing/o.scp", "cannot write {d}/missing/o.scp"),
])
def test_bad_wspecifiers_and_unwritable_paths_are_one_line_user_errors(tmp_path, spec, part):
    spec, part = spec.format(d=tmp_path), part.format(d=tmp_path)
    with pytest.raises(UserError) as info:
        TableWriter(spec)
    assert part in str(info.value) and spec in str(info.value)
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_table_holds_one_type_of_value(tmp_path):
    with pytest.raises(TypeError, match="holds one type"):
        with TableWriter(f"ark:{tmp_path}/o.ark") as writer:
            writer.write("a", 1.0)
            writer.write("b", np.ones(3))
    for bad in (np.ones((2, 2)), "1.5", True, None):
        with pytest.raises(TypeError), TableWriter(f"ark:{tmp_path}/o.ark") as writer:
            writer.write("a", bad)
    assert list(tmp_path.iterdir()) == []


def test_writes_to_a_command_as_kaldi_wxfilenames_do(tmp_path):
    """``ark:| gzip -c > out.gz``: the table reaches the command's standard input; a command
    that fails or stops reading is a one-line error with its exit status."""
    import gzip

    out = tmp_path / "l.ark.gz"
    with TableWriter(f"ark:| gzip -c > {out}") as writer:
        writer.write("a", np.arange(3.0))
        writer.write("b", np.ones(2))
    with TableWriter(f"ark:{tmp_path / 'l.ark'}") as writer:
        writer.write("a", np.arange(3.0))
        writer.write("b", np.ones(2))
    assert gzip.decompress(out.read_bytes()) == (tmp_path / "l.ark").read_bytes()
    with pytest.raises(UserError, match=r"the command 'cat > /dev/null; exit 3' exited "
                                        r"\(exit status 3\)"):
        with TableWriter("ark:| cat > /dev/null; exit 3") as writer:
            writer.write("a", 1.0)
    with pytest.raises(UserError, match=r"'exit 0' stopped reading \(exit status 0\)"):
        with TableWriter("ark:| exit 0") as writer:
            for i in range(20000):  # more than a pipe holds
                writer.write(f"u{i}", np.ones(100))


@pytest.mark.parametrize("spec", ["ark:-", "ark,t:-", "ark,b:-"])
def test_writes_to_stdout(tmp_path, spec):
    code = ("import numpy as np\nfrom emdist.io.tables import TableWriter\n"
            f"with TableWriter({spec!r}) as w:\n"
            "    w.write('a', 0.5)\n    w.write('b', -2.0)\n"
            f"with TableWriter({spec!r}) as w:\n"
            "    w.write('v', np.array([0.5, 1.0], np.float32))\n")
    out = _python(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    if spec == "ark,t:-":
        assert out.stdout == b"a 0.5 \nb -2 \nv  [ 0.5 1 ]\n"
    else:
        assert out.stdout == (b"a \0B\x04" + struct.pack("<f", 0.5) + b"b \0B\x04"
                              + struct.pack("<f", -2.0) + b"v \0BFV \x04\x02\x00\x00\x00"
                              + struct.pack("<2f", 0.5, 1.0))
    assert list(tmp_path.iterdir()) == []
