"""Kaldi model files both directions (issue 11, point 1): ``emdist.io.kaldi`` and the
``emdist import`` / ``emdist export`` commands, against golden files written by Kaldi's own
``gmm-global-copy`` / ``fgmm-global-copy`` (``shared/data/kaldi-models``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import KALDI_MODELS, corrupt_and_read, one_line_error, read_fails_in_one_line
from typer.testing import CliRunner

from emdist.cli import app
from emdist.io.kaldi import (
    KaldiWeightsWarning,
    kaldi_model_bytes,
    read_kaldi_model,
    write_kaldi_model,
)
from emdist.io.modelio import load_models, save_models
from emdist.models.gmm import GMM

NAMES = ("diag_small", "diag_digits_k8", "full_small", "full_digits_k4")

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="module")
def golden() -> Path:
    return KALDI_MODELS


@pytest.fixture(scope="module")
def parameters(golden) -> dict:
    return json.loads((golden / "parameters.json").read_text())


def reference(parameters: dict, name: str) -> GMM:
    p = parameters[name]
    if "variances" in p:
        return GMM(np.array(p["weights"]), np.array(p["means"]), np.array(p["variances"]), "diag")
    return GMM(np.array(p["weights"]), np.array(p["means"]), np.array(p["covariances"]), "full")


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def random_gmm(rng, k: int, d: int, cov_type: str) -> GMM:
    w = rng.dirichlet(np.full(k, 2.0))
    m = rng.normal(0, 2, (k, d))
    if cov_type == "diag":
        return GMM(w, m, rng.uniform(0.2, 3.0, (k, d)), "diag")
    a = rng.normal(size=(k, d, d))
    return GMM(w, m, a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d), "full")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- reading Kaldi's files ----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix", ["kaldi.bin", "kaldi.txt", "in.txt"])
def test_golden_files_read_as_their_parameters(golden, parameters, name, suffix):
    gmm = read_kaldi_model(golden / f"{name}.{suffix}")
    ref = reference(parameters, name)
    assert gmm.covariance_type == ref.covariance_type
    assert gmm.means.shape == ref.means.shape
    # Kaldi stores float32 (binary) or 7 significant digits (text); a full covariance is
    # the inverse of what is stored, so text loses a little more there.
    tol = 2e-6 if suffix == "kaldi.txt" and ref.covariance_type == "full" else 1e-6
    assert rel(gmm.weights, ref.weights) < 1e-6
    assert rel(gmm.means, ref.means) < 1e-6
    assert rel(gmm.covariances, ref.covariances) < tol
    assert abs(gmm.weights.sum() - 1.0) < 1e-12


def test_missing_gconsts_are_recomputed(golden, tmp_path):
    text = (golden / "diag_small.in.txt").read_text().splitlines(keepends=True)
    without = "".join(line for line in text if not line.startswith("<GCONSTS>"))
    assert "<GCONSTS>" not in without
    read = read_kaldi_model(golden / "diag_small.in.txt")
    path = tmp_path / "no_gconsts.txt"
    path.write_text(without)
    assert kaldi_model_bytes(read_kaldi_model(path)) == kaldi_model_bytes(read)


# -- writing: Kaldi's own bytes -----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_writes_are_byte_identical_to_kaldi(golden, parameters, name, binary, tmp_path):
    gold = (golden / f"{name}.kaldi.{'bin' if binary else 'txt'}").read_bytes()
    # from Kaldi's binary file (the exact float32 model Kaldi wrote both files from) ...
    assert kaldi_model_bytes(read_kaldi_model(golden / f"{name}.kaldi.bin"), binary) == gold
    # ... from the input Kaldi was given, and from the float64 parameters themselves
    assert kaldi_model_bytes(read_kaldi_model(golden / f"{name}.in.txt"), binary) == gold
    out = tmp_path / "out.mdl"
    write_kaldi_model(out, reference(parameters, name), binary=binary)
    assert out.read_bytes() == gold


def test_text_numbers_are_plain_decimals(tmp_path):
    gmm = GMM(np.array([2.0, 2.0]), np.array([[0.5, -1e-7], [3.0, 1e6]]),
              np.array([[2.0, 1e-8], [4.0, 0.5]]), "diag")
    text = kaldi_model_bytes(gmm, binary=False).decode()
    assert "np." not in text and "float32" not in text
    assert "<WEIGHTS>  [ 0.5 0.5 ]\n" in text  # normalised
    for word in text.split():
        if word[0] not in "<[]":
            assert word[0] in "-0123456789", word
            float(word)
    vector_lines = [line for line in text.splitlines() if line.startswith(("<GCONSTS>",
                                                                         "<WEIGHTS>"))]
    assert all(line.endswith("]") for line in vector_lines)  # a vector is one line


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_round_trip_emdist_kaldi_emdist(cov_type, binary, tmp_path):
    rng = np.random.default_rng(11)
    gmm = random_gmm(rng, 5, 6, cov_type)
    path = tmp_path / "m.kaldi"
    write_kaldi_model(path, gmm, binary=binary)
    back = read_kaldi_model(path)
    tol = 1e-6 if binary else 5e-6
    assert back.covariance_type == cov_type
    assert rel(back.weights, gmm.weights) < tol
    assert rel(back.means, gmm.means) < tol
    assert rel(back.covariances, gmm.covariances) < tol
    # and a second pass is a fixed point: the stored values survive exactly (text gconsts,
    # recomputed from 7-digit values, may move in their last digit)
    again = tmp_path / "again.kaldi"
    write_kaldi_model(again, back, binary=binary)
    first, second = path.read_bytes(), again.read_bytes()
    if binary:
        assert second == first
    else:
        assert second.split(b"<WEIGHTS>")[1] == first.split(b"<WEIGHTS>")[1]


# -- malformed files ----------------------------------------------------------------------

def _bad_inputs(golden: Path) -> dict[str, bytes]:
    diag_txt = (golden / "diag_small.kaldi.txt").read_bytes()
    diag_bin = (golden / "diag_small.kaldi.bin").read_bytes()
    full_bin = (golden / "full_small.kaldi.bin").read_bytes()
    full_txt = (golden / "full_small.kaldi.txt").read_bytes()
    cases = {
        "empty": b"",
        "blank": b"  \n",
        "header only": b"\0B",
        "other object": b"<TransitionModel> <Topology> </TransitionModel>",
        "dot number": diag_txt.replace(b"0.5750951", b".5750951"),
        "plus number": diag_txt.replace(b"0.5750951", b"+0.5750951"),
        "newline in vector": diag_txt.replace(b"[ 0.08072903", b"[\n 0.08072903"),
        "word": diag_txt.replace(b"0.5750951", b"zero"),
        "underscore": diag_txt.replace(b"0.5750951", b"0_5"),
        "huge number": diag_txt.replace(b"0.5750951", b"1e39"),
        "negative inv var": diag_txt.replace(b"0.5750951", b"-0.5750951"),
        "zero inv var": diag_txt.replace(b"0.5750951", b"0"),
        "nan inv var": diag_txt.replace(b"0.5750951", b"nan"),
        "ragged matrix": diag_txt.replace(b"0.5750951 ", b""),
        "zero weights": diag_txt.replace(b"0.08072903 0.6866232 0.2326477", b"0 0 0"),
        "missing end": diag_txt.replace(b"</DiagGMM>", b""),
        "wrong end": diag_txt.replace(b"</DiagGMM>", b"</FullGMM>"),
        "trailing junk": diag_txt + b"junk",
        "full not pd": full_txt.replace(b"0.8016607", b"-0.8016607"),
        "full packed row": full_txt.replace(b"0.1908258 0.7522886", b"0.1908258"),
        "bin huge size": diag_bin[:26] + b"\xff\xff\xff\x7f" + diag_bin[30:],
        "bin negative size": diag_bin[:26] + b"\xff\xff\xff\xff" + diag_bin[30:],
        "bin size byte": diag_bin[:25] + b"\x08" + diag_bin[26:],
        "bin wrong k": diag_bin.replace(b"FM \x04\x03", b"FM \x04\x02", 1),
        "bin compressed": diag_bin.replace(b"FM ", b"CM ", 1),
        "bin packed huge": full_bin.replace(b"FP \x04\x03\x00\x00\x00",
                                            b"FP \x04\x00\x00\x00\x10", 1),
    }
    for cut in (3, 12, 40, 100, len(diag_bin) - 3):
        cases[f"diag bin cut {cut}"] = diag_bin[:cut]
    for cut in (50, 150, len(full_bin) - 20):
        cases[f"full bin cut {cut}"] = full_bin[:cut]
    for cut in (20, 120, 300):
        cases[f"diag txt cut {cut}"] = diag_txt[:cut]
    return cases


def test_malformed_inputs_are_user_errors_naming_the_file(golden, tmp_path):
    for i, (what, data) in enumerate(_bad_inputs(golden).items()):
        read_fails_in_one_line(read_kaldi_model, tmp_path / f"bad{i}.mdl", data, what)


def test_random_corruption_never_escapes_as_another_exception(golden, tmp_path):
    rng = np.random.default_rng(3)
    sources = [(golden / f"{n}.kaldi.{s}").read_bytes() for n in ("diag_small", "full_small")
               for s in ("bin", "txt")]
    corrupt_and_read(read_kaldi_model, sources, tmp_path / "fuzz.mdl", rng, 400)


def test_accepts_kaldi_variants(golden, tmp_path):
    diag_txt = (golden / "diag_small.kaldi.txt").read_bytes()
    ref = read_kaldi_model(golden / "diag_small.kaldi.txt")
    variants = {
        "crlf": diag_txt.replace(b"\n", b"\r\n"),
        "old tokens": diag_txt.replace(b"<DiagGMM>", b"<DiagGMMBegin>")
                              .replace(b"</DiagGMM>", b"<DiagGMMEnd>"),
        "semicolons": diag_txt.replace(b" \n  ", b" ; "),
        "exponent": diag_txt.replace(b"0.5750951", b"5.750951E-1"),
    }
    for what, data in variants.items():
        path = tmp_path / f"{what.replace(' ', '_')}.txt"
        path.write_bytes(data)
        gmm = read_kaldi_model(path)
        assert rel(gmm.covariances, ref.covariances) < 1e-6, what
    # a binary file written with doubles (DV/DM) is read too
    rng = np.random.default_rng(0)
    gmm = random_gmm(rng, 2, 3, "diag")
    raw = kaldi_model_bytes(gmm)
    doubled = bytearray(b"\0B")
    from emdist.io.kaldi import _kaldi_arrays  # noqa: PLC0415 -- a test of the layout

    gconsts, w, miv, iv = _kaldi_arrays(gmm)

    def dv(v):
        return b"DV \x04" + len(v).to_bytes(4, "little") + v.astype("<f8").tobytes()

    def dm(m):
        return (b"DM \x04" + m.shape[0].to_bytes(4, "little") + b"\x04"
                + m.shape[1].to_bytes(4, "little") + m.astype("<f8").tobytes())
    doubled += b"<DiagGMM> <WEIGHTS> " + dv(w) + b"<MEANS_INVVARS> " + dm(miv)
    doubled += b"<INV_VARS> " + dm(iv) + b"</DiagGMM> "
    path = tmp_path / "doubles.bin"
    path.write_bytes(bytes(doubled))
    assert kaldi_model_bytes(read_kaldi_model(path)) == raw


def test_weights_that_do_not_sum_to_one_are_read_normalised_with_a_warning(golden, tmp_path):
    """As gmm-global-est leaves them when it floors starved Gaussians' weights (Kaldi reads
    them as they are): the same model, normalised, and a warning that says by how much
    every log-likelihood differs from Kaldi's."""
    diag_txt = (golden / "diag_small.kaldi.txt").read_bytes()
    ref = read_kaldi_model(golden / "diag_small.kaldi.txt")
    path = tmp_path / "floored.txt"
    path.write_bytes(diag_txt.replace(b"0.6866232", b"0.7066232"))
    with pytest.warns(KaldiWeightsWarning) as caught:
        gmm = read_kaldi_model(path)
    total = 0.08072903 + 0.7066232 + 0.2326477
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"{path}: weights sum to {total:.7g}, not 1; read normalised, so each frame's "
        f"log-likelihood is Kaldi's {-np.log(total):+.4g}")
    np.testing.assert_allclose(gmm.weights, np.array([0.08072903, 0.7066232, 0.2326477])
                               / total, rtol=1e-7)
    assert abs(gmm.weights.sum() - 1.0) < 1e-12
    assert rel(gmm.means, ref.means) < 1e-7 and rel(gmm.covariances, ref.covariances) < 1e-7
    # within 1e-4 of one: read normalised, no warning (the suite turns warnings into errors)
    path.write_bytes(diag_txt.replace(b"0.6866232", b"0.6866732"))
    assert abs(read_kaldi_model(path).weights.sum() - 1.0) < 1e-12


