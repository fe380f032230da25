"""Tests for emdist.data.datadir: reading, validating and sharding Kaldi data dirs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emdist.data.datadir import (
    DataDir,
    Utterance,
    load_data_dir,
    load_feats,
    parse_rxfilename,
    read_matrix_shape,
    split_by_frames,
)
from emdist.errors import DataError, UserError

DIGITS = Path(__file__).resolve().parents[1] / "emdist" / "corpora" / "digits"
DIGIT_LABELS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "O", "Z"]


@pytest.fixture(scope="module")
def train() -> DataDir:
    return load_data_dir(DIGITS / "train")


def _mats(n: int = 3, dim: int = 4, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"u{i}": rng.standard_normal((5 + 3 * i, dim)).astype(dtype) for i in range(n)}


def _make_dir(
    root: Path, mats: dict[str, np.ndarray] | None = None, text: bool = True, **kwargs
) -> Path:
    """Write a small data dir (absolute ark paths in feats.scp) and return it."""
    mats = _mats() if mats is None else mats
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    kaldiio.save_ark(str(data / "feats.ark"), mats, scp=str(data / "feats.scp"), **kwargs)
    if text:
        _write(data / "text", [f"{utt} w{utt[-1]}" for utt in mats])
    return data


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _edit(path: Path, lineno: int, line: str | None) -> None:
    """Replace (or delete, with None) line ``lineno`` (1-based) of ``path``."""
    lines = path.read_text().splitlines()
    if line is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = line
    _write(path, lines)


def _error(data: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_data_dir(data, **kwargs)
    return str(info.value)


# --- the bundled corpus


def test_bundled_corpus(train: DataDir) -> None:
    assert (len(train.utts), train.num_frames, train.dim) == (330, 18593, 39)
    assert train.labels == DIGIT_LABELS
    assert train.has_text and train.utt2spk is None
    assert train.name == "train" and train.path == DIGITS / "train"
    ids = [u.utt_id.encode() for u in train.utts]
    assert ids == sorted(ids)
    assert all(u.rxfilename.startswith(str(DIGITS / "train" / "feats.ark:")) for u in train.utts)
    test = load_data_dir(DIGITS / "test")
    assert (len(test.utts), test.num_frames, test.dim) == (110, 6129, 39)
    assert test.labels == DIGIT_LABELS


def test_load_from_another_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    data = load_data_dir(os.path.relpath(DIGITS / "test", tmp_path))
    assert data.path == DIGITS / "test"
    assert data.num_frames == 6129
    assert Path(parse_rxfilename(data.utts[0].rxfilename)[0]) == DIGITS / "test" / "feats.ark"


def test_header_shapes_equal_kaldiio(train: DataDir) -> None:
    test = load_data_dir(DIGITS / "test")
    for utt in train.utts + test.utts:
        assert kaldiio.load_mat(utt.rxfilename).shape == (utt.num_frames, 39)
        assert read_matrix_shape(utt.rxfilename) == (utt.num_frames, 39)


def test_load_feats(train: DataDir) -> None:
    feats = load_feats(train.utts[0].rxfilename)
    assert feats.dtype == np.float32 and feats.shape == (train.utts[0].num_frames, 39)
    assert feats.flags.c_contiguous and feats.flags.writeable


def test_split_bundled_corpus(train: DataDir) -> None:
    shards = split_by_frames(train.utts, 4)
    assert [u for shard in shards for u in shard] == list(train.utts)
    totals = [sum(u.num_frames for u in shard) for shard in shards]
    assert max(totals) - min(totals) < 2 * max(u.num_frames for u in train.utts)
    assert split_by_frames(train.utts, 4) == shards


# --- matrix formats, ranges and path resolution


@pytest.mark.parametrize(
    ("dtype", "compression"),
    [(np.float32, None), (np.float64, None), (np.float32, 1), (np.float32, 2), (np.float32, 3)],
)
def test_formats(tmp_path: Path, dtype, compression) -> None:
    mats = _mats(dtype=dtype)
    data = _make_dir(tmp_path, mats, compression_method=compression)
    loaded = load_data_dir(data)
    assert loaded.dim == 4
    for utt in loaded.utts:
        expected = mats[utt.utt_id]
        assert utt.num_frames == len(expected)
        assert read_matrix_shape(utt.rxfilename) == kaldiio.load_mat(utt.rxfilename).shape
        feats = load_feats(utt.rxfilename)
        assert feats.dtype == np.float32 and feats.flags.c_contiguous
        atol = 1e-6 if compression is None else 0.1
        np.testing.assert_allclose(feats, expected, atol=atol)


def test_text_format_matrices(tmp_path: Path) -> None:
    mats = _mats()
    data = tmp_path / "data"
    data.mkdir()
    with kaldiio.WriteHelper(f"ark,t,scp:{data / 'feats.ark'},{data / 'feats.scp'}") as writer:
        for utt, mat in mats.items():
            writer(utt, mat)
    loaded = load_data_dir(data, require_labels=False)
    assert [u.num_frames for u in loaded.utts] == [len(m) for m in mats.values()]
    assert loaded.dim == 4 and not loaded.has_text and loaded.labels == []


def test_single_matrix_files_without_offset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "a.txt").write_text(" [\n  1 2 3\n  4 5 6 ]\n")
    kaldiio.save_mat(str(tmp_path / "b.mat"), np.ones((4, 3), dtype=np.float32))
    _write(data / "feats.scp", [f"a {tmp_path / 'a.txt'}", f"b {tmp_path / 'b.mat'}"])
    _write(data / "text", ["a one  word", "b x"])
    loaded = load_data_dir(data)
    assert [(u.num_frames, u.label) for u in loaded.utts] == [(2, "one  word"), (4, "x")]
    cache: dict = {}
    for _ in range(2):  # a reused handle is read from the start again
        assert read_matrix_shape(str(tmp_path / "a.txt"), fd_cache=cache) == (2, 3)
    assert load_feats(str(tmp_path / "a.txt")).tolist() == [[1, 2, 3], [4, 5, 6]]
    for fd in cache.values():
        fd.close()


@pytest.mark.parametrize("suffix", ["[2:5]", "[2:5,1:3]", "[,0:1]", "[3]", "[0:100]"])
def test_range_suffix(tmp_path: Path, suffix: str) -> None:
    data = _make_dir(tmp_path)
    rx = (data / "feats.scp").read_text().split()[1] + suffix
    assert parse_rxfilename(rx)[2] == suffix
    assert read_matrix_shape(rx) == kaldiio.load_mat(rx).shape
    assert load_feats(rx).shape == kaldiio.load_mat(rx).shape


def test_parse_rxfilename() -> None:
    assert parse_rxfilename("a.ark:12") == ("a.ark", 12, "")
    assert parse_rxfilename("/x:y/a.ark:12[0:3,1:2]") == ("/x:y/a.ark", 12, "[0:3,1:2]")
    assert parse_rxfilename("a.mat") == ("a.mat", None, "")
    assert parse_rxfilename("gunzip -c a.ark.gz |") == ("gunzip -c a.ark.gz |", None, "")


def test_relative_paths_resolve_like_kaldi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Against the cwd first, then the data dir, then its parent; stored absolute."""
    corpus = tmp_path / "corpus"
    shutil.copytree(DIGITS / "test", corpus / "test")
    monkeypatch.chdir(tmp_path)
    in_parent = load_data_dir("corpus/test")
    assert in_parent.utts[0].rxfilename.startswith(str(corpus / "test" / "feats.ark:"))
    _write(corpus / "test" / "feats.scp", ["u1 feats.ark:15"])
    _write(corpus / "test" / "text", ["u1 Z"])
    in_dir = load_data_dir("corpus/test")
    assert in_dir.utts[0].rxfilename == f"{corpus / 'test' / 'feats.ark'}:15"
    shutil.copy(corpus / "test" / "feats.ark", tmp_path / "feats.ark")
    in_cwd = load_data_dir("corpus/test")
    assert in_cwd.utts[0].rxfilename == f"{tmp_path / 'feats.ark'}:15"


