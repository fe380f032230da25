"""Plots and a self-contained HTML report of an exp dir (matplotlib is optional).

:func:`write_plots` writes ``EXP_DIR/plots/*.png``, :func:`render_plots` returns them as
PNG bytes, :func:`write_report` writes ``EXP_DIR/report.html`` (one file, images embedded).
Importing this package never imports matplotlib.
"""

from __future__ import annotations

from emdist.report.html import build_report, write_report
from emdist.report.plots import (
    MATPLOTLIB_NOTE,
    PLOT_SIZES,
    read_exp,
    render_plots,
    require_matplotlib,
    write_plots,
)

__all__ = ["MATPLOTLIB_NOTE", "PLOT_SIZES", "build_report", "read_exp", "render_plots",
           "require_matplotlib", "write_plots", "write_report"]
