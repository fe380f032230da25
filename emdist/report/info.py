"""``emdist info``: what a model file or an exp dir holds, as one plain dict.

:func:`describe` reads a model file (emdist's, or a Kaldi model file) or an exp dir (its
``config.json``, ``metrics.jsonl``, ``final.mdl`` or last ``N.mdl``, and every
``decode_*/results.json``) and returns JSON-ready values; the CLI prints them as tables or
as JSON. Nothing here trains or scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from emdist.errors import UserError
from emdist.io.expdir import ExpDir
from emdist.io.kaldi import kaldi_file_kind
from emdist.io.modelio import load_models


def describe_models(path: str | os.PathLike) -> dict:
    """Kind, covariance type, dimension and Gaussians per label of a model file."""
    path = Path(path)
    models = load_models(path)
    first = next(iter(models.values()))
    kind = type(first).kind
    out: dict = {
        "path": str(path),
        "file_format": "kaldi" if kaldi_file_kind(path) == "model" else "emdist",
        "kind": kind,
        "covariance_type": getattr(first, "covariance_type", None),
        "dim": first.dim,
        "labels": sorted(models),
        "components": {label: int(m.n_components) for label, m in sorted(models.items())},
    }
    if kind == "hmm":
        out["states"] = {label: int(m.n_states) for label, m in sorted(models.items())}
    out["total_components"] = sum(out["components"].values())
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _results(exp: Path) -> list[dict]:
    out = []
    for results in sorted(exp.glob("decode_*/results.json")):
        r = _read_json(results)
        entry = {"decode": results.parent.name}
        for key in ("error_rate", "accuracy", "n_errors", "n_utts", "loglike_per_frame",
                    "n_frames"):
            if key in r:
                entry[key] = r[key]
        out.append(entry)
    return out


def describe_exp(path: str | os.PathLike) -> dict:
    """The model, the training (iterations, final log-likelihood, time) and the latest
    results of an exp dir."""
    exp = ExpDir(path)
    if not exp.path.is_dir():
        raise UserError(f"{exp.path}: no such exp dir or model file")
    config = _read_json(exp.config_path) if exp.config_path.is_file() else None
    records = exp.read_metrics()
    numbers = exp.model_numbers()
    model_path = exp.final if exp.final.is_file() else \
        (exp.model_path(numbers[-1]) if numbers else None)
    if config is None and model_path is None:
        raise UserError(f"{exp.path}: holds no model and no config.json; is it an exp dir? "
                        "(run emdist train first)")
    training: dict = {"iterations": len(records), "complete": exp.final.is_file()}
    if config is not None:
        training["num_iters"] = config.get("num_iters")
        keys = ["model", "num_gauss", "covariance_type", "init", "global_mode", "nj", "seed"]
        if config.get("model") == "hmm":
            keys.append("num_states")
        training["config"] = {k: config[k] for k in keys if k in config}
    if records:
        last = records[-1]
        training["final_loglike_per_frame"] = last["loglike_per_frame"]
        training["frames"] = last["frames"]
        training["seconds"] = round(sum(r.get("seconds", 0.0) for r in records), 3)
        training["floored"] = sum(r.get("floored", 0) for r in records)
        training["removed"] = sum(r.get("removed", 0) for r in records)
    return {
        "path": str(exp.path),
        "model": describe_models(model_path) if model_path is not None else None,
        "training": training,
        "results": _results(exp.path),
    }


def describe(path: str | os.PathLike) -> dict:
    """:func:`describe_exp` for a directory, :func:`describe_models` wrapped the same way
    for a model file."""
    path = Path(path)
    if path.is_dir():
        return {"type": "exp_dir", **describe_exp(path)}
    if not path.exists():
        raise UserError(f"{path}: no such exp dir or model file")
    return {"type": "model", "path": str(path), "model": describe_models(path)}
