"""Plots of an exp dir, as PNG files in ``EXP_DIR/plots/`` or as bytes for the HTML report.

:func:`read_exp` gathers what an exp dir holds (``config.json``, ``metrics.jsonl``, the
last model, every ``decode_*/results.json``); :func:`render_plots` draws it into PNG bytes
keyed by file name; :func:`write_plots` writes those files atomically.

matplotlib is optional (``pip install "emdist[plot]"``): it is imported inside the
functions that draw, never when this module is imported, and only its object-oriented API
is used (a :class:`matplotlib.figure.Figure` on an Agg canvas, no pyplot state), so
plotting changes nothing in the caller's matplotlib session. Every figure has a fixed size
and resolution (:data:`PLOT_SIZES`), so the images' pixel sizes are known in advance.

Plots (file names):

``loglike.png``
    log-likelihood per frame by iteration: the overall value and, where ``metrics.jsonl``
    has ``loglike_by_label``, one line per word model.
``confusion_<decode dir>.png``
    for each ``decode_*/results.json`` with a confusion matrix: counts by reference (rows)
    and hypothesis (columns), the error rate in the title.
``weights.png``
    a global GMM's component weights (of ``final.mdl``, or the last ``N.mdl``), sorted.
``occupancy.png``
    each Gaussian's occupancy in the last iteration, sorted: one line per word model, or
    the global model's; only where ``metrics.jsonl`` has ``occupancy``.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emdist.errors import UserError
from emdist.io.modelio import atomic_write_bytes, load_models

MATPLOTLIB_NOTE = 'plots need matplotlib: pip install "emdist[plot]"'
"""The one line said (raised or shown in the report) when matplotlib is missing."""

DPI = 100
PLOT_SIZES: dict[str, tuple[int, int]] = {
    "loglike": (640, 400),
    "confusion": (560, 480),
    "weights": (640, 400),
    "occupancy": (640, 400),
}
"""Width and height in pixels of each kind of plot (``confusion`` for every
``confusion_<decode dir>.png``)."""

GLOBAL_LABEL = "global"


@dataclass
class Decode:
    """One ``decode_<data>/results.json``."""

    name: str
    path: Path
    results: dict[str, Any]

    @property
    def is_global(self) -> bool:
        return "confusion" not in self.results and "labels" not in self.results


@dataclass
class ExpData:
    """What an exp dir holds, read once for the plots and the report."""

    path: Path
    config: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    model_path: Path | None
    decodes: list[Decode] = field(default_factory=list)
    _models: dict | None = field(default=None, repr=False)

    @property
    def is_global(self) -> bool:
        if self.config is not None and "global_mode" in self.config:
            return bool(self.config["global_mode"])
        labels = set()
        for record in self.metrics:
            labels.update(record.get("n_components", {}))
        return labels == {GLOBAL_LABEL}

    @property
    def models(self) -> dict:
        """The last model (``final.mdl``, else the highest ``N.mdl``): ``{label: model}``."""
        if self._models is None:
            self._models = load_models(self.model_path) if self.model_path else {}
        return self._models

    @property
    def labels(self) -> list[str]:
        if self.metrics:
            return sorted(self.metrics[-1].get("n_components", {}))
        return sorted(self.models)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not a JSON record ({exc})") from None
        if not isinstance(record, dict) or "iter" not in record \
                or "loglike_per_frame" not in record:
            raise UserError(f"{path}:{number}: not a metrics record "
                            "(needs iter and loglike_per_frame)")
        records.append(record)
    return records


def read_exp(exp_dir: str | os.PathLike) -> ExpData:
    """Read an exp dir; a missing one, or one without ``metrics.jsonl`` records or a model,
    is a one-line :class:`UserError` saying to run ``emdist train`` first."""
    path = Path(exp_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such exp dir; run emdist train first")
    metrics = _read_metrics(path / "metrics.jsonl")
    model_path = path / "final.mdl"
    if not model_path.is_file():
        numbered = sorted((int(p.stem), p) for p in path.glob("*.mdl") if p.stem.isdigit())
        model_path = numbered[-1][1] if numbered else None
    if not metrics and model_path is None:
        raise UserError(f"{path}: no metrics.jsonl records and no final.mdl; "
                        "run emdist train first")
    config_path = path / "config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    decodes = []
    for results in sorted(path.glob("decode_*/results.json")):
        data = _read_json(results)
        if not isinstance(data, dict):
            raise UserError(f"{results}: not a results object")
        decodes.append(Decode(results.parent.name, results, data))
    return ExpData(path, config if isinstance(config, dict) else None, metrics, model_path,
                   decodes)


# -- matplotlib --------------------------------------------------------------------------


def require_matplotlib():
    """Import matplotlib for drawing on the Agg backend's canvas (no display needed) and
    return the module; without it, a one-line :class:`UserError` saying how to get it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise UserError(MATPLOTLIB_NOTE) from None
    return matplotlib


