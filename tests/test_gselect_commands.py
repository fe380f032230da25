"""Kaldi's Gaussian selection as commands: ``emdist gselect`` (``gmm-gselect``), and
``--gselect`` on ``acc-stats`` (``gmm-global-acc-stats``) and ``get-frame-likes``
(``gmm-global-get-frame-likes``), with Kaldi's ``Int32VectorVectorWriter`` tables.

Checked against Kaldi's own C++ through kaldi-hmm-gmm (``DiagGmm::GaussianSelection``,
``LogLikelihoodsPreselect`` and ``AccumDiagGmm::AccumulateForComponent``, frame by frame as
the binaries do), against scipy densities, against the exact E-step when every Gaussian is
selected, and against the table bytes Kaldi's holders write.
"""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest
from helpers import KALDI_MODELS
from scipy.special import logsumexp
from scipy.stats import norm
from test_kaldi_commands import (
    invoke,
    read_text_table,
    rel,
    scipy_frame_likes,
    write_scp,
    write_subset,
)
from test_kaldi_parity import kaldi_gmm

from emdist.corpora import digits_dir
from emdist.data.datadir import load_data_dir
from emdist.errors import UserError
from emdist.io.kaldi import read_kaldi_model
from emdist.io.modelio import load_stats
from emdist.io.tables import TableWarning, TableWriter, read_gselect
from emdist.tasks import read_utterance

k = pytest.importorskip("kaldi_hmm_gmm", reason="kaldi-hmm-gmm (Kaldi's GMM code) is in the "
                        "test extra")

pytestmark = pytest.mark.usefixtures("restore_logging")

MODEL = KALDI_MODELS / "diag_digits_k8.kaldi.txt"
FULL_MODEL = KALDI_MODELS / "full_digits_k4.kaldi.txt"
N_SELECT = 3


@pytest.fixture(scope="module")
def utts():
    return load_data_dir(digits_dir("train")).utts[:40]


@pytest.fixture(scope="module")
def gmm():
    return read_kaldi_model(MODEL)


def selections(path) -> dict[str, np.ndarray]:
    return dict(read_gselect(f"ark:{path}"))


@pytest.fixture(scope="module")
def gselected(tmp_path_factory, utts):
    """emdist gselect --n 3 over 40 utterances: (scp, binary archive, text archive)."""
    root = tmp_path_factory.mktemp("gselect")
    scp = write_scp(root / "feats.scp", utts)
    for name, spec in (("g.ark", "ark:{}"), ("g.txt", "ark,t:{}")):
        result = invoke("gselect", "--n", N_SELECT, MODEL, f"scp:{scp}",
                        spec.format(root / name))
        assert result.exit_code == 0, result.output
    return scp, root / "g.ark", root / "g.txt"


def test_selection_is_kaldis(gselected, utts, gmm):
    """Kaldi's GaussianSelection picks the same Gaussians in the same order (best first),
    except where two log-likelihoods are within float32 noise of each other."""
    _, ark, txt = gselected
    ours, text = selections(ark), selections(txt)
    assert list(ours) == [u.utt_id for u in utts]
    kg = kaldi_gmm(gmm)
    frames = differing = 0
    for u in utts:
        feats = read_utterance(u)
        _, theirs = kg.gaussian_selection_2d(feats.astype(np.float32), N_SELECT)
        theirs = np.array(theirs)
        np.testing.assert_array_equal(text[u.utt_id], ours[u.utt_id])
        assert ours[u.utt_id].shape == theirs.shape == (len(feats), N_SELECT)
        ll = np.array(kg.log_likelihoods_matrix(feats.astype(np.float32)))
        for t in np.flatnonzero((ours[u.utt_id] != theirs).any(axis=1)):
            # a different choice or order only between near-equal log-likelihoods
            a, b = ll[t, ours[u.utt_id][t]], ll[t, theirs[t]]
            np.testing.assert_allclose(a, b, atol=1e-3)
            differing += 1
        frames += len(feats)
    print(f"{differing} of {frames} frames differ")
    assert differing <= frames // 1000, differing


