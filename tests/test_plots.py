"""Plots of an exp dir (``emdist.report.plots``): the PNG files of ``EXP_DIR/plots/``.

What is proved, on real exp dirs written by the CLI in process (word GMMs on a subset of the
bundled digits, trained, then tested; and a ``--global`` GMM): ``write_plots`` writes the
expected files, each a PNG of the documented pixel size (IHDR) and of a size fit to commit;
the log-likelihood plot has one line per word model plus the overall line (only the overall
line for a global model or for an older ``metrics.jsonl`` without ``loglike_by_label``); the
confusion plot shows the error rate and every label; rendering twice gives the same bytes,
with no software stamp; a missing or empty exp dir, and a missing matplotlib, are one-line
``UserError`` s; ``import emdist.report`` does not import matplotlib.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import digits_subset
from typer.testing import CliRunner

from emdist.errors import UserError
from emdist.report import plots
from emdist.report.plots import MATPLOTLIB_NOTE, PLOT_SIZES, render_plots, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NEED_MPL = "the plots need matplotlib (pip install 'emdist[plot]')"


def build_exp_dirs(root: Path) -> dict[str, Path]:
    """Train and test through the real CLI, in process: ``word`` (GMMs of 4 Gaussians for
    the 11 digits, 4 training utterances each, 3 iterations, tested on 3 utterances per
    digit) and ``global`` (one GMM of 8 Gaussians over the same frames). About a second."""
    from emdist.cli import app

    train = digits_subset(root / "data" / "train", "train", 4)
    test = digits_subset(root / "data" / "test", "test", 3)
    word, glob = root / "exp", root / "ubm"
    common = ["--workers", "0", "--num-iters", "3", "--nj", "2"]
    runs = [
        ["train", str(train), str(word), "--num-gauss", "4", *common],
        ["test", str(word), str(test), "--workers", "0"],
        ["train", str(train), str(glob), "--global", "--num-gauss", "8", *common],
        ["test", str(glob), str(test), "--workers", "0"],
    ]
    # The CLI points emdist's loggers at the runner's (then closed) stderr: undo it.
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate)
             for lg in map(logging.getLogger, ("emdist", "py.warnings"))]
    try:
        runner = CliRunner()
        for args in runs:
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
        logging.captureWarnings(False)
    return {"word": word, "global": glob}


def strip_new_metrics(exp: Path, dst: Path) -> Path:
    """A copy of ``exp`` whose ``metrics.jsonl`` lacks ``loglike_by_label`` and
    ``occupancy``, as exp dirs written before those fields were."""
    shutil.copytree(exp, dst)
    records = [json.loads(line) for line in (dst / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("loglike_by_label", None)
        record.pop("occupancy", None)
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.rmtree(dst / "plots", ignore_errors=True)
    return dst


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24)."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def exps(tmp_path_factory) -> dict[str, Path]:
    return build_exp_dirs(tmp_path_factory.mktemp("plots"))


def _metrics(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


def _results(exp: Path) -> dict:
    return json.loads((exp / "decode_test" / "results.json").read_text())


@pytest.mark.parametrize("kind, expected", [
    ("word", {"loglike.png": "loglike", "confusion_decode_test.png": "confusion",
              "occupancy.png": "occupancy"}),
    ("global", {"loglike.png": "loglike", "weights.png": "weights",
                "occupancy.png": "occupancy"}),
])
def test_write_plots_writes_pngs_of_the_documented_sizes(exps, kind, expected):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    exp = exps[kind]
    written = write_plots(exp)
    assert [p.name for p in written] == list(expected)
    assert sorted(p.name for p in (exp / "plots").iterdir()) == sorted(expected)  # no tmp
    for path in written:
        assert path.parent == exp / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        assert png_size(data) == PLOT_SIZES[expected[path.name]], path
        assert 2_000 < len(data) < 60_000, (path, len(data))  # small enough to commit
        assert b"matplotlib" not in data  # no Software stamp


def test_render_plots_is_reproducible(exps):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    first = render_plots(exps["word"])
    assert first == render_plots(exps["word"])
    for path in write_plots(exps["word"]):
        assert path.read_bytes() == first[path.name]


def test_loglike_plot_has_a_line_per_word_model_and_the_overall_line(exps):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    metrics = _metrics(exps["word"])
    labels = sorted(metrics[-1]["loglike_by_label"])
    assert len(labels) == 11
    fig = plots.loglike_figure(metrics)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [*labels, "all"]
    for line in lines:
        assert list(line.get_xdata()) == [r["iter"] for r in metrics]
    assert list(lines[-1].get_ydata()) == [r["loglike_per_frame"] for r in metrics]
    assert list(lines[0].get_ydata()) == [r["loglike_by_label"][labels[0]] for r in metrics]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*labels, "all"]

    global_fig = plots.loglike_figure(_metrics(exps["global"]))
    assert [line.get_label() for line in global_fig.axes[0].get_lines()] == ["all"]


def test_older_metrics_without_the_new_fields(exps, tmp_path):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    old = strip_new_metrics(exps["word"], tmp_path / "old")
    fig = plots.loglike_figure(_metrics(old))
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["all"]
    assert fig.legends == []
    assert list(render_plots(old)) == ["loglike.png", "confusion_decode_test.png"]
    old_global = strip_new_metrics(exps["global"], tmp_path / "old_global")
    assert list(render_plots(old_global)) == ["loglike.png", "weights.png"]


def test_confusion_plot_shows_the_counts_labels_and_error_rate(exps):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    results = _results(exps["word"])
    fig = plots.confusion_figure(results, "exp decode_test")
    ax = fig.axes[0]
    assert f"error rate {100 * results['error_rate']:.2f}%" in ax.get_title()
    assert f"[{results['n_errors']} / {results['n_utts']}]" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == results["labels"]
    assert [t.get_text() for t in ax.get_yticklabels()] == results["labels"]
    # every diagonal cell and every non-zero cell is written
    written = sum(1 for i, row in enumerate(results["confusion"])
                  for j, c in enumerate(row) if c or i == j)
    assert len(ax.texts) == written
    assert sum(float(t.get_text()) for t in ax.texts) == results["n_utts"]


def test_global_weights_and_occupancy_plots(exps):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    from emdist.io.modelio import load_models

    weights = load_models(exps["global"] / "final.mdl")["global"].weights
    ax = plots.weights_figure(weights).axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == sorted(map(float, weights), reverse=True)
    occupancy = _metrics(exps["global"])[-1]["occupancy"]
    ax = plots.occupancy_figure(occupancy).axes[0]
    assert [bar.get_height() for bar in ax.patches] == sorted(occupancy["global"],
                                                              reverse=True)
    words = _metrics(exps["word"])[-1]["occupancy"]
    fig = plots.occupancy_figure(words)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == sorted(words)


@pytest.mark.parametrize("make", ["missing", "empty", "config_only"])
def test_a_missing_or_empty_exp_dir_is_one_line(tmp_path, make):
    exp = tmp_path / "exp"
    if make != "missing":
        exp.mkdir()
    if make == "config_only":
        (exp / "config.json").write_text("{}")
    for function in (render_plots, write_plots):
        with pytest.raises(UserError) as info:
            function(exp)
        message = str(info.value)
        assert "\n" not in message
        assert str(exp) in message and "emdist train" in message
    assert not (exp / "plots").exists()


def test_a_malformed_metrics_line_is_named(tmp_path, exps):
    exp = tmp_path / "exp"
    shutil.copytree(exps["word"], exp)
    with (exp / "metrics.jsonl").open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:4: not a JSON record"):
        render_plots(exp)


def test_without_matplotlib_plots_are_a_one_line_error(exps, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError) as info:
        plots.require_matplotlib()
    assert str(info.value) == MATPLOTLIB_NOTE == 'plots need matplotlib: pip install "emdist[plot]"'
    shutil.rmtree(exps["global"] / "plots", ignore_errors=True)
    with pytest.raises(UserError, match="^plots need matplotlib"):
        write_plots(exps["global"])
    assert not (exps["global"] / "plots").exists()


def test_importing_the_report_package_does_not_import_matplotlib():
    code = ("import sys; import emdist.report, emdist.report.plots, emdist.report.html; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
            "sys.modules['matplotlib'] = None; import importlib; "
            "importlib.reload(emdist.report.plots); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