def _figure(kind: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = PLOT_SIZES[kind]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes, with no software or date stamp (the same plot, the same
    bytes), reduced to a 256-colour palette with Pillow (matplotlib's own dependency): a
    third of the size of matplotlib's RGBA file, with no visible difference on these
    plots."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        return buf.getvalue()
    with Image.open(io.BytesIO(buf.getvalue())) as image:
        palette = image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="png", optimize=True)
    return out.getvalue()


def _styles(n: int) -> list[dict[str, Any]]:
    """Line styles for ``n`` models: tab10's colours, then dashed, dotted, ... lines."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    dashes = ["-", "--", ":", "-."]
    return [{"color": cmap(i % 10), "linestyle": dashes[(i // 10) % len(dashes)]}
            for i in range(n)]


def loglike_figure(metrics: list[dict[str, Any]], title: str = ""):
    """Log-likelihood per frame by iteration: one line per word model (from
    ``loglike_by_label``, where the records have it) and the overall line (labelled
    ``all``), with a legend. A global model has the overall line only."""
    require_matplotlib()
    fig = _figure("loglike")
    ax = fig.add_subplot()
    iters = [r["iter"] for r in metrics]
    labels = sorted({lab for r in metrics for lab in (r.get("loglike_by_label") or {})}
                    - {GLOBAL_LABEL})
    for label, style in zip(labels, _styles(len(labels)), strict=True):
        points = [(r["iter"], r["loglike_by_label"][label]) for r in metrics
                  if label in (r.get("loglike_by_label") or {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2, marker=".",
                markersize=4, label=label, **style)
    ax.plot(iters, [r["loglike_per_frame"] for r in metrics], color="black", linewidth=2.2,
            marker="o", markersize=4, label="all")
    ax.set_xlabel("iteration (the model it started from: iteration - 1)")
    ax.set_ylabel("log-likelihood per frame")
    ax.set_title(title or "training log-likelihood", fontsize=10)
    ax.grid(True, alpha=0.3)
    if iters:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if labels:
        fig.legend(loc="outside right upper", fontsize=7, ncols=1 if len(labels) < 16 else 2,
                   title="model", title_fontsize=7)
    return fig


def confusion_figure(results: dict[str, Any], title: str = ""):
    """A heat map of ``results['confusion']`` (rows reference, columns hypothesis, in
    ``results['labels']`` order) with the counts written in the cells and the error rate in
    the title."""
    require_matplotlib()
    import numpy as np

    labels = [str(lab) for lab in results["labels"]]
    matrix = np.asarray(results["confusion"], dtype=float).reshape(len(labels), len(labels))
    fig = _figure("confusion")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(matrix.max(), 1),
                      interpolation="nearest", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, fontsize=8 if len(labels) <= 20 else 5,
                  rotation=0 if len(labels) <= 20 else 90)
    ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) <= 20 else 5)
    ax.set_xlabel("hypothesis")
    ax.set_ylabel("reference")
    if len(labels) <= 25:
        top = matrix.max()
        for i in range(len(labels)):
            for j in range(len(labels)):
                count = matrix[i, j]
                if count == 0 and i != j:
                    continue
                ax.text(j, i, f"{count:g}", ha="center", va="center",
                        fontsize=8 if len(labels) <= 15 else 6,
                        color="white" if top and count > 0.6 * top else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="utterances")
    rate = results.get("error_rate")
    errors = results.get("n_errors")
    utts = results.get("n_utts")
    heading = title or "confusion"
    if rate is not None:
        heading += f": error rate {100 * rate:.2f}%"
        if errors is not None and utts is not None:
            heading += f" [{errors} / {utts}]"
    ax.set_title(heading, fontsize=10)
    return fig


def _sorted_plot(ax, values, **style) -> None:
    """Values sorted in descending order: bars for a few, a line for many."""
    ordered = sorted((float(v) for v in values), reverse=True)
    x = range(1, len(ordered) + 1)
    if len(ordered) <= 64 and style.pop("bars", False):
        ax.bar(x, ordered, width=0.8, color=style.get("color", "tab:blue"))
    else:
        style.pop("bars", None)
        ax.plot(x, ordered, **style)


def _log_y(ax, values) -> None:
    """A log y scale when the values span more than a decade (linear from 0 otherwise);
    zeros (a starved k-means centre) on a symlog scale, where a log scale would hide
    them."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    low, high = min(values), max(values)
    if low > 0 and high / low < 10:
        ax.set_ylim(bottom=0)
        return
    if low > 0:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    if low > 0:  # a few minor ticks labelled (2, 3, 5, ...) when few decades are shown
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                  minor_thresholds=(2, 0.5)))


