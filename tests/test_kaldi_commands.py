"""Kaldi's piecewise commands (``acc-stats``, ``sum-accs``, ``est``, ``get-frame-likes``)
and the Kaldi files of ``emdist train``.

References: the golden files written by Kaldi's own ``gmm-global-sum-accs`` and
``gmm-global-est`` (``tests/data/kaldi-models``), one ``emdist train`` iteration, and
per-frame log-likelihoods computed here with scipy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import KALDI_MODELS, emdist_command, one_line_error
from scipy.special import logsumexp
from scipy.stats import norm
from typer.testing import CliRunner

from emdist.cli import app
from emdist.corpora import digits_dir
from emdist.data.datadir import load_data_dir
from emdist.engine import make_shards
from emdist.io.kaldi import read_kaldi_accs, read_kaldi_model
from emdist.io.modelio import load_models, load_stats
from emdist.io.tables import read_gselect
from emdist.tasks import read_utterance

pytestmark = pytest.mark.usefixtures("restore_logging")

RTOL = 1e-4
MODEL = KALDI_MODELS / "diag_digits_k8.kaldi.txt"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rel(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def assert_gmm_close(got, want, rtol=RTOL):
    assert got.n_components == want.n_components
    for p in ("weights", "means", "covariances"):
        assert rel(getattr(got, p), getattr(want, p)) < rtol, p


@pytest.fixture(scope="module")
def train_data():
    return load_data_dir(digits_dir("train"))


def write_scp(path: Path, utts) -> Path:
    path.write_text("".join(f"{u.utt_id} {u.rxfilename}\n" for u in utts))
    return path


def write_subset(path: Path, utts) -> Path:
    """A data dir of these utterances (absolute feature paths, their text labels)."""
    path.mkdir()
    write_scp(path / "feats.scp", utts)
    (path / "text").write_text("".join(f"{u.utt_id} {u.label}\n" for u in utts))
    return path


# -- est against gmm-global-est ---------------------------------------------------------

GOLDEN_EST = {  # the options of tests/data/kaldi-models/README.md
    "est.default": (),
    "est.floored": ("--min-gaussian-occupancy=3000", "--min-variance=0.5"),
    "est.mixup12": ("--mix-up=12", "--perturb-factor=0"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_EST))
@pytest.mark.parametrize("accs", ["acc.sum.kaldi.bin", "acc.sum.kaldi.txt"])
def test_est_reproduces_gmm_global_est(tmp_path, name, accs):
    out = tmp_path / "out.mdl"
    result = invoke("est", MODEL, KALDI_MODELS / accs, out, "--binary=false", *GOLDEN_EST[name])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"<DiagGMM>")  # a Kaldi model in, a Kaldi model out
    assert_gmm_close(read_kaldi_model(out), read_kaldi_model(KALDI_MODELS / f"{name}.kaldi.txt"))


def test_est_writes_binary_kaldi_by_default(tmp_path):
    out = tmp_path / "out.mdl"
    assert invoke("est", MODEL, KALDI_MODELS / "acc.sum.kaldi.bin", out).exit_code == 0
    assert out.read_bytes().startswith(b"\0B<DiagGMM>")
    assert_gmm_close(read_kaldi_model(out),
                     read_kaldi_model(KALDI_MODELS / "est.default.kaldi.txt"))


# -- the three commands chained, as a recipe runs them ---------------------------------


def run_shell(script: str, cwd: Path) -> None:
    """Run a bash script in ``cwd``; ``emdist`` in it is this interpreter's emdist."""
    script = script.replace("emdist ", " ".join(emdist_command()) + " ")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_pipeline_from_the_golden_model_gives_kaldis_accs_and_estimate(tmp_path, train_data):
    """acc-stats on the two halves Kaldi's accumulators were made from, sum-accs and est,
    as a shell pipeline: the golden gmm-global-sum-accs and gmm-global-est results."""
    half = len(train_data.utts) // 2
    write_scp(tmp_path / "1.scp", train_data.utts[:half])
    write_scp(tmp_path / "2.scp", train_data.utts[half:])
    run_shell(f"""
        for j in 1 2; do
          emdist acc-stats --kaldi-accs {MODEL} scp:$j.scp $j.acc
        done
        emdist sum-accs --kaldi-accs --binary=false sum.acc 1.acc 2.acc
        emdist est {MODEL} sum.acc final.mdl
    """, tmp_path)
    ours, kaldi = read_kaldi_accs(tmp_path / "sum.acc"), read_kaldi_accs(
        KALDI_MODELS / "acc.sum.kaldi.bin")
    assert ours.flags == kaldi.flags == "mvw"
    for order in ("zeroth", "first", "second"):
        assert rel(getattr(ours.stats, order), getattr(kaldi.stats, order)) < RTOL, order
    assert (tmp_path / "sum.acc").read_bytes().startswith(b"<GMMACCS>")
    assert_gmm_close(read_kaldi_model(tmp_path / "final.mdl"),
                     read_kaldi_model(KALDI_MODELS / "est.default.kaldi.txt"))


