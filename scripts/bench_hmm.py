#!/usr/bin/env python
"""Benchmark one Baum-Welch iteration of emdist's GMM-HMMs (issue 10, point 5).

    python scripts/bench_hmm.py                         # the bundled digits, S = 5, K = 2 4
    python scripts/bench_hmm.py --data /work/scratch/real1m --json OUT.json
    python scripts/bench_hmm.py --quick --json OUT.json # digits, S = 3, K = 1: seconds

Targets (issue 10, point 5): one Baum-Welch iteration faster than hmmlearn on the same data
and model, one thread; and at most 3x a GMM iteration with the same total number of Gaussians.

For each data dir and each (S, K):

1. Training (CLI subprocesses, BLAS on one thread): ``emdist train --model hmm --num-states S
   --num-gauss K --cov C --num-iters I --workers 0`` and ``emdist train --model gmm
   --num-gauss S*K --cov C --num-iters I --workers 0`` (mix-up init, the CLI's defaults
   otherwise). Their ``final.mdl`` are the trained models of the rows below; the median
   ``seconds`` of iterations 2..I in ``EXP/metrics.jsonl`` is the CLI iteration (what the
   user waits for: E-step, reduction, M-step, model write). With ``--cli-workers 2`` the same
   two runs again with ``--workers 2 --short-pass 0`` (every pass on the 2-worker cluster).
2. In process, BLAS pinned to one thread (threadpoolctl), every frame loaded first (no I/O
   timed), laid out as the engine's feature cache does (per word, column-major float32;
   the HMM gets one piece per utterance, the GMM one piece per word), the models reloaded
   from ``final.mdl`` before each repeat (so kernels are built inside the timing, as in a
   CLI iteration):
   a. emdist HMM: ``hmm_kind.KIND.accumulate(models, pieces, EStepOptions("float32"))`` +
      ``KIND.update(stats, MStepOptions(), model)`` of every word;
   b. hmmlearn: per word a ``GMMHMM(n_components=S, n_mix=K, covariance_type=C,
      init_params="", params="stmcw", n_iter=1, tol=0, implementation=...)`` holding the same
      parameters (startprob = [1, 0, ...]; transmat = emdist's transitions without the exit
      column, the last row renormalised, as hmmlearn has no exit; a state with fewer than K
      Gaussians gets its heaviest one split into two identical halves, the same density),
      ``fit(X, lengths)`` on the word's frames in float64 (converted outside the timing);
      the sum over words, for ``implementation="log"`` and ``"scaling"``; compared with the
      faster. With ``--hmmlearn-frames N`` on a corpus larger than N frames, hmmlearn runs
      on each word's first utterances up to its share of N frames and its time is scaled by
      corpus frames / frames run (stated in the output).
   c. emdist GMM: ``gmm_kind.KIND.accumulate`` + ``KIND.update`` with the trained GMM of
      S*K Gaussians per word, float32 E-step products (the CLI's default).
   a and c run alternately (HMM, GMM, HMM, ...: both see the same load), at least
   --repeats times each and until each has --min-time seconds in all; hmmlearn runs
   --hmmlearn-repeats times. Best and median are reported; ratios are of the best times of
   the same run (the median ratios are in the JSON too).
3. Log-likelihood check: emdist's total of the iteration (with the exit transition) and
   hmmlearn's (``monitor_.history[-1]``) differ by the exit; emdist on the no-exit copy that
   hmmlearn holds must equal hmmlearn's (relative difference reported).
4. With ``--profile N``: cProfile of one emdist HMM accumulate (``accumulate_hmms``
   underneath), the top N functions by own time; and the seconds of its phases (emissions,
   padding, forward-backward, moments), re-enacted with emdist.models.hmm's private helpers.

To measure one commit while the working tree changes, run a copy of its package (the CLI
subprocesses inherit PYTHONPATH; run from outside the repo, or the working tree comes
first on sys.path): ``git archive COMMIT emdist | tar -x -C SRC; cd /tmp;
PYTHONPATH=SRC python /path/to/scripts/bench_hmm.py ...`` -- the JSON records which
package was measured (``environment.emdist_package``).

The JSON (--json) holds the environment (CPU model name and family from lscpu, BLAS, load
averages), the command line, every timing and the printed table.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
SCHEMA = "emdist-bench-hmm/1"
REAL_1M = Path("/work/scratch/real1m")
REAL_1M_FRAMES = 1_000_000
TARGET_HMMLEARN = 1.0  # hmmlearn seconds / emdist seconds must exceed this
TARGET_HMM_GMM = 3.0  # HMM iteration / GMM iteration must not exceed this
IMPLEMENTATIONS = ("log", "scaling")

_T0 = time.perf_counter()


def _load_bench():
    """scripts/bench.py as a module: its environment, BLAS and one-thread helpers."""
    spec = importlib.util.spec_from_file_location("emdist_bench", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def log(msg: str) -> None:
    print(f"bench_hmm: [{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr,
          flush=True)


def summary(seconds: list[float]) -> dict:
    return {"seconds": [round(s, 6) for s in seconds], "best": min(seconds),
            "median": float(statistics.median(seconds))}


# ---------------------------------------------------------------------------- data


def ensure_corpus(path: Path, frames: int) -> dict | None:
    """Make the real-MFCC corpus with scripts/make_real_corpus.py when ``path`` is missing."""
    if (path / "feats.scp").is_file():
        return None
    cmd = [sys.executable, str(SCRIPTS / "make_real_corpus.py"), str(path), "--frames",
           str(frames)]
    log(f"{path} is missing: {' '.join(cmd)}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {"command": cmd, "seconds": time.perf_counter() - t0}


class Corpus:
    """Every utterance of a labelled data dir in memory, as the engine's feature cache holds
    it: per word one column-major float32 array, each utterance a view of it."""

    def __init__(self, path: Path) -> None:
        from emdist.data.datadir import load_data_dir
        from emdist.tasks import read_utterance

        t0 = time.perf_counter()
        data = load_data_dir(path)
        by_label: dict[str, list[np.ndarray]] = {}
        for utt in data.utts:
            by_label.setdefault(utt.label, []).append(read_utterance(utt))
        self.path = path
        self.dim = data.dim
        self.labels = sorted(by_label)
        self.frames_by_label = {k: np.asfortranarray(np.concatenate(by_label[k]),
                                                     dtype=np.float32) for k in self.labels}
        self.lengths = {k: [len(u) for u in by_label[k]] for k in self.labels}
        self.utts = {k: _split(self.frames_by_label[k], self.lengths[k]) for k in self.labels}
        self.n_frames = sum(sum(v) for v in self.lengths.values())
        self.n_utts = sum(len(v) for v in self.lengths.values())
        self.load_seconds = time.perf_counter() - t0

    def hmm_pieces(self, limit: dict[str, int] | None = None) -> list[tuple[str, np.ndarray]]:
        """(label, utterance) pieces in cache order; ``limit``: first utterances per word."""
        return [(k, u) for k in self.labels
                for u in self.utts[k][: None if limit is None else limit[k]]]

    def gmm_pieces(self) -> list[tuple[str, np.ndarray]]:
        return [(k, self.frames_by_label[k]) for k in self.labels]

    def prefix(self, max_frames: int | None) -> dict[str, int]:
        """Utterances per word of the hmmlearn subset: each word's first utterances up to
        its share of ``max_frames`` (at least one); all of them when the corpus fits."""
        if not max_frames or max_frames >= self.n_frames:
            return {k: len(v) for k, v in self.lengths.items()}
        share = max_frames / self.n_frames
        out = {}
        for k, lengths in self.lengths.items():
            budget = share * sum(lengths)
            ends = np.cumsum(lengths)
            out[k] = max(1, int(np.searchsorted(ends, budget, side="right")))
        return out


def _split(frames: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    ends = np.cumsum(lengths)
    return [frames[e - n: e] for e, n in zip(ends, lengths, strict=True)]


# ---------------------------------------------------------------------------- CLI runs


def emdist_exe() -> str:
    exe = Path(sys.executable).with_name("emdist")
    return str(exe) if exe.exists() else (shutil.which("emdist") or "emdist")


def cli_train(data: Path, exp: Path, model: str, states: int, gauss: int, cov: str,
              iters: int, workers: int) -> dict:
    """One ``emdist train`` run (one BLAS thread); its per-iteration seconds."""
    cmd = [emdist_exe(), "train", str(data), str(exp), "--model", model, "--num-gauss",
           str(gauss), "--cov", cov, "--num-iters", str(iters), "--workers", str(workers),
           "--overwrite", "-q"]
    if model == "hmm":
        cmd += ["--num-states", str(states)]
    if workers:
        cmd += ["--short-pass", "0"]
    log(" ".join(cmd))
    load = os.getloadavg()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=bench.one_thread_env())
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    seconds = [float(r["seconds"]) for r in records]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return {"command": cmd, "env": bench.ONE_THREAD_ENV, "wall_seconds": wall,
            "loadavg_before": list(load), "iteration_seconds": seconds,
            "median_over": f"iterations {2 if len(seconds) > 1 else 1}..{len(seconds)}",
            "median": float(statistics.median(timed)), "best": min(timed),
            "loglike_per_frame": [r["loglike_per_frame"] for r in records],
            "frames": records[-1]["frames"] if records else None}


# ---------------------------------------------------------------------------- in process


def one_iteration(kind, model_file: Path, pieces, estep_options) -> tuple[float, dict]:
    """One in-process iteration (accumulate + update of every word) from the models of
    ``model_file`` (reloaded: kernels are built inside the timing); seconds and stats."""
    import emdist
    from emdist.models.mstep import MStepOptions

    models = emdist.load_models(model_file)
    t0 = time.perf_counter()
    stats = kind.accumulate(models, pieces, estep_options, False)
    new = {k: kind.update(s, MStepOptions(), models[k]) for k, s in stats.items()}
    seconds = time.perf_counter() - t0
    del new
    return seconds, stats


def time_emdist_pair(runs: dict, repeats: int, min_time: float, max_repeats: int) -> dict:
    """The HMM and GMM iterations of ``runs`` (name -> (kind, model file, pieces, E-step
    options)) timed alternately, so that both see the same machine load: at least
    ``repeats`` each, more while a figure has less than ``min_time`` seconds in all (at
    most ``max_repeats``)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    stats: dict[str, dict] = {}
    while True:
        for name, (kind, model_file, pieces, options) in runs.items():
            t, stats[name] = one_iteration(kind, model_file, pieces, options)
            seconds[name].append(t)
        n = len(next(iter(seconds.values())))
        if n >= max_repeats or (n >= repeats and all(sum(v) >= min_time
                                                     for v in seconds.values())):
            break
    out = {}
    for name in runs:
        loglike = float(sum(s.loglike for s in stats[name].values()))
        frames = int(sum(s.frames for s in stats[name].values()))
        out[name] = {**summary(seconds[name]), "loglike": loglike, "frames": frames,
                     "loglike_per_frame": loglike / max(frames, 1)}
    return out


