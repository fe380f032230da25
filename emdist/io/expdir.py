"""The Kaldi-style experiment directory.

::

    EXP_DIR/
      config.json          resolved training options (compared on resume)
      num_jobs             number of shards (Kaldi's nj)
      0.mdl ... N.mdl      models after each iteration (0.mdl: the initial model)
      final.mdl            copy of the last model
      metrics.jsonl        one JSON record per iteration
      log/init.P.JOB.log   jobs of initialisation pass P (k-means or mix-up)
      log/init.P.log       update of initialisation pass P
      log/acc.I.JOB.log    E-step job JOB on I.mdl
      log/update.I.log     M-step from I.mdl's statistics to I+1.mdl
      decode_<data>/results.json   written by ``emdist test``
      kaldi/<label>/I.acc  Kaldi accumulators of I.mdl's statistics (--write-kaldi-accs)
      kaldi/<label>/final.mdl  the final GMM as a Kaldi model file (--write-kaldi-model)

Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from emdist.errors import UserError, WriteFailure
from emdist.io.modelio import atomic_write_bytes, atomic_write_text, load_models, save_models
from emdist.models.gmm import GMM
from emdist.tasks import JobReport

_MODEL_RE = re.compile(r"^(\d+)\.mdl$")


def _stamp(t: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S %Z %Y", time.localtime(t))


def check_file_label(label: str, directory: str | Path) -> None:
    """A model's label names a file or directory in ``directory`` (``kaldi/<label>/``,
    ``export --all DIR``): no path separator, NUL, ``.`` or ``..``; UserError otherwise."""
    if label in (".", "..") or "/" in label or "\\" in label or "\0" in label:
        raise UserError(f"label {label!r} cannot name a file in {directory}")


class ExpDir:
    """Paths and atomic writers of one experiment directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.log_dir = self.path / "log"

    def model_path(self, i: int | str) -> Path:
        return self.path / f"{i}.mdl"

    @property
    def final(self) -> Path:
        return self.model_path("final")

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def model_numbers(self) -> list[int]:
        if not self.path.is_dir():
            return []
        found = (_MODEL_RE.match(p.name) for p in self.path.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save_model(self, i: int | str, models: Mapping[str, GMM]) -> None:
        save_models(self.model_path(i), models)

    def load_model(self, i: int | str) -> dict[str, GMM]:
        return load_models(self.model_path(i))

    def write_final(self, i: int) -> None:
        atomic_write_bytes(self.final, self.model_path(i).read_bytes())

    # -- Kaldi's files, for a Kaldi recipe to take over -----------------------------------

    @property
    def kaldi_dir(self) -> Path:
        return self.path / "kaldi"

    def kaldi_path(self, label: str, name: str) -> Path:
        """``kaldi/<label>/<name>``: one directory per model, as Kaldi files hold one GMM."""
        return self.kaldi_dir / label / name

    def write_kaldi_accs(self, i: int, stats: Mapping, binary: bool = True) -> None:
        """Each model's statistics from ``i``.mdl as Kaldi accumulators (float32, as
        ``gmm-global-acc-stats`` and ``gmm-global-sum-accs`` write them)."""
        from emdist.io.kaldi import write_kaldi_accs

        for label, s in sorted(stats.items()):
            self._kaldi_label_dir(label)
            write_kaldi_accs(self.kaldi_path(label, f"{i}.acc"), s, binary=binary)

    def write_kaldi_models(self, name: str, models: Mapping[str, GMM], binary: bool = True) -> None:
        """Each model as a Kaldi ``<DiagGMM>``/``<FullGMM>`` file ``kaldi/<label>/<name>.mdl``."""
        from emdist.io.kaldi import write_kaldi_model

        for label, gmm in sorted(models.items()):
            self._kaldi_label_dir(label)
            write_kaldi_model(self.kaldi_path(label, f"{name}.mdl"), gmm, binary=binary)

    def _kaldi_label_dir(self, label: str) -> None:
        check_file_label(label, self.kaldi_dir)
        try:
            (self.kaldi_dir / label).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteFailure(exc.filename or self.kaldi_dir, exc.strerror or str(exc)) from None

    # -- configuration and resume -------------------------------------------------------

    def read_config(self) -> dict | None:
        if not self.config_path.exists():
            return None
        return json.loads(self.config_path.read_text())

    def prepare(self, config: dict, overwrite: bool) -> None:
        """Create the directory, or check that it holds a run with the same options.

        With ``overwrite``, what an earlier run wrote (models, logs, metrics) is removed
        first; without it, a directory holding a run with other options is refused and one
        with the same options is resumed.
        """
        self.check_path()
        old = self.read_config()
        if overwrite:
            self.clear()
        elif old is not None and old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise UserError(
                f"{self.path} holds a run with other training options "
                f"({', '.join(changed)}); use another exp dir or --overwrite"
            )
        elif old is None and self.model_numbers():
            raise UserError(
                f"{self.path} holds models but no config.json; use another exp dir or --overwrite"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(exist_ok=True)
        except OSError as exc:  # a read-only or full file system, no permission
            raise WriteFailure(exc.filename or self.path, exc.strerror or str(exc)) from None
        for stale in [*self.path.glob(".*.tmp"), *self.log_dir.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)  # left by a killed run; never under a final name
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def kept(self, fix: str = "free space (or fix the permissions)") -> str:
        """What a failed run leaves intact, and how to go on (for its error): ``fix``, then
        rerun the same command."""
        numbers = self.model_numbers()
        if not numbers:
            return f"no model was written yet; {fix}, then rerun the same command"
        return (f"the last complete model, {self.model_path(numbers[-1])}, is intact; {fix}, "
                "then rerun the same command to continue")

    def check_path(self) -> None:
        """The exp dir is a directory, or can be made: a file in the way is a user error."""
        for path in (self.path, *self.path.absolute().parents):
            if path.exists():
                if not path.is_dir():
                    inside = "" if path == self.path else f" (on the way to {self.path})"
                    raise UserError(f"{path}{inside} is a file, not a directory; give EXP_DIR "
                                    "a directory (it is created if missing)")
                return

    def clear(self) -> None:
        """Remove what a training run writes (models, logs, metrics, config)."""
        for i in self.model_numbers():
            self.model_path(i).unlink()
        for p in (self.final, self.metrics_path, self.config_path, self.path / "num_jobs"):
            p.unlink(missing_ok=True)
        for d in (self.log_dir, self.kaldi_dir):
            if d.is_dir():
                shutil.rmtree(d)

    def drop_models_after(self, i: int) -> None:
        """Forget models and records after ``i`` (``--stage i`` restarts from ``i.mdl``)."""
        for n in self.model_numbers():
            if n > i:
                self.model_path(n).unlink()
        self.final.unlink(missing_ok=True)
        for final in self.kaldi_dir.glob("*/final.mdl"):
            final.unlink()
        self.write_metrics([r for r in self.read_metrics() if r["iter"] <= i])

    # -- records and logs -------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def write_metrics(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.metrics_path, text)

    def job_log_path(self, stage: str, i: int, job: int) -> Path:
        return self.log_dir / f"{stage}.{i}.{job}.log"

    def write_job_log(self, stage: str, i: int, command: str, report: JobReport) -> None:
        """A run.pl-style log of one job: command, host, start, body, accounting, end."""
        body = [
            f"# {command}",
            f"# Started at {_stamp(report.start)} on {report.host} (pid {report.pid})",
            f"# job {report.job}: {report.utts} utterances, {report.frames} frames",
            *report.lines,
            f"log-likelihood per frame {report.loglike / max(report.frames, 1):.6f} over "
            f"{report.frames} frames",
            f"# Accounting: time={report.end - report.start:.0f} threads=1",
            f"# Ended (code 0) at {_stamp(report.end)}, elapsed time "
            f"{report.end - report.start:.0f} seconds",
        ]
        atomic_write_text(self.job_log_path(stage, i, report.job), "\n".join(body) + "\n")

    def write_failed_log(self, stage: str, i: int, job: int, command: str, error: str) -> Path:
        path = self.job_log_path(stage, i, job)
        now = time.time()
        text = (
            f"# {command}\n# Started at {_stamp(now)}\n{error.rstrip()}\n"
            f"# Accounting: time=0 threads=1\n# Ended (code 1) at {_stamp(now)}, "
            "elapsed time 0 seconds\n"
        )
        atomic_write_text(path, text)
        return path

    def write_update_log(self, name: str, command: str, lines: Iterable[str]) -> None:
        now = time.time()
        text = "\n".join([f"# {command}", f"# Started at {_stamp(now)}", *lines,
                          f"# Ended (code 0) at {_stamp(time.time())}"])
        atomic_write_text(self.log_dir / name, text + "\n")
