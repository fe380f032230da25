"""A self-contained HTML report of an exp dir: ``EXP_DIR/report.html``.

One file with no external resource: inline CSS, the plots of :mod:`emdist.report.plots`
embedded as ``data:image/png;base64,...`` images, every text escaped. Sections: the
configuration (``config.json``), the iterations (``metrics.jsonl``), the plots (or, without
matplotlib, one line saying how to get them), and for each ``decode_*/results.json`` the
results, the confusion matrix and the misrecognised utterances with every word model's
score (or, for a global model, the per-utterance log-likelihood summary).

A tiny inline script sets ``data-images-loaded`` (images decoded, ``naturalWidth > 0``)
and ``data-tables`` (tables) on ``<body>`` once the page has loaded, so a headless
browser's DOM dump shows that the images decoded.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from emdist.errors import UserError
from emdist.io.modelio import atomic_write_text
from emdist.report.plots import (
    MATPLOTLIB_NOTE,
    PLOT_SIZES,
    Decode,
    ExpData,
    read_exp,
    render_data,
)

REPORT_NAME = "report.html"
WORST_UTTS = 10
"""Rows of the table of a global model's lowest-scoring utterances."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 1150px; padding: 0 1em; color: #1b1f24;
       background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.1em; margin-top: 1.2em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .86em; }