def _padded_state(gmm, n_mix: int):
    """A state's weights, means and covariances with exactly ``n_mix`` Gaussians: the
    heaviest split into two identical halves until there are enough (the same density)."""
    w, mu, cov = (np.array(a, dtype=np.float64) for a in (gmm.weights, gmm.means,
                                                          gmm.covariances))
    while len(w) < n_mix:
        j = int(np.argmax(w))
        w[j] /= 2
        w, mu, cov = np.append(w, w[j]), np.vstack([mu, mu[j:j + 1]]), np.concatenate(
            [cov, cov[j:j + 1]])
    return w, mu, cov


def no_exit_transitions(model) -> np.ndarray:
    """hmmlearn's transition matrix of ``model``: the exit column dropped, rows renormalised
    (only the last state's row changes, its self-loop becoming 1 with no skip)."""
    s = model.n_states
    trans = np.array(model.transitions[:, :s], dtype=np.float64)
    return trans / trans.sum(axis=1, keepdims=True)


def hmmlearn_model(model, implementation: str):
    from hmmlearn import hmm

    s, n_mix = model.n_states, int(model.state_sizes.max())
    states = [_padded_state(g, n_mix) for g in model.states]
    ref = hmm.GMMHMM(n_components=s, n_mix=n_mix, covariance_type=model.covariance_type,
                     init_params="", params="stmcw", n_iter=1, tol=0.0,
                     implementation=implementation)
    ref.startprob_ = np.eye(s)[0]
    ref.transmat_ = no_exit_transitions(model)
    ref.weights_ = np.stack([w for w, _, _ in states])
    ref.means_ = np.stack([m for _, m, _ in states])
    ref.covars_ = np.stack([c for _, _, c in states])
    return ref, any(len(g.weights) < n_mix for g in model.states)