@pytest.mark.parametrize("global_", [False, True], ids=["word-models", "global"])
def test_pipeline_equals_one_train_iteration(tmp_path, train_data, global_):
    """acc-stats on train's two shards (data dirs for word models; scp rspecifiers for a
    UBM), sum-accs and est from 1.mdl give train's 2.mdl, byte for byte."""
    exp = tmp_path / "exp"
    flags = ["--global"] if global_ else []
    result = invoke("train", digits_dir("train"), exp, "--workers", "0", "--nj", "2",
                    "--num-gauss", "4", "--num-iters", "2", *flags)
    assert result.exit_code == 0, result.output
    shards = make_shards(train_data, 2, global_)
    inputs = []
    for shard in shards:
        if global_:
            inputs.append(f"scp:{write_scp(tmp_path / f'{shard.job}.scp', shard.utts)}")
        else:
            inputs.append(str(write_subset(tmp_path / f"data{shard.job}", shard.utts)))
    run_shell(f"""
        emdist acc-stats exp/1.mdl {inputs[0]} 1.stats
        emdist acc-stats exp/1.mdl {inputs[1]} 2.stats
        emdist sum-accs sum.stats 1.stats 2.stats
        emdist est exp/1.mdl sum.stats 2.mdl
    """, tmp_path)
    assert (tmp_path / "2.mdl").read_bytes() == (exp / "2.mdl").read_bytes()


def test_emdist_and_kaldi_statistics_mix(tmp_path, train_data):
    """One shard as emdist statistics, one as Kaldi accumulators: their sum is the
    all-emdist sum to float32 precision, and est takes it."""
    half = len(train_data.utts) // 2
    a = write_scp(tmp_path / "a.scp", train_data.utts[:half])
    b = write_scp(tmp_path / "b.scp", train_data.utts[half:])
    model = tmp_path / "k8.mdl"
    assert invoke("import", MODEL, model, "--label", "ubm").exit_code == 0
    for args in (("a.st", a, ()), ("b.st", b, ()), ("b.acc", b, ("--kaldi-accs",))):
        out, scp, extra = args
        result = invoke("acc-stats", model, f"scp:{scp}", tmp_path / out, *extra)
        assert result.exit_code == 0, result.output
    assert invoke("sum-accs", tmp_path / "all.st", tmp_path / "a.st", tmp_path / "b.st"
                  ).exit_code == 0
    result = invoke("sum-accs", tmp_path / "mixed.st", tmp_path / "a.st", tmp_path / "b.acc")
    assert result.exit_code == 0, result.output
    exact, mixed = load_stats(tmp_path / "all.st")["ubm"], load_stats(tmp_path / "mixed.st")
    assert list(mixed) == ["ubm"]
    for order in ("zeroth", "first", "second"):
        assert rel(getattr(mixed["ubm"], order), getattr(exact, order)) < 1e-6
    result = invoke("est", model, tmp_path / "mixed.st", tmp_path / "new.mdl")
    assert result.exit_code == 0, result.output
    assert list(load_models(tmp_path / "new.mdl")) == ["ubm"]  # an emdist model out


# -- frame likelihoods -------------------------------------------------------------------


def scipy_frame_likes(gmm, feats: np.ndarray) -> np.ndarray:
    per_dim = norm.logpdf(feats[:, None, :].astype(np.float64), gmm.means[None],
                          np.sqrt(gmm.covariances)[None])
    return logsumexp(per_dim.sum(axis=2) + np.log(gmm.weights)[None], axis=1)