def test_utt2num_frames_and_utt2spk(tmp_path: Path) -> None:
    mats = _mats()
    data = _make_dir(tmp_path, mats)
    _write(data / "utt2num_frames", [f"{utt} {len(m)}" for utt, m in mats.items()])
    _write(data / "utt2spk", [f"{utt} spk{utt}" for utt in mats])
    loaded = load_data_dir(data)
    assert [u.num_frames for u in loaded.utts] == [len(m) for m in mats.values()]
    assert loaded.utt2spk == {utt: f"spk{utt}" for utt in mats}
    assert loaded.labels == ["w0", "w1", "w2"]


def test_pipes_allowed_on_request(tmp_path: Path) -> None:
    mat = _mats(1)["u0"]
    kaldiio.save_mat(str(tmp_path / "u0.mat"), mat)
    data = tmp_path / "data"
    data.mkdir()
    pipe = f"cat {tmp_path / 'u0.mat'} |"
    _write(data / "feats.scp", [f"u0 {pipe}"])
    loaded = load_data_dir(data, require_labels=False, allow_pipes=True)
    assert loaded.utts == (Utterance("u0", pipe, None, len(mat)),)
    np.testing.assert_array_equal(load_feats(pipe), mat)


# --- validation errors: one line naming file and line


def test_unsorted(tmp_path: Path) -> None:
    data = _make_dir(tmp_path)
    _write(data / "text", ["u0 a", "u2 c", "u1 b"])
    msg = _error(data)
    assert msg.startswith(f"{data / 'text'}:3: ") and "not sorted ('u1' after 'u2')" in msg
    assert "LC_ALL=C sort" in msg and "\n" not in msg


