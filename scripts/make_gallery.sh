#!/usr/bin/env bash
# The README's gallery: plots of the bundled digits (the default word-model recognizer and a
# 64-Gaussian UBM), written to scripts/results/gallery/. Needs matplotlib (emdist[plot]).
#   bash scripts/make_gallery.sh [WORK_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$(mktemp -d)}
out="$here/results/gallery"
mkdir -p "$out"
digits_train=$(python -c 'from emdist.corpora import digits_dir; print(digits_dir("train"))')
emdist train "$digits_train" "$work/digits" --workers 0 --overwrite -q
emdist test "$work/digits" --workers 0 -q
emdist plot "$work/digits" -q
emdist train "$digits_train" "$work/ubm" --global --num-gauss 64 --workers 0 --overwrite -q
emdist plot "$work/ubm" -q
cp "$work/digits/plots/loglike.png" "$out/digits-loglike.png"
cp "$work/digits/plots/confusion_decode_test.png" "$out/digits-confusion.png"
cp "$work/ubm/plots/weights.png" "$out/ubm-weights.png"
cp "$work/ubm/plots/occupancy.png" "$out/ubm-occupancy.png"
ls -l "$out"
