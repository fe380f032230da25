"""Kaldi's GMM accumulator files (``<GMMACCS>``, diag and full), text and binary:
``emdist.io.kaldi.read_kaldi_accs`` / ``write_kaldi_accs`` against the golden files written
by Kaldi's own ``gmm-global-sum-accs`` (``tests/data/kaldi-models/acc.sum.kaldi.*``)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from helpers import KALDI_MODELS, corrupt_and_read, read_fails_in_one_line
from scipy.special import logsumexp

import emdist
from emdist.errors import UserError
from emdist.io import modelio
from emdist.io.kaldi import (
    KaldiAccs,
    kaldi_accs_bytes,
    kaldi_file_kind,
    read_kaldi_accs,
    read_kaldi_model,
    read_kaldi_stats,
    write_kaldi_accs,
)
from emdist.models.stats import GmmStats

ACC_TXT = KALDI_MODELS / "acc.sum.kaldi.txt"
ACC_BIN = KALDI_MODELS / "acc.sum.kaldi.bin"
ORDERS = ("zeroth", "first", "second")


def text_error(x) -> np.ndarray:
    """Half a unit in the 7th significant digit of each value (the rounding of Kaldi's
    text), plus one float32 spacing (reading that text back as float32)."""
    x = np.abs(np.asarray(x, np.float64))
    seventh = 0.5 * 10.0 ** (np.floor(np.log10(np.where(x > 0, x, 1.0))) - 6)
    return seventh + np.spacing(x.astype(np.float32))


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def random_stats(rng, k: int, d: int, cov_type: str, offset: float = 0.0) -> GmmStats:
    """Statistics of random frames under random posteriors (so they are consistent)."""
    x = rng.normal(size=(500, d)) * rng.uniform(0.5, 2.0, d) + offset
    post = rng.dirichlet(np.ones(k), size=len(x))
    second = np.einsum("tk,td->kd", post, x * x) if cov_type == "diag" else \
        np.einsum("tk,td,te->kde", post, x, x)
    return GmmStats(post.sum(0), post.T @ x, second, loglike=-123.0, frames=len(x))


@pytest.fixture(scope="module")
def golden() -> tuple[KaldiAccs, KaldiAccs]:
    return read_kaldi_accs(ACC_TXT), read_kaldi_accs(ACC_BIN)


# -- Kaldi's files ------------------------------------------------------------------------

def test_golden_text_and_binary_read_to_the_same_statistics(golden):
    text, binary = golden
    for accs in golden:
        assert accs.flags == "mvw"
        assert accs.stats.covariance_type == "diag"
        assert (accs.stats.n_components, accs.stats.dim) == (8, 39)
        assert accs.stats.loglike == 0.0
        assert accs.stats.frames == round(accs.stats.occupancy)
        for name in ORDERS:
            values = getattr(accs.stats, name)
            assert values.dtype == np.float64
            assert np.array_equal(values, values.astype(np.float32))  # Kaldi writes float32
    # the text holds Kaldi's float32 values to 7 significant digits
    for name in ORDERS:
        t, b = getattr(text.stats, name), getattr(binary.stats, name)
        assert (np.abs(t - b) <= text_error(b)).all()


def test_occupancy_sums_to_the_train_frames(golden):
    frames = emdist.data.datadir.load_data_dir(emdist.corpora.digits_dir("train")).num_frames
    assert frames == 18593
    for accs in golden:
        assert accs.stats.occupancy == pytest.approx(frames, rel=5e-7)
        assert accs.stats.frames == frames


@pytest.mark.usefixtures("one_blas_thread")
def test_golden_accs_are_the_statistics_of_the_golden_model(golden, digits_frames):
    """Posteriors computed here (float64) from ``diag_digits_k8`` over all train frames."""
    gmm = read_kaldi_model(KALDI_MODELS / "diag_digits_k8.kaldi.txt")
    x = digits_frames.astype(np.float64)
    var = gmm.covariances
    log_dens = (-0.5 * (x.shape[1] * np.log(2 * np.pi) + np.log(var).sum(1))[None, :]
                - 0.5 * (((x[:, None, :] - gmm.means[None]) ** 2) / var[None]).sum(2))
    joint = np.log(gmm.weights)[None, :] + log_dens
    post = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
    ours = {"zeroth": post.sum(0), "first": post.T @ x, "second": post.T @ (x * x)}
    for accs in golden:
        for name in ORDERS:
            assert rel(getattr(accs.stats, name), ours[name]) < 1e-4, name


def test_rewrites_are_byte_identical_to_kaldis(golden, tmp_path):
    text, binary = golden
    assert kaldi_accs_bytes(text.stats, binary=False) == ACC_TXT.read_bytes()
    assert kaldi_accs_bytes(binary.stats, binary=True) == ACC_BIN.read_bytes()
    # the binary file's values printed as Kaldi prints them are the text file
    assert kaldi_accs_bytes(binary.stats, binary=False) == ACC_TXT.read_bytes()
    write_kaldi_accs(tmp_path / "a.acc", binary.stats)
    assert (tmp_path / "a.acc").read_bytes() == ACC_BIN.read_bytes()
    write_kaldi_accs(tmp_path / "a.txt", text.stats, binary=False, flags="wvm")
    assert (tmp_path / "a.txt").read_bytes() == ACC_TXT.read_bytes()


def test_load_stats_reads_kaldi_accumulators(golden):
    assert modelio.FOREIGN_READERS["kaldi-stats"] is read_kaldi_stats
    for path, accs in zip((ACC_TXT, ACC_BIN), golden, strict=True):
        stats = modelio.load_stats(path)
        assert list(stats) == ["global"]
        for name in ORDERS:
            assert np.array_equal(getattr(stats["global"], name), getattr(accs.stats, name))
    assert list(read_kaldi_stats(ACC_BIN, label="Z")) == ["Z"]


def test_file_kind():
    assert kaldi_file_kind(ACC_TXT) == "accs"
    assert kaldi_file_kind(ACC_BIN) == "accs"
    for name in ("diag_small.kaldi.txt", "diag_small.kaldi.bin", "full_small.kaldi.bin"):
        assert kaldi_file_kind(KALDI_MODELS / name) == "model"
    assert kaldi_file_kind(KALDI_MODELS / "parameters.json") is None
    with pytest.raises(UserError, match="no such file"):
        kaldi_file_kind(KALDI_MODELS / "missing.acc")


# -- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_round_trip_diag(binary, tmp_path):
    stats = random_stats(np.random.default_rng(1), 3, 4, "diag")
    path = tmp_path / "d.acc"
    write_kaldi_accs(path, stats, binary=binary)
    accs = read_kaldi_accs(path)
    assert accs.flags == "mvw"
    assert accs.stats.frames == 500 and accs.stats.loglike == 0.0
    for name in ORDERS:
        want = getattr(stats, name).astype(np.float32).astype(np.float64)
        got = getattr(accs.stats, name)
        if binary:
            assert np.array_equal(got, want), name
        else:
            assert (np.abs(got - want) <= text_error(want)).all(), name


@pytest.mark.parametrize("binary", [True, False])
def test_round_trip_full_through_the_centring(binary, tmp_path):
    # frames far from the origin: stored uncentred in float32, the covariance would be lost
    stats = random_stats(np.random.default_rng(2), 3, 4, "full", offset=1000.0)
    data = kaldi_accs_bytes(stats, binary=binary)
    assert b"<FULLVARACCS> " in data and b"<DIAGVARACCS>" not in data
    assert data.startswith(b"\0B<GMMACCS> " if binary else b"<GMMACCS> ")
    path = tmp_path / "f.acc"
    path.write_bytes(data)
    accs = read_kaldi_accs(path)
    assert accs.flags == "mvw" and accs.stats.covariance_type == "full"
    got = accs.stats
    assert np.allclose(got.zeroth, stats.zeroth, rtol=1e-6, atol=0)
    assert np.allclose(got.first, stats.first, rtol=1e-6, atol=0)
    assert rel(got.second, stats.second) < 1e-6
    assert np.array_equal(got.second, got.second.transpose(0, 2, 1))
    for k in range(3):  # covariances survive: the file held them centred
        def cov(s, k=k):
            m = s.first[k] / s.zeroth[k]
            return s.second[k] / s.zeroth[k] - np.outer(m, m)
        assert rel(cov(got), cov(stats)) < 1e-4


def test_kaldis_centred_values_in_the_binary_file():
    stats = random_stats(np.random.default_rng(3), 2, 3, "full", offset=5.0)
    data = kaldi_accs_bytes(stats)
    at = data.index(b"<FULLVARACCS> ") + len(b"<FULLVARACCS> ")
    assert data[at:at + 8] == b"FP \x04" + struct.pack("<i", 3)
    stored = np.frombuffer(data, "<f4", 6, at + 8)
    m, o = stats.first[0], stats.zeroth[0]
    centred = stats.second[0] - np.outer(m, m) / o
    assert np.allclose(stored, centred[np.tril_indices(3)].astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("flags", ["w", "mw"])
def test_flag_subsets_write_empty_and_read_zeros(cov_type, binary, flags, tmp_path):
    stats = random_stats(np.random.default_rng(4), 2, 3, cov_type)
    data = kaldi_accs_bytes(stats, binary=binary, flags=flags)
    bits = {"w": 4, "mw": 5}[flags]
    assert (b"<FLAGS> \xfe" + bytes([bits, 0]) if binary else f"<FLAGS> {bits} ".encode()) in data
    empty = b"FM \x04\0\0\0\0\x04\0\0\0\0" if binary else b" [ ]\n"
    if flags == "w":
        assert b"<MEANACCS> " + empty in data
    if cov_type == "diag":
        assert b"<DIAGVARACCS> " + empty in data
    else:
        assert b"VARACCS" not in data  # AccumFullGmm leaves the token out
    path = tmp_path / "s.acc"
    path.write_bytes(data)
    accs = read_kaldi_accs(path)
    assert accs.flags == flags
    assert accs.stats.covariance_type == cov_type
    assert accs.stats.second.shape == stats.second.shape
    assert not accs.stats.second.any()
    if flags == "w":
        assert accs.stats.first.shape == (2, 3) and not accs.stats.first.any()
    else:
        assert np.allclose(accs.stats.first, stats.first, rtol=1e-6)
    assert np.allclose(accs.stats.zeroth, stats.zeroth, rtol=1e-6)


def test_flags_as_kaldi_spells_them(golden):
    stats = golden[1].stats
    assert kaldi_accs_bytes(stats, flags="v") == kaldi_accs_bytes(stats, flags="mvw")
    assert kaldi_accs_bytes(stats, flags="wvm") == ACC_BIN.read_bytes()
    assert b"<FLAGS> \xfe\x0f\x00" in kaldi_accs_bytes(stats, flags="a")
    # AugmentGmmFlags adds the weights to flags without them (Kaldi warns and goes on)
    assert b"<FLAGS> \xfe\x04\x00" in kaldi_accs_bytes(stats, flags="")
    assert b"<FLAGS> \xfe\x0c\x00" in kaldi_accs_bytes(stats, flags="t")
    for bad in ("x", "mvwq"):
        with pytest.raises(UserError, match="flags"):
            kaldi_accs_bytes(stats, flags=bad)


def test_double_values_are_accepted_and_kept(tmp_path):
    stats = random_stats(np.random.default_rng(5), 2, 3, "diag")
    data = (b"\0B<GMMACCS> <VECSIZE> \x04" + struct.pack("<i", 3) + b"<NUMCOMPONENTS> \x04"
            + struct.pack("<i", 2) + b"<FLAGS> \xfe\x07\x00<OCCUPANCY> DV \x04"
            + struct.pack("<i", 2) + stats.zeroth.astype("<f8").tobytes())
    for name, arr in (("MEANACCS", stats.first), ("DIAGVARACCS", stats.second)):
        data += (f"<{name}> DM ".encode() + b"\x04" + struct.pack("<i", 2) + b"\x04"
                 + struct.pack("<i", 3) + arr.astype("<f8").tobytes())
    path = tmp_path / "double.acc"
    path.write_bytes(data + b"</GMMACCS> ")
    accs = read_kaldi_accs(path)
    for name in ORDERS:
        assert np.array_equal(getattr(accs.stats, name), getattr(stats, name))


def test_writer_refuses_what_kaldi_cannot_hold(tmp_path):
    good = random_stats(np.random.default_rng(6), 2, 3, "diag")
    bad = GmmStats(good.zeroth, good.first, np.full((2, 3), np.nan))
    with pytest.raises(UserError, match="NaN"):
        write_kaldi_accs(tmp_path / "x.acc", bad)
    big = GmmStats(good.zeroth, good.first * 1e300, good.second)
    with pytest.raises(UserError, match="float32"):
        write_kaldi_accs(tmp_path / "x.acc", big)
    assert not (tmp_path / "x.acc").exists()


# -- hostile input ---------------------------------------------------------------------------

def expect_user_error(path, data: bytes, what: str = "", match: str | None = None) -> str:
    message = read_fails_in_one_line(read_kaldi_accs, path, data, what)
    if match is not None:
        assert match in message, (what, message)
    return message


def test_every_truncation_of_the_binary_file_is_a_user_error(tmp_path):
    data = ACC_BIN.read_bytes()
    path = tmp_path / "cut.acc"
    for cut in range(len(data)):
        message = expect_user_error(path, data[:cut], f"cut {cut}")
        if cut > 2:
            assert "Kaldi binary accumulator file" in message and "at byte" in message


def test_every_truncation_of_the_text_file_is_a_user_error(tmp_path):
    data = ACC_TXT.read_bytes()
    path = tmp_path / "cut.txt"
    for cut in range(len(data)):  # the last: no blank after </GMMACCS>, as Kaldi's ReadToken
        message = expect_user_error(path, data[:cut], f"cut {cut}")
        if cut > 0:
            assert "Kaldi text accumulator file" in message and "at byte" in message


def _binary_with(data: bytes, token: bytes, value: bytes) -> bytes:
    at = data.index(token) + len(token)
    return data[:at] + value + data[at + len(value):]


def test_sizes_that_disagree_are_user_errors(tmp_path):
    txt, binary = ACC_TXT.read_bytes(), ACC_BIN.read_bytes()
    path = tmp_path / "bad.acc"
    cases = {
        "txt dim": (txt.replace(b"<VECSIZE> 39", b"<VECSIZE> 38"), "<VECSIZE>"),
        "txt k": (txt.replace(b"<NUMCOMPONENTS> 8", b"<NUMCOMPONENTS> 9"), "<NUMCOMPONENTS>"),
        "txt negative": (txt.replace(b"<VECSIZE> 39", b"<VECSIZE> -39"), "positive"),
        "txt huge": (txt.replace(b"<VECSIZE> 39", b"<VECSIZE> 99999999999"), "<VECSIZE>"),
        "txt word": (txt.replace(b"<VECSIZE> 39", b"<VECSIZE> abc"), "<VECSIZE>"),
        "txt flags": (txt.replace(b"<FLAGS> 7", b"<FLAGS> 16"), "<FLAGS>"),
        "txt no w": (txt.replace(b"<FLAGS> 7", b"<FLAGS> 8"), "<FLAGS>"),
        "txt flags w": (txt.replace(b"<FLAGS> 7", b"<FLAGS> 4"), "expected empty"),
        "txt nan": (txt.replace(b"1745.335", b"nan", 1), "NaN"),
        "txt inf": (txt.replace(b"-21871.62", b"-inf", 1), "NaN or inf"),
        "txt 1e39": (txt.replace(b"-21871.62", b"1e39", 1), "float32"),
        "txt token": (txt.replace(b"<DIAGVARACCS>", b"<DIAGVARACCZ>"), "<DIAGVARACCZ>"),
        "txt twice": (txt.replace(b"<DIAGVARACCS>", b"<MEANACCS>"), "second <MEANACCS>"),
        "txt no var": (txt[:txt.index(b"<DIAGVARACCS>")] + b"</GMMACCS> ", "no <DIAGVARACCS>"),
        "txt trailing": (txt + b"junk", "after </GMMACCS>"),
        "full token": (txt.replace(b"<GMMACCS> ", b"<FULLGMMACCS> ", 1), "<GMMACCS> too"),
        "bin dim": (_binary_with(binary, b"<VECSIZE> \x04", struct.pack("<i", 40)),
                    "<VECSIZE>"),
        "bin k": (_binary_with(binary, b"<NUMCOMPONENTS> \x04", struct.pack("<i", 7)),
                  "<NUMCOMPONENTS>"),
        "bin negative k": (_binary_with(binary, b"<NUMCOMPONENTS> \x04",
                                        struct.pack("<i", -8)), "positive"),
        "bin huge k": (_binary_with(binary, b"<NUMCOMPONENTS> \x04",
                                    struct.pack("<i", 2**31 - 1)), "<NUMCOMPONENTS>"),
        "bin huge vector": (_binary_with(binary, b"<OCCUPANCY> FV \x04",
                                         struct.pack("<i", 2**31 - 1)), "bytes"),
        "bin flags int32": (_binary_with(binary, b"<FLAGS> ", b"\x04\x07\0\0\0"), "size byte"),
        "bin nan": (_binary_with(binary, b"<OCCUPANCY> FV \x04\x08\0\0\0",
                                 struct.pack("<f", np.nan)), "NaN"),
        "bin matrix type": (binary.replace(b"<MEANACCS> FM", b"<MEANACCS> FP"), "FM or DM"),
        "model txt": ((KALDI_MODELS / "diag_digits_k8.kaldi.txt").read_bytes(), "model"),
        "model bin": ((KALDI_MODELS / "full_small.kaldi.bin").read_bytes(), "model"),
        "npz": (b"PK\x03\x04" + bytes(60), "expected <GMMACCS>"),
        "empty": (b"", "end of file"),
        "binary noise": (bytes(range(256)) * 4, "expected <GMMACCS>"),
    }
    for what, (data, match) in cases.items():
        assert data not in (txt, binary), what
        expect_user_error(path, data, what, match)


def test_huge_dimension_without_arrays_is_refused(tmp_path):
    head = b"<GMMACCS> <VECSIZE> %d <NUMCOMPONENTS> 1 <FLAGS> 4 <OCCUPANCY>  [ 5 ]\n"
    tail = b"<MEANACCS>  [ ]\n<DIAGVARACCS>  [ ]\n</GMMACCS> "
    expect_user_error(tmp_path / "huge.acc", head % (2**30) + tail, "huge", "zero statistics")
    path = tmp_path / "w.acc"
    path.write_bytes(head % 7 + tail)
    accs = read_kaldi_accs(path)
    assert accs.flags == "w" and accs.stats.first.shape == (1, 7) and accs.stats.frames == 5


def test_random_corruption_never_escapes_as_another_exception(tmp_path):
    rng = np.random.default_rng(7)
    sources = [ACC_TXT.read_bytes(), ACC_BIN.read_bytes(),
               kaldi_accs_bytes(random_stats(rng, 2, 3, "full")),
               kaldi_accs_bytes(random_stats(rng, 2, 3, "full"), binary=False)]
    corrupt_and_read(read_kaldi_accs, sources, tmp_path / "fuzz.acc", rng, 300)


def test_accumulators_given_as_a_model_name_what_they_are(tmp_path):
    with pytest.raises(UserError, match="accumulators") as info:
        read_kaldi_model(ACC_BIN)
    assert str(ACC_BIN) in str(info.value)
    with pytest.raises(UserError, match="no such file"):
        read_kaldi_accs(tmp_path / "missing.acc")