def test_acc_stats_with_gselect_match_kaldi(gselected, utts, gmm, tmp_path):
    """gmm-global-acc-stats --gselect: per frame, the softmax of the selected Gaussians'
    log-likelihoods (LogLikelihoodsPreselect), accumulated for those Gaussians only."""
    scp, ark, _ = gselected
    out = tmp_path / "sel.acc"
    result = invoke("acc-stats", "--gselect", f"ark:{ark}", MODEL, f"scp:{scp}", out)
    assert result.exit_code == 0, result.output
    ours = load_stats(out)["global"]
    kg = kaldi_gmm(gmm)
    acc = k.AccumDiagGmm(kg, 7)
    total = 0.0
    chosen = selections(ark)
    for u in utts:
        for x, sel in zip(read_utterance(u).astype(np.float32), chosen[u.utt_id],
                          strict=True):
            ll = np.array(kg.log_likelihoods_preselect(x, sel.tolist()), dtype=np.float64)
            total += logsumexp(ll)
            for j, g in enumerate(sel):
                acc.accumulate_for_component(x, int(g), float(np.exp(ll[j] - logsumexp(ll))))
    print("rel", rel(ours.zeroth, acc.occupancy), rel(ours.first, acc.mean_accumulator),
          rel(ours.second, acc.variance_accumulator))
    assert rel(ours.zeroth, acc.occupancy) < 1e-4
    assert rel(ours.first, acc.mean_accumulator) < 1e-4
    assert rel(ours.second, acc.variance_accumulator) < 1e-4
    assert ours.loglike == pytest.approx(total, rel=1e-6)
    # only selected Gaussians get statistics: a Gaussian never selected gets none
    never = np.setdiff1d(np.arange(gmm.n_components), np.concatenate(list(chosen.values())))
    assert np.all(ours.zeroth[never] == 0)


@pytest.mark.parametrize("model, k", [(MODEL, 8), (FULL_MODEL, 4)], ids=["diag", "full"])
def test_selecting_every_gaussian_gives_the_exact_statistics(gselected, utts, tmp_path,
                                                             model, k):
    """As fgmm-global-acc-stats --gselect for a full-covariance model."""
    scp = gselected[0]
    sel = tmp_path / "all.ark"
    assert invoke("gselect", "--n", 50, model, f"scp:{scp}", f"ark:{sel}").exit_code == 0
    assert next(iter(selections(sel).values())).shape[1] == k  # --n above K selects K
    for name, extra in (("exact", []), ("all", ["--gselect", f"ark:{sel}"])):
        result = invoke("acc-stats", *extra, model, f"scp:{scp}", tmp_path / f"{name}.acc")
        assert result.exit_code == 0, result.output
    exact, every = (load_stats(tmp_path / f"{n}.acc")["global"] for n in ("exact", "all"))
    for name in ("zeroth", "first", "second"):
        assert rel(getattr(every, name), getattr(exact, name)) < 1e-6, name
    assert every.loglike == pytest.approx(exact.loglike, rel=1e-8)  # float32 products


def test_frame_likes_with_gselect_are_over_the_selected_gaussians(gselected, utts, gmm,
                                                                  tmp_path):
    scp, ark, _ = gselected
    out = tmp_path / "likes.txt"
    result = invoke("get-frame-likes", "--gselect", f"ark:{ark}", MODEL, f"scp:{scp}",
                    f"ark,t:{out}")
    assert result.exit_code == 0, result.output
    got, chosen = read_text_table(out), selections(ark)
    for u in utts:
        feats = read_utterance(u).astype(np.float64)
        per = norm.logpdf(feats[:, None, :], gmm.means[None], np.sqrt(gmm.covariances)[None])
        per = per.sum(axis=2) + np.log(gmm.weights)  # log w_k N(x; μ_k, Σ_k): (T, K)
        want = logsumexp(np.take_along_axis(per, chosen[u.utt_id], axis=1), axis=1)
        np.testing.assert_allclose(got[u.utt_id], want, rtol=1e-5)
        assert np.all(got[u.utt_id] <= scipy_frame_likes(gmm, feats) + 1e-3)