def test_sorted_in_c_byte_order(tmp_path: Path) -> None:
    mats = _mats(2)
    data = _make_dir(tmp_path / "ok", {"B": mats["u0"], "a": mats["u1"]}, text=False)
    assert [u.utt_id for u in load_data_dir(data, require_labels=False).utts] == ["B", "a"]
    data = _make_dir(tmp_path / "bad", {"a": mats["u0"], "B": mats["u1"]}, text=False)
    msg = _error(data, require_labels=False)
    assert msg.startswith(f"{data / 'feats.scp'}:2: utterance ids are not sorted ('B' after 'a')")


def test_duplicate(tmp_path: Path) -> None:
    data = _make_dir(tmp_path)
    _write(data / "utt2spk", ["u0 s", "u1 s", "u1 s", "u2 s"])
    msg = _error(data)
    assert msg.startswith(f"{data / 'utt2spk'}:3: ") and "duplicate utterance id 'u1'" in msg


def test_missing_label(tmp_path: Path) -> None:
    data = _make_dir(tmp_path)
    _edit(data / "text", 2, "u1")
    assert _error(data).startswith(f"{data / 'text'}:2: expected 2 fields 'utt-id label'")


def test_text_id_without_features(tmp_path: Path) -> None:
    data = _make_dir(tmp_path)
    _write(data / "text", ["u0 a", "u1 b", "u15 x", "u2 c"])
    msg = _error(data, require_labels=False)
    assert msg.startswith(f"{data / 'text'}:3: utterance 'u15' has no features in feats.scp")


def test_features_without_text_line(tmp_path: Path) -> None:
    data = _make_dir(tmp_path)
    _edit(data / "text", 2, None)
    msg = _error(data)
    assert msg.startswith(f"{data / 'feats.scp'}:2: utterance 'u1' has no line in ")
    assert str(data / "text") in msg
    loaded = load_data_dir(data, require_labels=False)
    assert [u.label for u in loaded.utts] == ["w0", None, "w2"]


def test_text_required(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, text=False)
    with pytest.raises(UserError, match="--global") as info:
        load_data_dir(data)
    assert str(data / "text") in str(info.value)
    assert load_data_dir(data, require_labels=False).labels == []


@pytest.mark.parametrize(
    ("lines", "bad_line", "fragment"),
    [
        (["u0 5", "u2 11"], 2, "'u1' has no line in"),
        (["u0 5", "u1 8", "u15 3", "u2 11"], 3, "'u15' has no features"),
        (["u0 5", "u1 0", "u2 11"], 2, "not a positive integer"),
        (["u0 5", "u1 8.0", "u2 11"], 2, "not a positive integer"),
    ],
)
def test_utt2num_frames_mismatch(tmp_path: Path, lines: list[str], bad_line: int, fragment: str):
    data = _make_dir(tmp_path)
    _write(data / "utt2num_frames", lines)
    msg = _error(data)
    bad_file = "feats.scp" if "no line in" in fragment else "utt2num_frames"
    assert msg.startswith(f"{data / bad_file}:{bad_line}: ") and fragment in msg


