#!/usr/bin/env python
"""Write a synthetic Kaldi data dir of any size, sampled from a known GMM.

For scale tests and benchmarks of emdist: the corpus is generated and written one
utterance at a time, so memory stays bounded (a few MB) whatever --frames is.

    python scripts/make_corpus.py OUT_DIR --frames 20000000 [--dim 39] [--num-gauss 8]
        [--cov diag|full] [--frames-per-utt 300] [--utts-per-ark 2000] [--labels 0]
        [--seed 0] [--separation 6.0] [--dtype float32] [--overwrite]

Layout written to OUT_DIR:

    data/feats.1.ark, data/feats.2.ark, ...   binary Kaldi arks (FM for float32, DM for
                                              float64), a new ark every --utts-per-ark utts
    feats.scp                                 utt -> ABSOLUTE ark path:offset, C-sorted
    utt2num_frames                            utt -> number of frames
    utt2spk                                   utt -> utt (one speaker per utterance)
    text                                      utt -> w{i % L}   (only with --labels L > 0)
    truth.json                                the true model(s), written last, atomically

The true model: K components with weights ~ Dirichlet(5, ..., 5), means ~ N(0, separation^2)
per dimension, and variances uniform in [0.5, 2] (diag) or a random SPD covariance with
eigenvalues log-uniform in [0.25, 4] (full; condition number <= 16). Without labels there
is one model, "global", drawn from numpy.random.default_rng(seed). With --labels L, label
w{i} has its own model drawn from default_rng(seed + i) and utterance n (0-based) belongs
to label w{n % L}. Utterance lengths are uniform in [0.5, 1.5] x --frames-per-utt (at least
1), the last one trimmed so the total is exactly --frames; every frame picks its component
by weight independently. Lengths and frames come from default_rng([seed, 0xDA7A]).

Standalone on purpose (argparse + numpy + kaldiio): it must not import emdist.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import kaldiio
import numpy as np

DIRICHLET_ALPHA = 5.0
DIAG_VAR_RANGE = (0.5, 2.0)
FULL_EIG_RANGE = (0.25, 4.0)  # condition number <= 16
DATA_STREAM = 0xDA7A
TEXT_FILES = ("feats.scp", "utt2num_frames", "utt2spk", "text")
PROG = "make_corpus.py"


class UsageError(Exception):
    """A bad option; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Write a synthetic Kaldi data dir sampled from a known GMM.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="data dir to create")
    p.add_argument("--frames", type=int, required=True, help="total number of frames")
    p.add_argument("--dim", type=int, default=39, help="feature dimension (default 39)")
    p.add_argument("--num-gauss", type=int, default=8, help="components per GMM (default 8)")
    p.add_argument("--cov", choices=("diag", "full"), default="diag", help="covariance type")
    p.add_argument(
        "--frames-per-utt",
        type=int,
        default=300,
        help="mean utterance length; lengths uniform in [0.5x, 1.5x] (default 300)",
    )
    p.add_argument(
        "--utts-per-ark", type=int, default=2000, help="utterances per ark file (default 2000)"
    )
    p.add_argument(
        "--labels",
        type=int,
        default=0,
        help="number of labels w0..w{L-1}, one true GMM each (default 0: no text)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--separation",
        type=float,
        default=6.0,
        help="std of the component means per dimension (default 6.0)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="matrix type in the arks: float32 -> FM, float64 -> DM",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty OUT_DIR (previous corpus files are removed)",
    )
    return p


def check_args(a: argparse.Namespace) -> None:
    for name in ("frames", "dim", "num_gauss", "frames_per_utt", "utts_per_ark"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if a.labels < 0:
        raise UsageError("--labels must be >= 0")
    if a.seed < 0:
        raise UsageError("--seed must be >= 0")
    if not (math.isfinite(a.separation) and a.separation >= 0):
        raise UsageError("--separation must be a finite number >= 0")
    if os.path.exists(a.out_dir):
        if not os.path.isdir(a.out_dir):
            raise UsageError(f"OUT_DIR {a.out_dir!r} exists and is not a directory")
        if os.listdir(a.out_dir) and not a.overwrite:
            raise UsageError(f"OUT_DIR {a.out_dir!r} is not empty (use --overwrite)")


# ---------------------------------------------------------------------------- true model


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    """Random SPD matrix: random rotation, eigenvalues log-uniform in FULL_EIG_RANGE."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # Haar-distributed rotation
    lo, hi = np.log(FULL_EIG_RANGE[0]), np.log(FULL_EIG_RANGE[1])
    eig = np.exp(rng.uniform(lo, hi, size=dim))
    cov = (q * eig) @ q.T
    return (cov + cov.T) / 2.0


def make_model(seed: int, dim: int, num_gauss: int, cov: str, separation: float) -> dict:
    """The true GMM, as float64 arrays: weights (K,), means (K,D), covariances."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_gauss, DIRICHLET_ALPHA))
    means = rng.normal(0.0, separation, size=(num_gauss, dim))
    if cov == "diag":
        covs = rng.uniform(*DIAG_VAR_RANGE, size=(num_gauss, dim))
    else:
        covs = np.stack([random_spd(rng, dim) for _ in range(num_gauss)])
    return {"weights": weights, "means": means, "covariances": covs}


class Sampler:
    """Draws frames of one GMM with batched numpy."""

    def __init__(self, model: dict, cov: str, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.full = cov == "full"
        w = model["weights"]
        self.num_gauss = len(w)
        cdf = np.cumsum(w)
        self.cdf = cdf / cdf[-1]
        self.means = model["means"].astype(self.dtype)
        if self.full:
            self.chol_t = np.linalg.cholesky(model["covariances"]).transpose(0, 2, 1)
            self.chol_t = np.ascontiguousarray(self.chol_t, dtype=self.dtype)
        else:
            self.std = np.sqrt(model["covariances"]).astype(self.dtype)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = np.searchsorted(self.cdf, rng.random(n), side="right")
        np.minimum(ids, self.num_gauss - 1, out=ids)
        z = rng.standard_normal((n, self.means.shape[1]), dtype=self.dtype)
        if not self.full:
            z *= self.std[ids]
            z += self.means[ids]
            return z
        out = np.empty_like(z)
        order = np.argsort(ids, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(ids, minlength=self.num_gauss))))
        for k in range(self.num_gauss):
            rows = order[bounds[k] : bounds[k + 1]]
            if len(rows):
                out[rows] = z[rows] @ self.chol_t[k] + self.means[k]
        return out