def time_hmmlearn(model_file: Path, corpus: Corpus, limit: dict[str, int],
                  implementation: str, repeats: int) -> dict:
    """``repeats`` hmmlearn iterations over every word (fit of n_iter=1 per word)."""
    import emdist

    data = {}
    for k in corpus.labels:
        utts = corpus.utts[k][: limit[k]]
        data[k] = (np.ascontiguousarray(np.concatenate(utts), dtype=np.float64),
                   [len(u) for u in utts])
    seconds, padded = [], False
    for _ in range(repeats):
        models = emdist.load_models(model_file)
        total, loglike = 0.0, 0.0
        for k in corpus.labels:
            ref, pad = hmmlearn_model(models[k], implementation)
            padded |= pad
            x, lengths = data[k]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                ref.fit(x, lengths)
                total += time.perf_counter() - t0
            loglike += float(ref.monitor_.history[-1])
        seconds.append(total)
    frames = sum(len(x) for x, _ in data.values())
    return {**summary(seconds), "loglike": loglike, "frames": frames,
            "loglike_per_frame": loglike / frames, "padded_states": padded}


def emdist_loglikes(model_file: Path, corpus: Corpus, limit: dict[str, int]) -> dict:
    """emdist's log-likelihood on hmmlearn's frames: with the exit, and under the no-exit
    copy hmmlearn holds (which must equal hmmlearn's)."""
    import emdist
    from emdist.models.hmm import HMM, accumulate_hmms

    models = emdist.load_models(model_file)
    utts = {k: corpus.utts[k][: limit[k]] for k in corpus.labels}
    with_exit = accumulate_hmms(models, utts)
    no_exit_models = {}
    for k, m in models.items():
        trans = np.zeros(m.transitions.shape)
        trans[:, : m.n_states] = no_exit_transitions(m)
        no_exit_models[k] = HMM(m.states, trans)
    no_exit = accumulate_hmms(no_exit_models, utts)
    return {"with_exit": float(sum(s.loglike for s in with_exit.values())),
            "no_exit": float(sum(s.loglike for s in no_exit.values())),
            "frames": int(sum(s.frames for s in with_exit.values()))}


