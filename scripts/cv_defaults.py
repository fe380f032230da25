#!/usr/bin/env python
"""Choose the word recognizer's defaults on the training set: k-fold cross-validation by
speaker (no speaker in both the training and the held-out part of a fold).

    python scripts/cv_defaults.py [DATA_DIR] [--model gmm hmm kmeans] [--folds 5]
        [--seeds 0 1 2] [--num-gauss 1 2 3 4 6 8] [--num-states 5] [--cov diag full]
        [--init mixup kmeans] [--num-iters 10] [--speaker-prefix 2] [--json out.json]
        [--quick]

DATA_DIR (default: the bundled digits train set) needs ``text``; speakers come from its
``utt2spk``, or, where it has none (the bundled digits), from the first ``--speaker-prefix``
characters of the utterance ids (TI digits ids start with the speaker's initials: ``AE1A``
is speaker AE saying 1, take A). Speakers are dealt to the folds in sorted order, round
robin. For every configuration and seed, each fold trains one model per word (a GMM, a
GMM-HMM of ``--num-states`` states with ``--num-gauss`` Gaussians each, or a k-means
codebook) on the other folds (``emdist.train``, in process, as ``emdist train`` would with
those options) and
recognises the held-out fold; the error rate of a configuration is its errors over all
held-out utterances, averaged over seeds. The test set is never read.

Prints a table sorted by cross-validated error (ties: fewer parameters, then less time) and
writes every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


def speaker_folds(data, folds: int, prefix: int) -> list[set[str]]:
    """Utterance ids of each fold, speakers dealt round robin in sorted order."""
    spk = data.utt2spk or {u.utt_id: u.utt_id[:prefix] for u in data.utts}
    speakers = sorted({spk[u.utt_id] for u in data.utts})
    if len(speakers) < folds:
        raise SystemExit(f"{len(speakers)} speakers cannot make {folds} folds")
    fold_of = {s: i % folds for i, s in enumerate(speakers)}
    out: list[set[str]] = [set() for _ in range(folds)]
    for u in data.utts:
        out[fold_of[spk[u.utt_id]]].add(u.utt_id)
    return out


def n_params(k: int, cov: str, dim: int, model: str = "gmm", states: int = 1) -> int:
    """Free parameters per word: a codebook's centres; a GMM's weights, means and
    covariances; an HMM's state GMMs plus its self-loop probabilities."""
    if model == "kmeans":
        return k * dim
    per = dim + (dim if cov == "diag" else dim * (dim + 1) // 2)
    gmm = k * (per + 1) - 1
    return gmm if model == "gmm" else states * (gmm + 1)


def cross_validate(data, configs, seeds, folds: int, prefix: int) -> list[dict]:
    from emdist import SerialBackend, TrainConfig, evaluate, train

    parts = speaker_folds(data, folds, prefix)
    rows = []
    for model, states, k, cov, init, iters in configs:
        errors, seconds = [], 0.0
        for seed in seeds:
            wrong = total = 0
            for held in parts:
                train_part = replace(data, utts=tuple(u for u in data.utts
                                                      if u.utt_id not in held))
                test_part = replace(data, utts=tuple(u for u in data.utts if u.utt_id in held))
                config = TrainConfig(model=model, num_states=states, num_gauss=k,
                                     covariance_type=cov, init=init, num_iters=iters,
                                     seed=seed)
                t0 = time.perf_counter()
                models = train(train_part, config, SerialBackend())
                seconds += time.perf_counter() - t0
                result = evaluate(models, test_part, SerialBackend())
                wrong += result.n_errors
                total += result.n_utts
            errors.append(wrong / total)
        rows.append({"model": model, "num_states": states, "num_gauss": k, "cov": cov,
                     "init": init, "num_iters": iters,
                     "cv_error": statistics.mean(errors), "per_seed": errors,
                     "params_per_word": n_params(k, cov, data.dim, model, states),
                     "train_seconds": seconds / (len(seeds) * folds)})
        print(f"{model} S={states} K={k} {cov} {init} iters={iters}: CV error "
              f"{100 * rows[-1]['cv_error']:.2f} % "
              f"(seeds {', '.join(f'{100 * e:.2f}' for e in errors)})", file=sys.stderr,
              flush=True)
    rows.sort(key=lambda r: (r["cv_error"], r["params_per_word"], r["train_seconds"]))
    return rows


KEY = ("model", "num_states", "num_gauss", "cov", "init", "num_iters")


def table(rows: list[dict], defaults: list[tuple]) -> str:
    lines = ["| rank | --model | --num-states | --num-gauss | --cov | --init | --num-iters | "
             "CV error % | per seed % | s per training |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rank, r in enumerate(rows, 1):
        mark = " (default)" if tuple(r[k] for k in KEY) in defaults else ""
        states = r["num_states"] if r["model"] == "hmm" else ""
        lines.append(f"| {rank} | {r['model']}{mark} | {states} | {r['num_gauss']} | "
                     f"{r['cov']} | {r['init']} | "
                     f"{r['num_iters']} | {100 * r['cv_error']:.2f} | "
                     f"{' / '.join(f'{100 * e:.1f}' for e in r['per_seed'])} | "
                     f"{r['train_seconds']:.2f} |")
    return "\n".join(lines)


def default_of(model: str) -> dict:
    """The options ``emdist train --model MODEL`` uses by default."""
    from emdist.engine.config import TrainConfig, kind_defaults

    d = TrainConfig(model=model, **kind_defaults(model))
    return {"model": model, "num_states": d.num_states, "num_gauss": d.num_gauss,
            "cov": d.covariance_type, "init": d.init, "num_iters": d.num_iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path)
    parser.add_argument("--model", nargs="+", default=["gmm"], choices=["gmm", "hmm", "kmeans"])
    parser.add_argument("--num-states", type=int, nargs="+", default=[5])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-gauss", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--cov", nargs="+", default=["diag", "full"])
    parser.add_argument("--init", nargs="+", default=["mixup", "kmeans"])
    parser.add_argument("--num-iters", type=int, nargs="+", default=[10])
    parser.add_argument("--speaker-prefix", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="2 folds, seed 0, K in {2, 4}, full, mixup (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.folds, args.seeds, args.num_gauss = 2, [0], [2, 4]
        args.cov, args.init, args.num_iters = ["full"], ["mixup"], [5]

    from emdist import digits_dir, load_data_dir

    data = load_data_dir(args.data_dir or digits_dir("train"))
    configs = []
    for model in args.model:
        states = args.num_states if model == "hmm" else [args.num_states[0]]
        inits = ["mixup"] if model == "hmm" else args.init
        covs = ["diag"] if model == "kmeans" else args.cov
        configs += itertools.product([model], states, args.num_gauss, covs, inits,
                                     args.num_iters)
    t0 = time.perf_counter()
    rows = cross_validate(data, configs, args.seeds, args.folds, args.speaker_prefix)
    defaults = [tuple(r[k] for k in KEY) for r in map(default_of, ("gmm", "hmm", "kmeans"))]
    result = {
        "data_dir": str(data.path), "utterances": len(data.utts), "folds": args.folds,
        "seeds": args.seeds, "speakers": "utt2spk" if data.utt2spk else
        f"first {args.speaker_prefix} characters of the utterance id",
        "defaults": [default_of(m) for m in args.model],
        "seconds": time.perf_counter() - t0, "rows": rows,
    }
    print(table(rows, defaults))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