def weights_figure(weights, title: str = ""):
    """A global GMM's component weights, sorted in descending order (log scale when they
    span more than a decade)."""
    require_matplotlib()
    fig = _figure("weights")
    ax = fig.add_subplot()
    values = [float(w) for w in weights]
    _sorted_plot(ax, values, bars=True, color="tab:blue")
    _log_y(ax, values)
    ax.set_xlabel("component (sorted by weight)")
    ax.set_ylabel("weight")
    ax.set_title(title or f"component weights ({len(values)} Gaussians)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def occupancy_figure(occupancy: dict[str, list[float]], title: str = ""):
    """Each Gaussian's occupancy (frames), sorted in descending order (log scale when they
    span more than a decade): bars for a global model, one line per word model
    otherwise."""
    require_matplotlib()
    fig = _figure("occupancy")
    ax = fig.add_subplot()
    labels = sorted(occupancy)
    every = [float(v) for lab in labels for v in occupancy[lab]]
    if labels == [GLOBAL_LABEL]:
        _sorted_plot(ax, occupancy[GLOBAL_LABEL], bars=True, color="tab:green")
    else:
        for label, style in zip(labels, _styles(len(labels)), strict=True):
            _sorted_plot(ax, occupancy[label], linewidth=1.2, label=label, **style)
        fig.legend(loc="outside right upper", fontsize=7, ncols=1 if len(labels) < 16 else 2,
                   title="model", title_fontsize=7)
    if every:
        _log_y(ax, every)
    ax.set_xlabel("Gaussian (sorted by occupancy)")
    ax.set_ylabel("occupancy (frames)")
    ax.set_title(title or "occupancy of each Gaussian, last iteration", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


# -- the plots of an exp dir -------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _last_occupancy(metrics: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    for record in reversed(metrics):
        occupancy = record.get("occupancy")
        if occupancy:
            return {str(k): list(v) for k, v in occupancy.items()}
    return None


def render_data(exp: ExpData) -> dict[str, bytes]:
    """:func:`render_plots` of an exp dir already read."""
    require_matplotlib()
    import matplotlib.style

    with matplotlib.style.context("default"):  # the same plots whatever the user's rc
        return _render(exp)


def _render(exp: ExpData) -> dict[str, bytes]:
    name = exp.path.resolve().name
    plots: dict[str, bytes] = {}

    def add(file_name: str, fig) -> None:
        plots[file_name] = figure_png(fig)
        fig.clear()

    if exp.metrics:
        add("loglike.png", loglike_figure(exp.metrics, f"{name}: training log-likelihood"))
    for decode in exp.decodes:
        if "confusion" in decode.results and decode.results.get("labels"):
            add(f"confusion_{_safe_name(decode.name)}.png",
                confusion_figure(decode.results, f"{name} {decode.name}"))
    if exp.is_global and exp.model_path is not None:
        model = exp.models.get(GLOBAL_LABEL) or next(iter(exp.models.values()), None)
        weights = getattr(model, "weights", None)
        if weights is not None:
            add("weights.png", weights_figure(
                weights, f"{name}: weights of {exp.model_path.name} "
                         f"({len(weights)} Gaussians)"))
    occupancy = _last_occupancy(exp.metrics)
    if occupancy:
        add("occupancy.png", occupancy_figure(
            occupancy, f"{name}: occupancy of each Gaussian, iteration "
                       f"{exp.metrics[-1]['iter']}"))
    return plots


def render_plots(exp_dir: str | os.PathLike) -> dict[str, bytes]:
    """The plots of an exp dir as PNG bytes keyed by file name (``loglike.png``,
    ``confusion_<decode dir>.png``, ``weights.png``, ``occupancy.png``; those the exp
    dir has data for), in that order. One-line :class:`UserError` s for a missing or
    empty exp dir and for a missing matplotlib."""
    exp = read_exp(exp_dir)
    return render_data(exp)


def write_plots(exp_dir: str | os.PathLike) -> list[Path]:
    """Write :func:`render_plots` into ``EXP_DIR/plots/`` (each file atomically) and
    return the paths written."""
    plots = render_plots(exp_dir)
    out_dir = Path(exp_dir) / "plots"
    written = []
    for file_name, data in plots.items():
        path = out_dir / file_name
        atomic_write_bytes(path, data)
        written.append(path)
    return written