def read_text_table(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for line in path.read_text().splitlines():
        key, rest = line.split(maxsplit=1)
        out[key] = np.array(rest.strip(" []").split(), dtype=np.float64)
    return out


@pytest.mark.parametrize("average", [False, True])
def test_get_frame_likes_match_scipy(tmp_path, train_data, average):
    utts = train_data.utts[:20]
    scp = write_scp(tmp_path / "feats.scp", utts)
    out = tmp_path / "likes.txt"
    result = invoke("get-frame-likes", MODEL, f"scp:{scp}", f"ark,t:{out}",
                    f"--average={'true' if average else 'false'}")
    assert result.exit_code == 0, result.output
    got = read_text_table(out)
    gmm = read_kaldi_model(MODEL)
    assert list(got) == [u.utt_id for u in utts]
    for u in utts:
        want = scipy_frame_likes(gmm, read_utterance(u))
        if average:
            assert got[u.utt_id].shape == (1,)
            np.testing.assert_allclose(got[u.utt_id][0], want.mean(), rtol=1e-5)
        else:
            np.testing.assert_allclose(got[u.utt_id], want, rtol=1e-5)


def test_get_frame_likes_binary_archive_reads_in_kaldiio(tmp_path, train_data):
    import kaldiio

    data = tmp_path / "data"
    write_subset(data, train_data.utts[:5])
    exp = tmp_path / "exp"
    assert invoke("train", data, exp, "--workers", "0", "--nj", "1", "--num-gauss", "2",
                  "--num-iters", "1").exit_code == 0
    label = train_data.utts[0].label
    result = invoke("get-frame-likes", exp / "final.mdl", data, f"ark:{tmp_path / 'l.ark'}",
                    "--label", label)
    assert result.exit_code == 0, result.output
    got = dict(kaldiio.load_ark(str(tmp_path / "l.ark")))
    gmm = load_models(exp / "final.mdl")[label]
    for u in train_data.utts[:5]:
        np.testing.assert_allclose(got[u.utt_id], scipy_frame_likes(gmm, read_utterance(u)),
                                   rtol=1e-5)
    result = invoke("get-frame-likes", exp / "final.mdl", data, f"ark:{tmp_path / 'x.ark'}")
    assert result.exit_code != 0 and "pick one with --label" in result.output


# -- train's Kaldi files -------------------------------------------------------------------


def test_train_writes_kaldi_accs_and_final_model(tmp_path):
    exp = tmp_path / "exp"
    result = invoke("train", digits_dir("train"), exp, "--workers", "0", "--global",
                    "--num-gauss", "4", "--num-iters", "2", "--write-kaldi-accs",
                    "--write-kaldi-model")
    assert result.exit_code == 0, result.output
    final = read_kaldi_model(exp / "kaldi" / "global" / "final.mdl")
    assert_gmm_close(final, load_models(exp / "final.mdl")["global"], rtol=1e-6)
    for i in (0, 1):
        acc = exp / "kaldi" / "global" / f"{i}.acc"
        assert acc.read_bytes().startswith(b"\0B<GMMACCS>")
        # the accumulators are the statistics acc-stats gives from i.mdl
        out = tmp_path / f"{i}.stats"
        assert invoke("acc-stats", exp / f"{i}.mdl", digits_dir("train"), out).exit_code == 0
        ours, kaldi = load_stats(out)["global"], read_kaldi_accs(acc).stats
        for order in ("zeroth", "first", "second"):
            assert rel(getattr(kaldi, order), getattr(ours, order)) < 1e-6
    assert not (exp / "kaldi" / "global" / "2.acc").exists()


def test_train_kaldi_files_need_gmms(tmp_path):
    result = invoke("train", digits_dir("train"), tmp_path / "exp", "--workers", "0",
                    "--model", "kmeans", "--write-kaldi-model")
    assert result.exit_code != 0 and "need --model gmm" in result.output


# -- errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A K=4 Kaldi model (of the same dimension as the golden K=8 accumulators)."""
    path = tmp_path_factory.mktemp("small") / "k4.mdl"
    result = invoke("est", MODEL, KALDI_MODELS / "acc.sum.kaldi.bin", path,
                    "--min-gaussian-occupancy=2000")
    assert result.exit_code == 0 and read_kaldi_model(path).n_components == 4, result.output
    return path


def test_est_refuses_accumulators_of_another_model(tmp_path, small_model):
    accs = KALDI_MODELS / "acc.sum.kaldi.bin"
    one_line_error(invoke("est", small_model, accs, tmp_path / "o.mdl"), str(accs),
                   "(8, 39)", "(4, 39)", "different model")


def test_sum_accs_refuses_accumulators_of_different_models(tmp_path, small_model,
                                                           train_data):
    scp = write_scp(tmp_path / "f.scp", train_data.utts[:10])
    assert invoke("acc-stats", small_model, f"scp:{scp}", tmp_path / "k4.acc",
                  "--kaldi-accs").exit_code == 0
    one_line_error(invoke("sum-accs", tmp_path / "s.acc", KALDI_MODELS / "acc.sum.kaldi.bin",
                          tmp_path / "k4.acc"), str(tmp_path / "k4.acc"), "another model")
    assert not (tmp_path / "s.acc").exists()


def test_est_update_flags_must_be_accumulated(tmp_path, train_data):
    scp = write_scp(tmp_path / "f.scp", train_data.utts[:40])
    assert invoke("acc-stats", MODEL, f"scp:{scp}", tmp_path / "w.acc", "--kaldi-accs",
                  "--update-flags=w").exit_code == 0
    assert read_kaldi_accs(tmp_path / "w.acc").flags == "w"
    one_line_error(invoke("est", MODEL, tmp_path / "w.acc", tmp_path / "o.mdl"),
                   "--update-flags")
    result = invoke("est", MODEL, tmp_path / "w.acc", tmp_path / "o.mdl", "--update-flags=w")
    assert result.exit_code == 0, result.output
    before, after = read_kaldi_model(MODEL), read_kaldi_model(tmp_path / "o.mdl")
    assert rel(after.means, before.means) < 1e-6 and rel(after.weights, before.weights) > 1e-3


@pytest.mark.parametrize(("args", "words"), [
    (("est", KALDI_MODELS / "acc.sum.kaldi.bin", KALDI_MODELS / "acc.sum.kaldi.bin", "o"),
     ("accumulators, not a model",)),
    (("est", MODEL, MODEL, "o"), ("holds a Kaldi model, not accumulators",)),
    (("est", MODEL, KALDI_MODELS / "acc.sum.kaldi.bin", "o", "--mix-up=4"),
     ("--mix-up=4",)),
    (("est", MODEL, KALDI_MODELS / "acc.sum.kaldi.bin", "o", "--update-flags=mx"),
     ("invalid letter 'x'",)),
    (("acc-stats", MODEL, "feats.scp", "o"), ("data dir", "scp:feats.scp")),
    (("get-frame-likes", MODEL, "ark:/nonexistent/feats.ark", "ark,t:-"),
     ("/nonexistent/feats.ark",)),
])
def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    one_line_error(invoke(*args), *words)
    assert not (tmp_path / "o").exists()


def test_acc_stats_refuses_features_of_another_dimension(tmp_path):
    import kaldiio

    kaldiio.save_ark(str(tmp_path / "f.ark"), {"u1": np.zeros((5, 13), dtype=np.float32)})
    one_line_error(invoke("acc-stats", MODEL, f"ark:{tmp_path / 'f.ark'}", tmp_path / "o"),
                   "dim 13", "dim 39")


def test_truncated_accumulators_are_one_line_errors(tmp_path):
    raw = (KALDI_MODELS / "acc.sum.kaldi.bin").read_bytes()
    cut = tmp_path / "cut.acc"
    cut.write_bytes(raw[: len(raw) // 2])
    one_line_error(invoke("est", MODEL, cut, tmp_path / "o.mdl"), str(cut))
    one_line_error(invoke("sum-accs", tmp_path / "s", cut, cut), str(cut))


@pytest.mark.parametrize("label", ["a/b", "..", ".", "x\\y"])
def test_labels_that_cannot_name_files_are_refused(tmp_path, label):
    from emdist.io.modelio import save_models

    gmm = read_kaldi_model(MODEL)
    save_models(tmp_path / "m.mdl", {label: gmm, "ok": gmm})
    one_line_error(invoke("export", tmp_path / "m.mdl", "--all", tmp_path / "out"),
                   repr(label), "cannot name a file")
    assert not (tmp_path / "out" / "ok.mdl").exists()  # checked before anything is written


# -- the README's recipe fragment ----------------------------------------------------------

RUN_PL = r"""#!/usr/bin/env bash
# run.pl JOB=1:N LOG CMD...: each job in turn, JOB replaced in LOG and CMD (Kaldi's run.pl)
range=${1#JOB=}; shift; log=$1; shift
for j in $(seq "${range%:*}" "${range#*:}"); do
  args=(); for a in "$@"; do args+=("${a//JOB/$j}"); done
  mkdir -p "$(dirname "${log//JOB/$j}")"
  "${args[@]}" > "${log//JOB/$j}" 2>&1 || { cat "${log//JOB/$j}" >&2; exit 1; }
done
"""

SPLIT_DATA = r"""#!/usr/bin/env bash
# utils/split_data.sh DATA N: N contiguous parts of DATA/feats.scp in DATA/splitN/JOB
data=$1; n=$2; total=$(wc -l < "$data/feats.scp")
for j in $(seq "$n"); do mkdir -p "$data/split$n/$j"; done
awk -v n="$n" -v t="$total" -v d="$data/split$n" \
  '{ print > (d "/" (int((NR - 1) * n / t) + 1) "/feats.scp") }' "$data/feats.scp"
"""


def readme_recipe() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```bash\nnj=4; dir=exp/ubm")
    return text[start + len("```bash\n"): text.index("```", start + 3)]


def test_readme_kaldi_recipe_runs(tmp_path, train_data):
    """The README's fragment, with stand-ins for Kaldi's run.pl, split_data.sh and
    gmm-global-copy (which reads the final model here through emdist's Kaldi reader)."""
    (tmp_path / "data").mkdir()
    write_scp(tmp_path / "data" / "feats.scp", train_data.utts)
    (tmp_path / "data" / "train").mkdir()
    (tmp_path / "data" / "train" / "feats.scp").write_text(
        (tmp_path / "data" / "feats.scp").read_text())
    for name, body in (("run.pl", RUN_PL), ("utils/split_data.sh", SPLIT_DATA)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(0o755)
    (tmp_path / "exp" / "ubm").mkdir(parents=True)
    (tmp_path / "exp" / "ubm" / "0.ubm").write_bytes(
        (KALDI_MODELS / "diag_digits_k8.kaldi.bin").read_bytes())
    run_shell(f"""
        cmd=./run.pl
        gmm-global-copy() {{ emdist import "$2" copied.mdl; }}
        {readme_recipe()}
    """, tmp_path)
    first = read_kaldi_model(tmp_path / "exp" / "ubm" / "0.ubm")
    last = read_kaldi_model(tmp_path / "exp" / "ubm" / "4.ubm")
    assert (tmp_path / "exp" / "ubm" / "4.ubm").read_bytes().startswith(b"\0B<DiagGMM>")
    assert list(load_models(tmp_path / "copied.mdl")) == ["global"]
    frames = np.concatenate([read_utterance(u) for u in train_data.utts[::10]])
    assert scipy_frame_likes(last, frames).mean() > scipy_frame_likes(first, frames).mean()
    assert (tmp_path / "exp" / "ubm" / "log" / "acc.3.4.log").is_file()
    # the selections went through gzip, and each job's accumulation read its own
    selected = dict(read_gselect(f"ark:gunzip -c {tmp_path / 'exp/ubm/gselect.4.gz'} |"))
    split = (tmp_path / "data" / "train" / "split4" / "4" / "feats.scp").read_text()
    assert list(selected) == [line.split()[0] for line in split.splitlines()]
    assert {v.shape[1] for v in selected.values()} == {8}  # --n=30 of 8 Gaussians: all


def test_full_covariance_models_go_through_the_commands(tmp_path, train_data):
    """fgmm-global-* files: a Kaldi <FullGMM> in, full accumulators (<FULLVARACCS>, stored
    centred) between the commands, a <FullGMM> out equal to the update of emdist's own
    statistics to float32 precision."""
    from emdist.models.mstep import MStepOptions, m_step

    model = KALDI_MODELS / "full_digits_k4.kaldi.txt"
    scp = write_scp(tmp_path / "f.scp", train_data.utts)
    for out, extra in (("k.acc", ("--kaldi-accs", "--binary=false")), ("e.stats", ())):
        result = invoke("acc-stats", model, f"scp:{scp}", tmp_path / out, *extra)
        assert result.exit_code == 0, result.output
    assert b"<FULLVARACCS>" in (tmp_path / "k.acc").read_bytes()
    result = invoke("est", model, tmp_path / "k.acc", tmp_path / "new.mdl", "--binary=false",
                    "--min-gaussian-occupancy=200")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new.mdl").read_bytes().startswith(b"<FullGMM>")
    want, _ = m_step(load_stats(tmp_path / "e.stats")["global"],
                     MStepOptions(min_gaussian_occupancy=200), read_kaldi_model(model))
    assert_gmm_close(read_kaldi_model(tmp_path / "new.mdl"), want, rtol=1e-5)


def test_standard_output_closed_early_ends_quietly(tmp_path, train_data):
    """``emdist get-frame-likes ... ark,t:- | head -1``: the rest of the table has no
    reader; emdist stops without an error message (status 141, as a filter killed by
    SIGPIPE), like Kaldi's tools."""
    scp = write_scp(tmp_path / "f.scp", train_data.utts)
    emdist = " ".join(emdist_command())
    done = subprocess.run(
        ["bash", "-c", f"{emdist} get-frame-likes {MODEL} scp:{scp} ark,t:- | head -1; "
         "echo status ${PIPESTATUS[0]} >&2"],
        capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith(train_data.utts[0].utt_id) and done.stdout.count("\n") == 1
    assert done.stderr.splitlines()[-1] == "status 141"
    assert "error" not in done.stderr