def test_tables_are_kaldis_bytes_and_read_in_every_form(tmp_path):
    """Int32VectorVectorWriter: binary, the frame count, then each frame's size and values,
    each integer as \\x04 and 4 little-endian bytes; text, 'v v ; v v ; ' and a newline."""
    rows = np.array([[2, 0], [1, 7]])
    with TableWriter(f"ark:{tmp_path / 'b.ark'}") as w:
        w.write("u1", rows)

    def i(v):
        return b"\x04" + int(v).to_bytes(4, "little", signed=True)
    want = b"u1 \0B" + i(2) + i(2) + i(2) + i(0) + i(2) + i(1) + i(7)
    assert (tmp_path / "b.ark").read_bytes() == want
    with TableWriter(f"ark,t,scp:{tmp_path / 't.ark'},{tmp_path / 't.scp'}") as w:
        w.write("u1", rows)
        w.write("u2", np.array([[5]]))
    assert (tmp_path / "t.ark").read_bytes() == b"u1 2 0 ; 1 7 ; \nu2 5 ; \n"
    with TableWriter(f"ark,scp:{tmp_path / 's.ark'},{tmp_path / 's.scp'}") as w:
        w.write("u1", rows)
        w.write("u2", np.array([[5]]))
    with open(tmp_path / "b.ark", "rb") as fh, gzip.open(tmp_path / "g.gz", "wb") as gz:
        gz.write(fh.read())
    for spec in (f"ark:{tmp_path / 'b.ark'}", f"ark:{tmp_path / 't.ark'}",
                 f"scp:{tmp_path / 's.scp'}", f"scp:{tmp_path / 't.scp'}",
                 f"ark,s,cs:gunzip -c {tmp_path / 'g.gz'} |"):
        got = dict(read_gselect(spec))
        np.testing.assert_array_equal(got["u1"], rows, err_msg=spec)
        if "u2" in got:
            np.testing.assert_array_equal(got["u2"], [[5]], err_msg=spec)


def test_selections_in_another_order_give_the_same_statistics(gselected, tmp_path):
    scp, ark, _ = gselected
    chosen = selections(ark)
    rev = tmp_path / "rev.ark"
    with TableWriter(f"ark:{rev}") as w:
        for key in reversed(list(chosen)):
            w.write(key, chosen[key])
    for name, table in (("fwd", ark), ("rev", rev)):
        assert invoke("acc-stats", "--gselect", f"ark:{table}", MODEL, f"scp:{scp}",
                      tmp_path / f"{name}.acc").exit_code == 0
    assert (tmp_path / "fwd.acc").read_bytes() == (tmp_path / "rev.acc").read_bytes()


def test_a_data_dir_works_as_features(gselected, utts, tmp_path):
    data = write_subset(tmp_path / "data", utts)
    sel = tmp_path / "g.ark"
    assert invoke("gselect", "--n", N_SELECT, MODEL, data, f"ark:{sel}").exit_code == 0
    assert (tmp_path / "g.ark").read_bytes() == gselected[1].read_bytes()