# ---------------------------------------------------------------------------- output


def clean_out_dir(out_dir: str) -> None:
    """With --overwrite: remove only the files a previous run of this script wrote."""
    victims = glob.glob(os.path.join(out_dir, "data", "feats.*.ark"))
    victims += [os.path.join(out_dir, f) for f in (*TEXT_FILES, "truth.json")]
    victims += glob.glob(os.path.join(out_dir, ".*.tmp"))
    for path in victims:
        if os.path.isfile(path):
            os.remove(path)


def write_json_atomic(path: str, obj) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def generate(a: argparse.Namespace) -> dict:
    out_dir = os.path.abspath(a.out_dir)
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    if a.overwrite:
        clean_out_dir(out_dir)

    names = [f"w{i}" for i in range(a.labels)] if a.labels else ["global"]
    models = [
        make_model(a.seed + i, a.dim, a.num_gauss, a.cov, a.separation) for i in range(len(names))
    ]
    samplers = [Sampler(m, a.cov, np.dtype(a.dtype)) for m in models]
    rng = np.random.default_rng([a.seed, DATA_STREAM])

    fpu = a.frames_per_utt
    min_len = max(1, int(0.5 * fpu))
    max_len = max(min_len, int(round(1.5 * fpu)))
    max_utts = -(-a.frames // min_len)  # upper bound, fixes the zero-padding width
    width = max(7, len(str(max_utts - 1)))

    tmp = {name: os.path.join(out_dir, f".{name}.tmp") for name in TEXT_FILES}
    wanted = TEXT_FILES if a.labels else TEXT_FILES[:-1]
    fds = {name: open(tmp[name], "w", encoding="utf-8", newline="\n") for name in wanted}
    ark_fd = None
    ark_paths = []
    t0 = time.perf_counter()
    step = max(1, a.frames // 20)
    next_report = step
    done = utt = 0
    try:
        while done < a.frames:
            if utt % a.utts_per_ark == 0:
                if ark_fd is not None:
                    ark_fd.close()
                ark_paths.append(os.path.join(data_dir, f"feats.{len(ark_paths) + 1}.ark"))
                ark_fd = open(ark_paths[-1], "wb")
            n = min(int(rng.integers(min_len, max_len + 1)), a.frames - done)
            label = utt % len(samplers)
            feats = samplers[label].sample(rng, n)
            uid = f"utt{utt:0{width}d}"
            kaldiio.save_ark(ark_fd, {uid: feats}, scp=fds["feats.scp"], append=True)
            fds["utt2num_frames"].write(f"{uid} {n}\n")
            fds["utt2spk"].write(f"{uid} {uid}\n")
            if a.labels:
                fds["text"].write(f"{uid} {names[label]}\n")
            done += n
            utt += 1
            if done >= next_report and done < a.frames:
                dt = time.perf_counter() - t0
                log(
                    f"{100 * done / a.frames:3.0f}%  {done}/{a.frames} frames, {utt} utts, "
                    f"{dt:.1f} s, {done / max(dt, 1e-9) * 60 / 1e6:.1f} M frames/min"
                )
                next_report = (done // step + 1) * step
    finally:
        if ark_fd is not None:
            ark_fd.close()
        for f in fds.values():
            f.close()

    for name in wanted:
        os.replace(tmp[name], os.path.join(out_dir, name))

    truth = {
        "covariance_type": a.cov,
        "dim": a.dim,
        "num_gauss": a.num_gauss,
        "frames": done,
        "utts": utt,
        "seed": a.seed,
        "arks": len(ark_paths),
        "frames_per_utt": a.frames_per_utt,
        "utts_per_ark": a.utts_per_ark,
        "separation": a.separation,
        "dtype": a.dtype,
        "models": {
            name: {key: m[key].tolist() for key in ("weights", "means", "covariances")}
            for name, m in zip(names, models, strict=True)
        },
    }
    write_json_atomic(os.path.join(out_dir, "truth.json"), truth)

    seconds = time.perf_counter() - t0
    total_bytes = sum(os.path.getsize(p) for p in ark_paths)
    total_bytes += sum(os.path.getsize(os.path.join(out_dir, n)) for n in (*wanted, "truth.json"))
    log(
        f"done: {done} frames, {utt} utts, {len(ark_paths)} arks, {total_bytes} bytes "
        f"({human_bytes(total_bytes)}), {seconds:.1f} s "
        f"({done / max(seconds, 1e-9) * 60 / 1e6:.1f} M frames/min) -> {out_dir}"
    )
    return {
        "frames": done,
        "utts": utt,
        "arks": len(ark_paths),
        "bytes": total_bytes,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
