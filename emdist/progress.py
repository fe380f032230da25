"""Progress of passes over the data: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("emdist")


class LineProgress:
    """One line per pass when stderr is not a terminal (logs, batch jobs)."""

    is_terminal = False

    def __init__(self) -> None:
        self._title, self._jobs, self._frames, self._done, self._t0 = "", 0, 0, 0, 0.0
        self.last_loglike: float | None = None  # the per-iteration line already says it

    def start(self, title: str, n_jobs: int, n_frames: int) -> None:
        self._title, self._jobs, self._frames, self._done = title, n_jobs, n_frames, 0
        self._t0 = time.monotonic()

    def advance(self, n_frames: int) -> None:
        self._done += 1

    def finish(self) -> None:
        seconds = max(time.monotonic() - self._t0, 1e-9)
        log.info("pass %s: %d / %d jobs, %d frames, %.0f frames/s", self._title, self._done,
                 self._jobs, self._frames, self._frames / seconds)


class BarProgress:
    """A rich progress bar per pass: jobs done, frames per second, elapsed time and ETA."""

    is_terminal = True

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console if console is not None else Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self._task = None
        self._frames = 0
        self._t0 = 0.0
        self.last_loglike: float | None = None

    def start(self, title: str, n_jobs: int, n_frames: int) -> None:
        desc = title if self.last_loglike is None else f"{title} (ll/frame {self.last_loglike:.4f})"
        self._progress.start()
        self._task = self._progress.add_task(desc, total=n_jobs, rate="")
        self._frames, self._t0 = 0, time.monotonic()

    def advance(self, n_frames: int) -> None:
        self._frames += n_frames
        rate = self._frames / max(time.monotonic() - self._t0, 1e-9)
        self._progress.update(self._task, advance=1, rate=f"{rate:,.0f} frames/s")

    def finish(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._progress.stop()


def summary_table(records: list[dict]):
    """The end-of-training table: per iteration, the log-likelihood per frame, its change,
    Gaussians, floored and removed, and time (a rich Table)."""
    from rich.table import Table

    table = Table(title="training", title_justify="left")
    for name in ("iter", "log-likelihood/frame", "change", "Gaussians", "floored", "removed",
                 "seconds"):
        table.add_column(name, justify="right")
    previous = None
    for r in records:
        ll = r["loglike_per_frame"]
        change = "" if previous is None else f"{ll - previous:+.4f}"
        table.add_row(str(r["iter"]), f"{ll:.4f}", change,
                      str(sum(r["n_components"].values())), str(r["floored"]),
                      str(r["removed"]), f"{r['seconds']:.2f}")
        previous = ll
    return table


def make_progress(quiet: bool):
    """A bar on a terminal, lines otherwise, nothing with ``quiet``."""
    if quiet:
        return None
    return BarProgress() if sys.stderr.isatty() else LineProgress()