def profile_hmm(model_file: Path, pieces, estep_options, top: int) -> dict:
    """cProfile of one emdist HMM accumulate (``accumulate_hmms``): the top functions."""
    import emdist
    from emdist.models import hmm_kind

    models = emdist.load_models(model_file)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    hmm_kind.KIND.accumulate(models, pieces, estep_options, False)
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        name = f"{Path(file).name}:{line}({func})" if line else func
        rows.append({"function": name, "ncalls": nc, "primitive_calls": cc,
                     "tottime": tt, "cumtime": ct})
    by_own = sorted(rows, key=lambda r: -r["tottime"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cumtime"])[:top]
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return {"wall_seconds_profiled": wall, "total_tt": st.total_tt, "by_tottime": by_own,
            "by_cumtime": by_cum, "text": text.getvalue()}


def hmm_phases(model_file: Path, corpus: Corpus) -> dict:
    """Seconds of the phases of one ``accumulate_hmms`` pass, re-enacted with its private
    helpers (emdist.models.hmm ``_plan``, ``_batches``, ``_Emissions``, ``_fb``): emissions
    (frames copied, expanded and centred, the Gaussians' scores, per-state log-emissions and
    within-state posteriors), forward-backward (compiled, over the batch's utterances laid
    end to end), and moments (the Gaussians' posteriors, the moments' products in float32,
    as ``--precision``'s default makes them). Also the batches and the utterances per
    batch. ``{"error": ...}`` if those helpers changed."""
    import emdist
    from emdist.models import hmm as H
    from emdist.models import hmm_kernels as HK

    try:
        models = emdist.load_models(model_file)
        phases = dict.fromkeys(("emissions", "forward_backward", "moments"), 0.0)
        batches = utts = 0
        emissions = H._Emissions()
        t_all = time.perf_counter()
        for label in corpus.labels:
            model = models[label]
            plan = H._plan(model)
            moments = np.zeros((plan.kernel.width, model.n_components))
            for batch in H._batches(corpus.utts[label], model.dim, H.DEFAULT_BATCH_FRAMES):
                t0 = time.perf_counter()
                n, bounds = emissions.load(plan, batch)
                t1 = time.perf_counter()
                b = len(batch)
                gamma = np.empty_like(emissions.log_b)
                per_utt, total = np.empty((b, *model.transitions.shape)), np.empty(b)
                H._fb(emissions.log_b, bounds, np.zeros(b, dtype=np.int64), plan.topology,
                      gamma, per_utt, total)
                t2 = time.perf_counter()
                weight = np.multiply(gamma.T, emissions.norm, out=emissions.norm)
                resp = np.empty(emissions.scores.shape, dtype=np.float32)  # --precision
                HK.weigh_by_state(emissions.scores, plan.owner, weight, resp)
                for start in range(0, n, H.DEFAULT_CHUNK_SIZE):
                    stop = min(start + H.DEFAULT_CHUNK_SIZE, n)
                    rows = emissions.rows(start, stop, np.float32)
                    moments += rows @ resp[:, start:stop].T
                t3 = time.perf_counter()
                phases["emissions"] += t1 - t0
                phases["forward_backward"] += t2 - t1
                phases["moments"] += t3 - t2
                batches += 1
                utts += b
        total = time.perf_counter() - t_all
    except (AttributeError, TypeError, ValueError) as err:  # the private helpers changed
        return {"error": f"{type(err).__name__}: {err}"}
    return {"seconds": phases, "total": total,
            "shares": {k: v / total for k, v in phases.items()}, "batches": batches,
            "utts_per_batch": utts / max(batches, 1),
            "batch_frames": H.DEFAULT_BATCH_FRAMES}


# ---------------------------------------------------------------------------- one config


def bench_config(args, corpus: Corpus, states: int, gauss: int, work: Path) -> dict:
    from threadpoolctl import threadpool_limits

    from emdist.models import gmm_kind, hmm_kind
    from emdist.models.estep import EStepOptions

    k_total = states * gauss
    name = f"{corpus.path.name}-S{states}-K{gauss}"
    out = {"corpus": str(corpus.path), "frames": corpus.n_frames, "utts": corpus.n_utts,
           "labels": corpus.labels, "states": states, "gauss": gauss, "k_total": k_total,
           "cov": args.cov, "loadavg_start": list(os.getloadavg()), "cli": {}}
    exps = {}
    for workers in args.cli_workers:
        runs = {}
        for model in ("hmm", "gmm"):
            exp = work / f"{name}-{model}-w{workers}"
            runs[model] = cli_train(corpus.path, exp, model, states,
                                    gauss if model == "hmm" else k_total, args.cov,
                                    args.train_iters, workers)
            exps.setdefault(model, exp / "final.mdl")
        runs["hmm_over_gmm"] = runs["hmm"]["median"] / runs["gmm"]["median"]
        runs["hmm_over_gmm_best"] = runs["hmm"]["best"] / runs["gmm"]["best"]
        out["cli"][f"workers{workers}"] = runs
    import emdist

    hmms, gmms = emdist.load_models(exps["hmm"]), emdist.load_models(exps["gmm"])
    out["models"] = {"hmm": {k: m.state_sizes.tolist() for k, m in hmms.items()},
                     "gmm": {k: m.n_components for k, m in gmms.items()},
                     "hmm_file": str(exps["hmm"]), "gmm_file": str(exps["gmm"])}
    f32 = EStepOptions(dtype="float32")
    with threadpool_limits(limits=1):
        log(f"{name}: emdist HMM and GMM (K = {k_total}) iterations, alternately, at least "
            f"x{args.repeats}")
        out.update(time_emdist_pair(
            {"emdist_hmm": (hmm_kind.KIND, exps["hmm"], corpus.hmm_pieces(), f32),
             "emdist_gmm": (gmm_kind.KIND, exps["gmm"], corpus.gmm_pieces(), f32)},
            args.repeats, args.min_time, args.max_repeats))
        for key in ("emdist_hmm", "emdist_gmm"):
            out[key]["frames_per_s"] = corpus.n_frames / out[key]["best"]
        if not args.skip_hmmlearn:
            out["hmmlearn"] = bench_hmmlearn(args, corpus, exps["hmm"], name)
        if args.profile:
            log(f"{name}: cProfile of the emdist HMM accumulate, and its phases")
            out["profile"] = profile_hmm(exps["hmm"], corpus.hmm_pieces(), f32, args.profile)
            out["profile"]["phases"] = hmm_phases(exps["hmm"], corpus)
    out["loadavg_end"] = list(os.getloadavg())
    out["ratios"] = ratios(out)
    return out


def bench_hmmlearn(args, corpus: Corpus, model_file: Path, name: str) -> dict:
    limit = corpus.prefix(args.hmmlearn_frames)
    sub_frames = sum(sum(corpus.lengths[k][: limit[k]]) for k in corpus.labels)
    scale = corpus.n_frames / sub_frames
    result = {"frames_run": sub_frames, "utts_run": sum(limit.values()),
              "scaled_by": scale, "whole_corpus": sub_frames == corpus.n_frames,
              "implementations": {}}
    if sub_frames < corpus.n_frames:
        result["note"] = (f"hmmlearn ran on {sub_frames} of {corpus.n_frames} frames (each "
                          f"word's first utterances, --hmmlearn-frames "
                          f"{args.hmmlearn_frames}); its seconds are scaled by {scale:.3f}")
    for impl in args.implementations:
        log(f"{name}: hmmlearn implementation={impl!r} on {sub_frames} frames "
            f"x{args.hmmlearn_repeats}")
        r = time_hmmlearn(model_file, corpus, limit, impl, args.hmmlearn_repeats)
        r["scaled_best"] = r["best"] * scale
        r["scaled_median"] = r["median"] * scale
        r["frames_per_s"] = sub_frames / r["best"]
        result["implementations"][impl] = r
    impls = result["implementations"]
    result["faster"] = min(impls, key=lambda i: impls[i]["best"])
    ll = emdist_loglikes(model_file, corpus, limit)
    ref = impls[result["faster"]]["loglike"]
    result["loglike_check"] = {
        "frames": ll["frames"], "hmmlearn": ref,
        "emdist_with_exit": ll["with_exit"], "emdist_no_exit": ll["no_exit"],
        "hmmlearn_per_frame": ref / ll["frames"],
        "emdist_with_exit_per_frame": ll["with_exit"] / ll["frames"],
        "with_exit_minus_hmmlearn_per_frame": (ll["with_exit"] - ref) / ll["frames"],
        "no_exit_rel_diff": abs(ll["no_exit"] - ref) / abs(ref),
        "implementations_rel_diff": (abs(impls["log"]["loglike"] - impls["scaling"]["loglike"])
                                     / abs(ref) if len(impls) == 2 else None),
    }
    return result


def ratios(out: dict) -> dict:
    hmm, gmm = out["emdist_hmm"], out["emdist_gmm"]
    r = {"hmm_over_gmm": hmm["best"] / gmm["best"],
         "hmm_over_gmm_median": hmm["median"] / gmm["median"]}
    if "hmmlearn" in out:
        hl = out["hmmlearn"]
        for impl, v in hl["implementations"].items():
            r[f"hmmlearn_{impl}_over_emdist"] = v["scaled_best"] / hmm["best"]
            r[f"hmmlearn_{impl}_over_emdist_median"] = v["scaled_median"] / hmm["median"]
        r["hmmlearn_over_emdist"] = r[f"hmmlearn_{hl['faster']}_over_emdist"]
    for key, runs in out["cli"].items():
        r[f"cli_{key}_hmm_over_gmm"] = runs["hmm_over_gmm"]
    return r


# ---------------------------------------------------------------------------- table


def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def _verdict(value, target, op) -> str:
    ok = value > target if op == ">" else value <= target
    return f"**{value:.2f}** {'met' if ok else 'NOT met'}"


def format_tables(report: dict) -> list[str]:
    lines = ["| corpus (frames) | S×K (GMM K) | emdist HMM iter s | GMM iter s | HMM/GMM "
             "(≤ 3) | hmmlearn log s | hmmlearn scaling s | hmmlearn/emdist (> 1) | "
             "HMM frames/s | hmmlearn frames/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        hmm, gmm, ra = r["emdist_hmm"], r["emdist_gmm"], r["ratios"]
        hl = r.get("hmmlearn")
        impl = (hl or {}).get("implementations", {})
        star = "" if not hl or hl["whole_corpus"] else "*"
        hl_cells = [(f"{_f(impl[i]['scaled_best'])}{star}" if i in impl else "-")
                    for i in IMPLEMENTATIONS]
        lines.append(
            f"| {Path(r['corpus']).name} ({r['frames']:,}) | {r['states']}×{r['gauss']} "
            f"({r['k_total']}) | {_f(hmm['best'])} (med {_f(hmm['median'])}) | "
            f"{_f(gmm['best'])} (med {_f(gmm['median'])}) | "
            f"{_verdict(ra['hmm_over_gmm'], TARGET_HMM_GMM, '<=')} | {hl_cells[0]} | "
            f"{hl_cells[1]} | "
            + (f"{_verdict(ra['hmmlearn_over_emdist'], TARGET_HMMLEARN, '>')} "
               f"(vs {hl['faster']}) | " if hl else "- | ")
            + f"{hmm['frames_per_s']:,.0f} | "
            + (f"{impl[hl['faster']]['frames_per_s']:,.0f} |" if hl else "- |"))
    lines += ["", "| corpus | S×K | CLI workers | HMM iter s (median) | GMM iter s (median) | "
              "HMM/GMM (≤ 3) |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        for key, runs in r["cli"].items():
            lines.append(
                f"| {Path(r['corpus']).name} | {r['states']}×{r['gauss']} | "
                f"{key.removeprefix('workers')} | {_f(runs['hmm']['median'])} | "
                f"{_f(runs['gmm']['median'])} | "
                f"{_verdict(runs['hmm_over_gmm'], TARGET_HMM_GMM, '<=')} |")
    checks = [r for r in report["results"] if "hmmlearn" in r]
    if checks:
        lines += ["", "| corpus | S×K | frames checked | emdist ll/frame (exit) | hmmlearn "
                  "ll/frame | difference/frame | emdist no-exit vs hmmlearn (rel) |",
                  "|---|---|---|---|---|---|---|"]
        for r in checks:
            c = r["hmmlearn"]["loglike_check"]
            lines.append(
                f"| {Path(r['corpus']).name} | {r['states']}×{r['gauss']} | "
                f"{c['frames']:,} | {c['emdist_with_exit_per_frame']:.4f} | "
                f"{c['hmmlearn_per_frame']:.4f} | "
                f"{c['with_exit_minus_hmmlearn_per_frame']:+.4f} | "
                f"{c['no_exit_rel_diff']:.1e} |")
    phased = [r for r in report["results"] if "seconds" in r.get("profile", {}).get(
        "phases", {})]
    if phased:
        lines += ["", "| corpus | S×K | emissions s | forward-backward s | moments s | "
                  "total s | batches | utterances / batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in phased:
            ph = r["profile"]["phases"]
            sec, sh = ph["seconds"], ph["shares"]
            cells = " | ".join(f"{sec[k]:.3f} ({100 * sh[k]:.0f} %)" for k in
                               ("emissions", "forward_backward", "moments"))
            lines.append(f"| {Path(r['corpus']).name} | {r['states']}×{r['gauss']} | {cells} "
                         f"| {ph['total']:.3f} | {ph['batches']:,} | "
                         f"{ph['utts_per_batch']:.1f} |")
    notes = [r["hmmlearn"]["note"] for r in checks if "note" in r["hmmlearn"]]
    if notes:
        lines += [""] + [f"\\* {Path(r['corpus']).name} {r['states']}×{r['gauss']}: "
                         f"{r['hmmlearn']['note']}" for r in checks
                         if "note" in r["hmmlearn"]]
    return lines


def header(report: dict) -> list[str]:
    env = report["environment"]
    cpu = env["cpu"]
    blas = env["blas"]["numpy_blas"] or {}
    cfg = report["config"]
    return [
        f"command: {' '.join(env['command'])}",
        f"CPU: {cpu.get('model')} (family {cpu.get('family')}, model "
        f"{cpu.get('model_number')}), {env['cpus_available']} cpus; BLAS "
        f"{blas.get('internal_api')} {blas.get('version')} ({blas.get('architecture')}), "
        "one thread",
        f"load average {env['loadavg_start'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end; elapsed {report['elapsed_s']:.0f} s",
        f"in process: best of >= {cfg['repeats']} repeats (emdist HMM and GMM alternately, "
        f"until {cfg['min_time']} s each; hmmlearn {cfg['hmmlearn_repeats']}), one BLAS "
        "thread, features in memory; ratios of best times taken in this run",
        f"CLI: median seconds of iterations 2..{cfg['train_iters']} of emdist train "
        f"--num-iters {cfg['train_iters']} (metrics.jsonl)",
    ]


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_hmm.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data", nargs="+", type=Path, help="labelled Kaldi data dirs (default: the bundled "
      f"digits train set); {REAL_1M} is made by scripts/make_real_corpus.py if missing")
    a("--states", nargs="+", type=int, help="emitting states per word (default 5; quick 3)")
    a("--gauss", nargs="+", type=int, help="Gaussians per state (default 2 4; quick 1)")
    a("--cov", choices=("diag", "full"), default="diag")
    a("--repeats", type=int, help="timed in-process iterations (default 3; quick 1)")
    a("--hmmlearn-repeats", type=int, help="timed hmmlearn iterations (default: --repeats)")
    a("--hmmlearn-frames", type=int, default=250_000,
      help="run hmmlearn on each word's first utterances up to this many frames in all and "
      "scale its time by frames (default 250000; 0: the whole corpus)")
    a("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
      help="hmmlearn implementations (default: log scaling)")
    a("--train-iters", type=int, help="Baum-Welch / EM iterations of each emdist train run "
      "(default 4; quick 2)")
    a("--cli-workers", nargs="+", type=int, help="--workers of the CLI runs (default 0 2; "
      "quick 0); the models timed in process come from the first")
    a("--real-frames", type=int, default=REAL_1M_FRAMES,
      help="frames of a missing --data dir made by make_real_corpus.py (1000000)")
    a("--min-time", type=float, help="repeat the emdist iterations until each has this "
      "many seconds in all (default 3; quick 0)")
    a("--max-repeats", type=int, default=30, help="at most this many emdist repeats (30)")
    a("--skip-hmmlearn", action="store_true")
    a("--profile", type=int, default=0, metavar="N",
      help="cProfile one emdist HMM accumulate per config; keep the top N functions")
    a("--json", default="-", help="JSON output file ('-': none, the default)")
    a("--workdir", help="where the exp dirs go (default: a temporary dir)")
    a("--keep", action="store_true", help="keep the exp dirs")
    a("--quick", action="store_true", help="digits, S = 3, K = 1, one repeat, 2 iterations")
    return p


QUICK = {"states": [3], "gauss": [1], "repeats": 1, "train_iters": 2, "cli_workers": [0],
         "min_time": 0.0}
FULL = {"states": [5], "gauss": [2, 4], "repeats": 3, "train_iters": 4, "cli_workers": [0, 2],
        "min_time": 3.0}


def resolve(args) -> argparse.Namespace:
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick or not args.data:  # quick: the digits only
        import emdist

        args.data = [Path(emdist.digits_dir("train"))]
    if args.hmmlearn_repeats is None:
        args.hmmlearn_repeats = args.repeats
    args.max_repeats = max(args.max_repeats, args.repeats)
    if min([args.repeats, args.hmmlearn_repeats, args.train_iters, *args.states,
            *args.gauss]) < 1:
        raise SystemExit("bench_hmm.py: error: sizes, repeats and iterations must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = resolve(build_parser().parse_args(argv))
    started = time.perf_counter()
    import hmmlearn  # noqa: F401  (its libraries show in the BLAS report)

    env = bench.environment([str(Path(__file__)), *argv])
    env["blas"] = bench.blas_info()
    env["versions"]["hmmlearn"] = hmmlearn.__version__
    import emdist

    env["emdist_package"] = str(Path(emdist.__file__).parent)  # which tree was measured
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH")
    report = {"schema": SCHEMA, "quick": args.quick, "environment": env,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "targets": {"hmmlearn_over_emdist": f"> {TARGET_HMMLEARN}",
                          "hmm_over_gmm": f"<= {TARGET_HMM_GMM}"},
              "corpora": {}, "results": []}
    report["config"]["data"] = [str(d) for d in args.data]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="emdist-bench-hmm-", dir=args.workdir))
    try:
        for path in args.data:
            made = ensure_corpus(path, args.real_frames)
            corpus = Corpus(path)
            log(f"{path}: {corpus.n_frames} frames, {corpus.n_utts} utterances, "
                f"{len(corpus.labels)} words, loaded in {corpus.load_seconds:.1f} s")
            report["corpora"][str(path)] = {"frames": corpus.n_frames, "utts": corpus.n_utts,
                                            "labels": corpus.labels, "made": made,
                                            "load_seconds": corpus.load_seconds}
            for s in args.states:
                for k in args.gauss:
                    report["results"].append(bench_config(args, corpus, s, k, work))
            del corpus
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.perf_counter() - started
    report["table"] = header(report) + [""] + format_tables(report)
    table = "\n".join(report["table"])
    for r in report["results"]:
        if "profile" in r:
            print(f"\ncProfile, {Path(r['corpus']).name} S={r['states']} K={r['gauss']}:\n"
                  f"{r['profile']['text']}")
    print(table)
    if args.json and args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=float) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
