"""``emdist info``, the records it reads (per-model log-likelihood and occupancy in
``metrics.jsonl``, every word's score in ``results.json``) and the end-of-training table."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import KALDI_MODELS, digits_subset
from typer.testing import CliRunner

from emdist.cli import app
from emdist.io.modelio import load_models

pytestmark = pytest.mark.usefixtures("restore_logging")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exps(tmp_path_factory):
    """A word-model run and a --global run on a digits subset, each tested."""
    root = tmp_path_factory.mktemp("info")
    train, test = digits_subset(root / "train", "train", 6), digits_subset(root / "test", "test", 2)
    out = {}
    for name, extra in (("words", ()), ("ubm", ("--global",))):
        exp = root / name
        result = invoke("train", train, exp, "--workers", "0", "--num-gauss", "4",
                        "--num-iters", "3", *extra)
        assert result.exit_code == 0, result.output
        result = invoke("test", exp, test, "--workers", "0")
        assert result.exit_code == 0, result.output
        out[name] = exp
    return out


def records(exp):
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


def test_metrics_hold_each_models_loglike_and_occupancy(exps):
    for name, exp in exps.items():
        models = load_models(exp / "final.mdl")
        for r in records(exp):
            assert set(r["loglike_by_label"]) == set(r["occupancy"]) == set(models)
            # soft posteriors of a frame add up to one: occupancies add up to the frames
            total = sum(sum(occ) for occ in r["occupancy"].values())
            assert total == pytest.approx(r["frames"], rel=1e-5)
            if name == "ubm":
                assert r["loglike_by_label"]["global"] == pytest.approx(r["loglike_per_frame"])
            else:  # the frame-weighted mean of the models' values is the overall value
                frames = {lab: sum(occ) for lab, occ in r["occupancy"].items()}
                mean = sum(r["loglike_by_label"][lab] * frames[lab] for lab in frames)
                assert mean / r["frames"] == pytest.approx(r["loglike_per_frame"], rel=1e-6)
        # occupancy of the last pass: one value per Gaussian of the model it started from
        last = records(exp)[-1]
        before = load_models(exp / f"{last['iter'] - 1}.mdl")
        assert {lab: len(v) for lab, v in last["occupancy"].items()} == \
            {lab: m.n_components for lab, m in before.items()}


def test_results_hold_every_words_score(exps):
    results = json.loads((exps["words"] / "decode_test" / "results.json").read_text())
    for u in results["utts"]:
        assert set(u["scores"]) == set(results["labels"])
        best = max(results["labels"], key=lambda lab: u["scores"][lab])
        assert u["hyp"] == best and u["score"] == u["scores"][best]


def test_info_json_of_an_exp_dir(exps):
    for name, exp in exps.items():
        result = invoke("info", exp, "--json")
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        models = load_models(exp / "final.mdl")
        metrics = records(exp)
        assert info["type"] == "exp_dir"
        assert info["model"]["labels"] == sorted(models)
        assert info["model"]["components"] == {k: m.n_components for k, m in models.items()}
        assert info["model"]["dim"] == 39 and info["model"]["kind"] == "gmm"
        assert info["training"]["iterations"] == len(metrics) == 3
        assert info["training"]["complete"] is True
        assert info["training"]["final_loglike_per_frame"] == metrics[-1]["loglike_per_frame"]
        (decode,) = info["results"]
        results = json.loads((exp / "decode_test" / "results.json").read_text())
        assert decode["decode"] == "decode_test"
        if name == "words":
            assert decode["n_errors"] == results["n_errors"]
            assert decode["error_rate"] == results["error_rate"]
        else:
            assert decode["loglike_per_frame"] == results["loglike_per_frame"]


def test_info_of_model_files_emdist_and_kaldi(exps):
    for path, fmt in ((exps["ubm"] / "final.mdl", "emdist"),
                      (KALDI_MODELS / "full_small.kaldi.bin", "kaldi")):
        result = invoke("info", path, "--json")
        assert result.exit_code == 0, result.output
        model = json.loads(result.output)["model"]
        loaded = load_models(path)["global"]
        assert model["file_format"] == fmt and model["labels"] == ["global"]
        assert model["total_components"] == loaded.n_components
        assert model["covariance_type"] == loaded.covariance_type


def test_info_tables_for_people(exps):
    result = invoke("info", exps["words"])
    assert result.exit_code == 0, result.output
    for words in ("model", "Gaussians", "iterations", "3 of 3", "decode_test", "%"):
        assert words in result.output


@pytest.mark.parametrize("what", ["missing", "empty-dir", "not-a-model"])
def test_info_errors_are_one_line(tmp_path, what):
    path = {"missing": tmp_path / "nope", "empty-dir": tmp_path,
            "not-a-model": tmp_path / "x.txt"}[what]
    if what == "not-a-model":
        path.write_text("hello\n")
    result = invoke("info", path)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emdist: error:") and str(path) in lines[0]


def test_summary_table_lists_every_iteration(exps):
    from rich.console import Console

    from emdist.progress import summary_table

    metrics = records(exps["words"])
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table(metrics))
    text = out.getvalue()
    rows = [line for line in text.splitlines() if line.strip().startswith("│")]
    assert len(rows) == len(metrics)
    for r, row in zip(metrics, rows, strict=True):
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert int(cells[0]) == r["iter"]
        assert float(cells[1]) == pytest.approx(r["loglike_per_frame"], abs=1e-4)
        assert int(cells[3]) == sum(r["n_components"].values())
    assert np.isfinite([r["loglike_per_frame"] for r in metrics]).all()


class RecordingProgress:
    is_terminal = False

    def __init__(self):
        self.passes = []

    def start(self, title, n_jobs, n_frames):
        self.passes.append({"title": title, "jobs": n_jobs, "frames": n_frames, "done": [],
                            "finished": False})

    def advance(self, n_frames):
        self.passes[-1]["done"].append(n_frames)

    def finish(self):
        self.passes[-1]["finished"] = True


def test_every_pass_reports_progress_including_scoring(tmp_path):
    """Training passes and the scoring pass of emdist test tell the progress of each job:
    every job once, all frames, then finished."""
    from emdist.backends.serial import SerialBackend
    from emdist.data.datadir import load_data_dir
    from emdist.engine import TrainConfig, train
    from emdist.recognizer import evaluate

    data = load_data_dir(digits_subset(tmp_path / "d", "train", 3))
    progress = RecordingProgress()
    models = train(data, TrainConfig(num_gauss=2, num_iters=2, nj=3), SerialBackend(),
                   progress=progress)
    evaluate(models, data, SerialBackend(), nj=3, progress=progress)
    titles = [p["title"] for p in progress.passes]
    assert titles[-3:] == ["acc 0", "acc 1", "score"]
    for p in progress.passes:
        assert p["finished"] and len(p["done"]) == p["jobs"] == 3
        assert sum(p["done"]) == p["frames"] == data.num_frames


def test_progress_bar_shows_rate_and_eta(tmp_path):
    from rich.console import Console

    from emdist.progress import BarProgress

    out = io.StringIO()
    bar = BarProgress(Console(file=out, force_terminal=True, width=150))
    bar.start("acc 3", 4, 4000)
    for _ in range(4):
        bar.advance(1000)
    bar._progress.refresh()
    text = out.getvalue()
    bar.finish()
    assert "acc 3" in text and "4/4" in text and "frames/s" in text and "eta" in text


# -- plot, report and --plots through the CLI ------------------------------------------------


def test_plot_and_report_commands(exps):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")
    for name, exp in exps.items():
        result = invoke("plot", exp)
        assert result.exit_code == 0, result.output
        want = {"loglike.png", "confusion_decode_test.png", "occupancy.png"} if \
            name == "words" else {"loglike.png", "weights.png", "occupancy.png"}
        assert {p.name for p in (exp / "plots").iterdir()} == want
        for png in (exp / "plots").iterdir():
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        result = invoke("report", exp)
        assert result.exit_code == 0, result.output
        html = (exp / "report.html").read_text()
        assert html.count("data:image/png;base64,") == len(want)


def test_train_and_test_with_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")
    data = digits_subset(tmp_path / "d", "train", 2)
    exp = tmp_path / "exp"
    result = invoke("train", data, exp, "--workers", "0", "--num-gauss", "2", "--num-iters",
                    "2", "--plots")
    assert result.exit_code == 0, result.output
    assert (exp / "plots" / "loglike.png").is_file()
    assert not (exp / "plots" / "confusion_decode_d.png").exists()
    result = invoke("test", exp, data, "--workers", "0", "--plots")
    assert result.exit_code == 0, result.output
    assert (exp / "plots" / "confusion_decode_d.png").is_file()


def test_plots_without_matplotlib_fail_first_in_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    exp = tmp_path / "exp"
    result = invoke("train", digits_subset(tmp_path / "d", "train", 2), exp, "--workers", "0",
                    "--num-iters", "1", "--plots")
    assert result.exit_code == 2
    assert result.output.strip() == 'emdist: error: plots need matplotlib: pip install ' \
        '"emdist[plot]"'
    assert not exp.exists()  # nothing trained