def _bad(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return f"ark:{path}"


def test_bad_selections_are_one_line_errors(gselected, utts, tmp_path):
    scp, ark, txt = gselected
    good = txt.read_bytes()
    first = good.split(b"\n", 1)[0]
    key = first.split(b" ", 1)[0].decode()
    cases = {
        "index past K": (good.replace(first, first.replace(b" 0 ", b" 8 ", 1)),
                         "selects Gaussian 8, but the model has 8"),
        "negative": (good.replace(first, first.replace(b" 0 ", b" -1 ", 1)),
                     "selects Gaussian -1"),
        "too few frames": (good.replace(first, first.rsplit(b";", 2)[0] + b";"),
                           "frames of features"),
        "ragged": (good.replace(first, first.replace(b" ; ", b" 4 ; ", 1)),
                   "different numbers of Gaussians"),
        "not a number": (good.replace(first, first.replace(b" 0 ", b" x ", 1)),
                         "cannot read"),
        "text after the last ;": (good.replace(first, first + b" 3"), "after the last ';'"),
        "truncated binary": (ark.read_bytes()[:-7], "truncated"),
        "bad size byte": (ark.read_bytes().replace(b"\x04", b"\x08", 3), "cannot read"),
    }
    for what, (data, message) in cases.items():
        spec = _bad(tmp_path, "bad.ark", data)
        result = invoke("acc-stats", "--gselect", spec, MODEL, f"scp:{scp}", tmp_path / "x")
        assert result.exit_code == 2, (what, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.startswith("emdist: error:")]
        assert len(lines) == 1 and spec.split(":", 1)[1] in lines[0], (what, result.output)
        assert message in lines[0], (what, lines[0])
        if what != "truncated binary":  # the others spoil the first utterance: it is named
            assert repr(key) in lines[0], (what, lines[0])
        assert not (tmp_path / "x").exists(), what


def test_utterances_without_a_selection_are_skipped_with_a_warning(gselected, utts,
                                                                   tmp_path):
    scp, ark, _ = gselected
    chosen = selections(ark)
    part = tmp_path / "part.ark"
    with TableWriter(f"ark:{part}") as w:
        for key in list(chosen)[1:]:
            w.write(key, chosen[key])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TableWarning)
        from emdist.engine.steps import acc_stats, read_model_file
        from emdist.models.estep import EStepOptions

        stats = acc_stats(read_model_file(MODEL), f"scp:{scp}", EStepOptions(),
                          f"ark:{part}")["global"]
    assert [str(w.message) for w in caught] == [
        f"ark:{part}: no selection for utterance {utts[0].utt_id!r}; skipped, as Kaldi does"]
    assert stats.frames == sum(u.num_frames for u in utts[1:])
    # none at all: an error
    empty = write_scp(tmp_path / "other.scp", utts[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TableWarning)
        with pytest.raises(UserError, match="selects for none of the utterances"):
            acc_stats(read_model_file(MODEL), f"scp:{empty}", EStepOptions(), f"ark:{part}")


def test_gselect_needs_one_gmm(tmp_path, utts):
    data = write_subset(tmp_path / "data", utts)
    assert len({u.label for u in utts}) > 1
    exp = tmp_path / "exp"
    assert invoke("train", data, exp, "--workers", "0", "--nj", "1", "--num-gauss", "2",
                  "--num-iters", "1").exit_code == 0
    result = invoke("acc-stats", "--gselect", "ark:/nonexistent", exp / "final.mdl", data,
                    tmp_path / "s")
    assert result.exit_code == 2
    assert "selects among one GMM's Gaussians" in result.output
    result = invoke("gselect", "--n", "0", MODEL, data, f"ark:{tmp_path / 'g'}")
    assert result.exit_code == 2 and "at least one Gaussian" in result.output


def test_corrupt_selection_tables_are_one_line_errors(gselected, tmp_path):
    """Every kind of damage to a binary or text table: read, or a one-line UserError naming
    the table, never another exception; a size of 2**31 read from damaged bytes is an error
    once the bytes run out, not an allocation of that size."""
    from helpers import corrupt_and_read

    _, ark, txt = gselected
    sources = [ark.read_bytes()[:3000], txt.read_bytes()[:3000]]
    corrupt_and_read(lambda path: list(read_gselect(f"ark:{path}")), sources,
                     tmp_path / "fuzz.ark", np.random.default_rng(5), 300)
    data = ark.read_bytes()
    key_end = data.index(b" ") + 1
    for what, cut in (("frames", key_end + 3), ("first size", key_end + 8)):
        bad = tmp_path / f"{what.replace(' ', '_')}.ark"
        bad.write_bytes(data[:cut] + b"\xff\xff\xff\x7f" + data[cut + 4:])
        with pytest.raises(UserError, match="cannot read") as info:
            list(read_gselect(f"ark:{bad}"))
        assert str(bad) in str(info.value) and "\n" not in str(info.value), what