# -- the commands -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["diag_small", "full_small"])
def test_import_then_export_gives_kaldis_bytes(golden, name, tmp_path):
    out = tmp_path / "m.mdl"
    result = invoke("import", golden / f"{name}.kaldi.txt", out)
    assert result.exit_code == 0, result.output
    models = load_models(out)
    assert list(models) == ["global"]
    result = invoke("import", golden / f"{name}.kaldi.bin", out, "--label", "ubm")
    assert result.exit_code == 0, result.output
    assert list(load_models(out)) == ["ubm"]
    for args, suffix in ((["--binary=false"], "txt"), ([], "bin"), (["--binary"], "bin"),
                         (["--binary=true"], "bin")):
        kaldi = tmp_path / f"out.{suffix}"
        kaldi.unlink(missing_ok=True)
        result = invoke("export", out, kaldi, *args)
        assert result.exit_code == 0, result.output
        assert kaldi.read_bytes() == (golden / f"{name}.kaldi.{suffix}").read_bytes()


def test_export_word_models(tmp_path):
    rng = np.random.default_rng(5)
    models = {w: random_gmm(rng, 3, 4, "diag") for w in ("one", "two", "three")}
    path = tmp_path / "words.mdl"
    save_models(path, models)
    result = invoke("export", path, tmp_path / "x.mdl")
    assert result.exit_code == 2
    assert "--label" in result.output and "--all" in result.output
    result = invoke("export", path, tmp_path / "two.kaldi", "--label", "two", "--binary=false")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "two.kaldi").read_bytes() == kaldi_model_bytes(models["two"], False)
    result = invoke("export", path, tmp_path / "x.mdl", "--label", "four")
    assert result.exit_code == 2 and "four" in result.output
    result = invoke("export", path, "--all", tmp_path / "kaldi")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "kaldi").iterdir()) == \
        ["one.mdl", "three.mdl", "two.mdl"]
    for word, gmm in models.items():
        back = read_kaldi_model(tmp_path / "kaldi" / f"{word}.mdl")
        assert rel(back.means, gmm.means) < 1e-6
    result = invoke("export", path, tmp_path / "x.mdl", "--all", tmp_path / "kaldi")
    assert result.exit_code == 2
    result = invoke("export", path, tmp_path / "x.mdl", "--binary=maybe", "--label", "one")
    assert result.exit_code == 2


def test_commands_report_bad_files_in_one_line(golden, tmp_path):
    bad = tmp_path / "bad.kaldi"
    bad.write_bytes(b"\0B<DiagGMM> FV ")
    result = invoke("import", bad, tmp_path / "out.mdl")
    assert result.exit_code == 2
    one_line_error(result, str(bad))
    assert not (tmp_path / "out.mdl").exists()
    result = invoke("import", tmp_path / "missing.kaldi", tmp_path / "out.mdl")
    assert result.exit_code == 2 and "missing.kaldi" in result.output
    notmodel = tmp_path / "notmodel.mdl"
    notmodel.write_bytes(b"garbage")
    result = invoke("export", notmodel, tmp_path / "x")
    assert result.exit_code == 2
    one_line_error(result, str(notmodel))