@pytest.mark.parametrize(
    ("name", "line", "fragment"),
    [
        ("utt2spk", "u1 spk extra", "expected 2 fields 'utt-id speaker-id', got 3"),
        ("feats.scp", "u1 a.ark:1 b.ark:2", "expected 2 fields 'utt-id rxfilename', got 3"),
        ("text", "", "empty line"),
        ("feats.scp", "u1 ark:a.ark:1", "table specifier"),
    ],
)
def test_wrong_fields(tmp_path: Path, name: str, line: str, fragment: str) -> None:
    data = _make_dir(tmp_path)
    if name == "utt2spk":
        _write(data / name, ["u0 s", "u1 s", "u2 s"])
    _edit(data / name, 2, line)
    msg = _error(data)
    assert msg.startswith(f"{data / name}:2: ") and fragment in msg


def test_pipe_refused(tmp_path: Path) -> None:
    data = _make_dir(tmp_path)
    _edit(data / "feats.scp", 2, "u1 cat /dev/null |")
    msg = _error(data)
    assert msg.startswith(f"{data / 'feats.scp'}:2: pipe entry 'cat /dev/null |'")


def test_ark_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _make_dir(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    _edit(data / "feats.scp", 3, "u2 missing/feats.ark:15")
    msg = _error(data)
    assert msg.startswith(f"{data / 'feats.scp'}:3: file 'missing/feats.ark' not found")
    for base in (tmp_path, data, data.parent):
        assert str(base / "missing" / "feats.ark") in msg


def test_dims_differ(tmp_path: Path) -> None:
    mats = _mats(3)
    mats["u2"] = mats["u2"][:, :3]
    data = _make_dir(tmp_path, mats)
    msg = _error(data)
    assert msg.startswith(f"{data / 'feats.scp'}:3: utterance 'u2' has dim 3 ")
    assert "dim 4" in msg


def test_zero_frames(tmp_path: Path) -> None:
    mats = _mats(3)
    mats["u1"] = mats["u1"][:0]
    data = _make_dir(tmp_path, mats)
    assert _error(data).startswith(f"{data / 'feats.scp'}:2: utterance 'u1' has no frames")


@pytest.mark.parametrize(("shift", "fragment"), [(1, "not at the start"), (10**6, "past the end")])
def test_unreadable_matrix(tmp_path: Path, shift: int, fragment: str) -> None:
    data = _make_dir(tmp_path)
    path, offset, _ = parse_rxfilename((data / "feats.scp").read_text().split()[3])
    _edit(data / "feats.scp", 2, f"u1 {path}:{offset + shift}")
    msg = _error(data)
    assert msg.startswith(f"{data / 'feats.scp'}:2: utterance 'u1': ") and fragment in msg
    with pytest.raises(DataError, match="cannot read features"):
        load_feats(f"{path}:{offset + shift}")


def test_missing_dir_and_scp(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data dir not found"):
        load_data_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="feats.scp"):
        load_data_dir(tmp_path)
    (tmp_path / "feats.scp").write_text("")
    assert _error(tmp_path, require_labels=False).startswith(f"{tmp_path / 'feats.scp'}: ")


# --- sharding


def _utts(frames: list[int]) -> list[Utterance]:
    return [Utterance(f"u{i:05d}", f"/x.ark:{i}", None, n) for i, n in enumerate(frames)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=60), st.integers(1, 80))
def test_split_by_frames_properties(frames: list[int], nj: int) -> None:
    utts = _utts(frames)
    shards = split_by_frames(utts, nj)
    assert len(shards) == min(nj, len(utts))
    assert all(shards)
    assert [u for shard in shards for u in shard] == utts
    total, longest = sum(frames), max(frames)
    for shard in shards:
        assert abs(sum(u.num_frames for u in shard) - total / nj) <= longest
    assert split_by_frames(tuple(utts), nj) == shards


def test_split_by_frames_edge_cases() -> None:
    assert split_by_frames([], 3) == []
    utts = _utts([10] * 8)
    assert [len(s) for s in split_by_frames(utts, 4)] == [2, 2, 2, 2]
    assert [len(s) for s in split_by_frames(utts, 3)] == [3, 3, 2]
    assert [len(s) for s in split_by_frames(_utts([1, 100, 1, 1]), 4)] == [1, 1, 1, 1]
    for bad in (0, -1):
        with pytest.raises(UserError, match="positive integer"):
            split_by_frames(utts, bad)
