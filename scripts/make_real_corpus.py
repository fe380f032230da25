#!/usr/bin/env python
"""Write a large Kaldi data dir of real MFCC: a small real corpus tiled with seeded noise.

Benchmarks on synthetic clusters hide real costs (posteriors of real speech under a trained
model span hundreds of nats, and their tails land in float32's subnormal range), so the
benchmarks and the scale run train on real features. This script makes as many frames as
wanted from a real data dir (by default the bundled digits train set, 18,593 frames of
39-dim MFCC): copy c of utterance u is ``feats(u) + noise_sigma · N(0, I)``, the noise drawn
from ``default_rng([seed, c])``, so every copy differs and the corpus is reproducible.

    python scripts/make_real_corpus.py OUT_DIR --frames 1000000 [--source DATA_DIR]
        [--noise 0.05] [--seed 0] [--utts-per-ark 5000] [--overwrite]

Layout written to OUT_DIR (the same as scripts/make_corpus.py writes):

    data/feats.N.ark    binary float32 Kaldi arks, a new one every --utts-per-ark utterances
    feats.scp           c<copy>-<utt> -> ABSOLUTE ark path:offset, C-sorted
    utt2num_frames      frames per utterance
    utt2spk             the source's speaker (utt2spk of the source, else the utterance)
    text                the source's label, when the source has a text file
    source.json         source, copies, noise, seed and frames, written last

The last copy is cut short, at an utterance boundary, so the total is the first count of
whole utterances reaching --frames. Standalone on purpose (numpy + kaldiio): it must not
import emdist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np

PROG = "make_real_corpus.py"
DIGITS_TRAIN = Path(__file__).resolve().parent.parent / "emdist" / "corpora" / "digits" / "train"


def read_table(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, _, value = line.strip().partition(" ")
            out[key] = value.strip()
    return out


def load_source(source: Path) -> list[tuple[str, np.ndarray, str | None, str]]:
    """(utt, float32 frames, label, speaker) for every utterance of ``source``, in order."""
    text = read_table(source / "text")
    spk = read_table(source / "utt2spk")
    out = []
    for line in (source / "feats.scp").read_text().splitlines():
        if not line.strip():
            continue
        utt, rx = line.split(maxsplit=1)
        path, _, offset = rx.rpartition(":")
        if not os.path.isabs(path):  # relative to the corpus root, as Kaldi recipes run
            path = str(next(p for p in (Path.cwd() / path, source / path, source.parent / path)
                            if p.exists()))
        feats = np.asarray(kaldiio.load_mat(f"{path}:{offset}"), dtype=np.float32)
        out.append((utt, feats, text.get(utt), spk.get(utt, utt)))
    return out


def generate(out_dir: Path, frames: int, source: Path, noise: float, seed: int,
             utts_per_ark: int) -> dict:
    utts = load_source(source)
    per_copy = sum(len(f) for _, f, _, _ in utts)
    copies = -(-frames // per_copy)
    width = len(str(copies - 1))
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    has_text = all(label is not None for _, _, label, _ in utts)
    names = ["feats.scp", "utt2num_frames", "utt2spk"] + (["text"] if has_text else [])
    tmp = {n: out_dir / f".{n}.tmp" for n in names}
    fds = {n: open(tmp[n], "w", encoding="utf-8") for n in names}  # noqa: SIM115
    ark, n_arks, written, n_utts, t0 = None, 0, 0, 0, time.perf_counter()
    try:
        for c in range(copies):
            rng = np.random.default_rng([seed, c])
            for utt, feats, label, spk in utts:
                if written >= frames:
                    break
                if n_utts % utts_per_ark == 0:
                    if ark is not None:
                        ark.close()
                    n_arks += 1
                    ark = open(data / f"feats.{n_arks}.ark", "wb")  # noqa: SIM115
                noisy = feats + (noise * rng.standard_normal(feats.shape)).astype(np.float32)
                uid = f"c{c:0{width}d}-{utt}"
                kaldiio.save_ark(ark, {uid: noisy}, scp=fds["feats.scp"], append=True)
                fds["utt2num_frames"].write(f"{uid} {len(noisy)}\n")
                fds["utt2spk"].write(f"{uid} {spk}\n")
                if has_text:
                    fds["text"].write(f"{uid} {label}\n")
                written += len(noisy)
                n_utts += 1
            if c % max(1, copies // 10) == 0:
                print(f"{PROG}: copy {c + 1} / {copies}, {written} frames, "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        if ark is not None:
            ark.close()
        for fd in fds.values():
            fd.close()
    for n in names:
        os.replace(tmp[n], out_dir / n)
    info = {"source": str(source), "copies": copies, "noise": noise, "seed": seed,
            "frames": written, "utts": n_utts, "arks": n_arks,
            "dim": int(utts[0][1].shape[1])}
    (out_dir / ".source.json.tmp").write_text(json.dumps(info, indent=1) + "\n")
    os.replace(out_dir / ".source.json.tmp", out_dir / "source.json")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--frames", type=int, required=True, help="frames to write (at least)")
    p.add_argument("--source", type=Path, default=DIGITS_TRAIN,
                   help="real Kaldi data dir to tile (default: the bundled digits train set)")
    p.add_argument("--noise", type=float, default=0.05, help="noise σ added to every value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utts-per-ark", type=int, default=5000)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    a = p.parse_args(argv)
    if a.frames < 1 or a.noise < 0 or a.utts_per_ark < 1:
        print(f"{PROG}: error: --frames and --utts-per-ark must be positive, --noise not "
              "negative", file=sys.stderr)
        return 2
    if not (a.source / "feats.scp").is_file():
        print(f"{PROG}: error: {a.source}/feats.scp not found", file=sys.stderr)
        return 2
    if a.out_dir.exists():
        if not a.overwrite:
            print(f"{PROG}: error: {a.out_dir} exists; use --overwrite", file=sys.stderr)
            return 2
        shutil.rmtree(a.out_dir)
    info = generate(a.out_dir.resolve(), a.frames, a.source.resolve(), a.noise, a.seed,
                    a.utts_per_ark)
    print(f"{PROG}: wrote {info['frames']} frames, {info['utts']} utterances, "
          f"{info['arks']} arks to {a.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