th, td { border: 1px solid #d0d7de; padding: .2em .55em; text-align: right; }
th { background: #f3f5f7; }
td.text, th.text { text-align: left; }
code { background: #f3f5f7; padding: 0 .25em; border-radius: 3px; }
table.confusion td.diag { background: #dbeafe; font-weight: 600; }
table.confusion td.off { background: #fde2e1; font-weight: 600; }
table.confusion td.zero { color: #b0b7bf; }
td.best { background: #d3f5d8; font-weight: 600; }
td.ref { outline: 2px solid #8c959f; outline-offset: -2px; }
.note { color: #6e4c00; background: #fff8c5; border: 1px solid #e5d38a; padding: .5em .8em; }
.muted { color: #57606a; }
figure { display: inline-block; margin: .4em .8em .8em 0; vertical-align: top; }
figcaption { font-size: .82em; color: #57606a; }
img { border: 1px solid #d0d7de; max-width: 100%; height: auto; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var n = 0;
  for (var i = 0; i < document.images.length; i++) {
    if (document.images[i].complete && document.images[i].naturalWidth > 0) { n++; }
  }
  document.body.dataset.imagesLoaded = String(n);
  document.body.dataset.tables = String(document.getElementsByTagName("table").length);
});
"""


_TEXT = ' class="text"'


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _or_dash(value: Any) -> Any:
    """A missing value (an utterance no model could score has no hypothesis) as a dash."""
    return "\u2014" if value is None else value


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: ints as they are, floats with ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], css: str = "",
           text_columns: int = 0, escaped: bool = False) -> str:
    """An HTML table; cells are escaped unless ``escaped`` (then each is already HTML,
    ``<td ...>`` included)."""
    cls = f' class="{_e(css)}"' if css else ""
    out = [f"<table{cls}>", "<thead><tr>"]
    out += [f"<th{_TEXT if i < text_columns else ''}>{_e(h)}</th>"
            for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        if escaped:
            out.append("<tr>" + "".join(row) + "</tr>")
        else:
            out.append("<tr>" + "".join(
                f"<td{_TEXT if i < text_columns else ''}>{_e(c)}</td>"
                for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key in sorted(config):
        value = config[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _gaussians(n_components: dict[str, Any] | None) -> str:
    """``11 × 32`` when every model has as many Gaussians, else ``min–max (total)``."""
    if not n_components:
        return "–"
    counts = [sum(v) if isinstance(v, list) else int(v) for v in n_components.values()]
    if len(counts) == 1:
        return str(counts[0])
    if len(set(counts)) == 1:
        return f"{len(counts)} × {counts[0]}"
    return f"{min(counts)}–{max(counts)} ({sum(counts)} in {len(counts)} models)"


# -- sections ----------------------------------------------------------------------------


def _config_section(exp: ExpData) -> str:
    out = ['<section id="config">', "<h2>Configuration</h2>"]
    if exp.config is None:
        out.append('<p class="muted">no config.json</p>')
    else:
        out.append(_table(["option", "value"],
                          ((k, _value_text(v)) for k, v in _flatten(exp.config)),
                          css="config", text_columns=2))
    out.append("</section>")
    return "\n".join(out)


def _iterations_section(exp: ExpData) -> str:
    out = ['<section id="iterations">', "<h2>Iterations</h2>"]
    if not exp.metrics:
        out.append('<p class="muted">no metrics.jsonl records</p>')
    else:
        out.append('<p class="muted">log-likelihood per frame of the model each iteration '
                   "started from; Gaussians per model after it.</p>")
        rows = [(_num(r.get("iter")), _num(r.get("loglike_per_frame"), 6),
                 _num(r.get("frames")), _gaussians(r.get("n_components")),
                 _num(r.get("floored")), _num(r.get("removed")),
                 _num(r.get("seconds"), 3)) for r in exp.metrics]
        out.append(_table(["iter", "log-likelihood per frame", "frames", "Gaussians",
                           "floored", "removed", "seconds"], rows, css="iterations"))
    out.append("</section>")
    return "\n".join(out)


def _plots_section(plots: dict[str, bytes] | None, note: str | None) -> str:
    out = ['<section id="plots">', "<h2>Plots</h2>"]
    if note is not None:
        out.append(f'<p class="note">{_e(note)}</p>')
    elif not plots:
        out.append('<p class="muted">nothing to plot</p>')
    else:
        for name, data in plots.items():
            kind = "confusion" if name.startswith("confusion_") else name.removesuffix(".png")
            width, height = PLOT_SIZES.get(kind, (None, None))
            size = f' width="{width}" height="{height}"' if width else ""
            src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            out.append(f'<figure><img src="{src}" alt="{_e(name)}"{size}>'
                       f"<figcaption>{_e(name)}</figcaption></figure>")
    out.append("</section>")
    return "\n".join(out)


def _confusion_table(results: dict[str, Any]) -> str:
    labels = [str(lab) for lab in results["labels"]]
    matrix = results["confusion"]
    header = '<tr><th class="text">ref \\ hyp</th>' + "".join(
        f"<th>{_e(lab)}</th>" for lab in labels) + "<th>errors</th></tr>"
    rows = []
    for i, (label, row) in enumerate(zip(labels, matrix, strict=False)):
        cells = []
        for j, count in enumerate(row):
            css = "diag" if i == j else ("off" if count else "zero")
            cells.append(f'<td class="{css}">{_e(_num(count))}</td>')
        errors = sum(c for j, c in enumerate(row) if j != i)
        rows.append(f'<tr><th class="text">{_e(label)}</th>{"".join(cells)}'
                    f"<td>{_e(_num(errors))}</td></tr>")
    return ('<table class="confusion">\n<thead>' + header + "</thead><tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>")


def _misrecognised_table(results: dict[str, Any]) -> str:
    labels = [str(lab) for lab in results.get("labels", [])]
    wrong = [u for u in results.get("utts", []) if u.get("ref") != u.get("hyp")]
    if not wrong:
        return '<p class="muted">no misrecognised utterance</p>'
    rows = []
    for utt in wrong:
        scores = utt.get("scores") or {}
        valid = [s for s in scores.values() if isinstance(s, int | float)]
        best = max(valid) if valid else None
        cells = [f'<td class="text">{_e(utt.get("utt"))}</td>',
                 f'<td class="text">{_e(utt.get("ref"))}</td>',
                 f'<td class="text">{_e(_or_dash(utt.get("hyp")))}</td>']
        for label in labels:
            score = scores.get(label)
            classes = []
            if score is not None and score == best:
                classes.append("best")
            if label == str(utt.get("ref")):
                classes.append("ref")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{_e(_num(score, 1))}</td>")
        rows.append(cells)
    return ('<p class="muted">total log-likelihood of each utterance under every word '
            'model; the best is highlighted, the reference\'s is outlined; – where a model '
            "cannot align the utterance.</p>\n"
            + _table(["utt", "ref", "hyp", *labels], rows, css="misrecognised",
                     text_columns=3, escaped=True))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _global_decode(decode: Decode) -> str:
    r = decode.results
    out = [_table(["log-likelihood per frame", "utterances", "frames"],
                  [(_num(r.get("loglike_per_frame"), 6), _num(r.get("n_utts")),
                    _num(r.get("n_frames")))], css="results")]
    per_frame = [(u["score"] / u["frames"], u) for u in r.get("utts", [])
                 if isinstance(u.get("score"), int | float) and u.get("frames")]
    if per_frame:
        values = sorted(v for v, _ in per_frame)
        out.append("<h4>Per-utterance log-likelihood per frame</h4>")
        out.append(_table(["min", "10%", "25%", "median", "75%", "90%", "max"],
                          [[_num(_quantile(values, q), 3)
                            for q in (0, .1, .25, .5, .75, .9, 1)]], css="utt-summary"))
        worst = sorted(per_frame, key=lambda item: item[0])[:WORST_UTTS]
        out.append(f"<h4>The {len(worst)} lowest-scoring utterances</h4>")
        out.append(_table(["utt", "frames", "log-likelihood", "per frame"],
                          [(u.get("utt"), _num(u.get("frames")), _num(u.get("score"), 1),
                            _num(v, 3)) for v, u in worst],
                          css="worst-utts", text_columns=1))
    return "\n".join(out)


def _word_decode(decode: Decode) -> str:
    r = decode.results
    rate, acc = r.get("error_rate"), r.get("accuracy")
    out = [_table(["error rate", "accuracy", "utterances", "errors"],
                  [(f"{100 * rate:.2f}%" if isinstance(rate, int | float) else "–",
                    f"{100 * acc:.2f}%" if isinstance(acc, int | float) else "–",
                    _num(r.get("n_utts")), _num(r.get("n_errors")))], css="results")]
    if r.get("confusion") and r.get("labels"):
        out.append("<h4>Confusion matrix (rows reference, columns hypothesis)</h4>")
        out.append(_confusion_table(r))
    out.append("<h4>Misrecognised utterances</h4>")
    out.append(_misrecognised_table(r))
    return "\n".join(out)


def _decode_sections(exp: ExpData) -> str:
    out = ['<section id="decodes">', "<h2>Results</h2>"]
    if not exp.decodes:
        out.append('<p class="muted">no decode_*/results.json; run emdist test</p>')
    for decode in exp.decodes:
        out.append(f'<section class="decode" id="{_e(decode.name)}">')
        out.append(f"<h3>{_e(decode.name)}</h3>")
        out.append(_global_decode(decode) if decode.is_global else _word_decode(decode))
        out.append("</section>")
    out.append("</section>")
    return "\n".join(out)


# -- the report --------------------------------------------------------------------------


def build_report(exp_dir: str | os.PathLike) -> str:
    """The HTML text of the report of an exp dir (see :func:`write_report`)."""
    exp = read_exp(exp_dir)
    plots: dict[str, bytes] | None = None
    note = None
    try:
        plots = render_data(exp)
    except UserError as exc:
        if str(exc) != MATPLOTLIB_NOTE:
            raise
        note = str(exc)
    name = exp.path.resolve().name
    kind = (exp.config or {}).get("model", "gmm")
    what = f"global {kind}" if exp.is_global else f"{kind} word models"
    summary = []
    if exp.metrics:
        summary.append(f"{len(exp.metrics)} iterations, log-likelihood per frame "
                       f"{_num(exp.metrics[-1]['loglike_per_frame'], 4)}")
    if exp.model_path is not None:
        summary.append(f"model {exp.model_path.name}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>emdist report: {_e(name)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head>",
        "<body>",
        f"<h1>emdist report: {_e(name)}</h1>",
        f'<p class="muted"><code>{_e(exp.path.resolve())}</code>: {_e(what)}'
        + (f"; {_e('; '.join(summary))}" if summary else "") + "</p>",
        _config_section(exp),
        _iterations_section(exp),
        _plots_section(plots, note),
        _decode_sections(exp),
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def write_report(exp_dir: str | os.PathLike) -> Path:
    """Write ``EXP_DIR/report.html`` atomically and return its path: one self-contained
    file (inline CSS, PNG plots as ``data:`` URIs). Without matplotlib the report is still
    written, with a one-line note instead of the plots. A missing or empty exp dir is a
    one-line :class:`UserError`."""
    text = build_report(exp_dir)
    path = Path(exp_dir) / REPORT_NAME
    atomic_write_text(path, text)
    return path
