#!/usr/bin/env bash
# Prepare rows 7-8 of `make bench` for a GPU machine that reaches no network, takes at most 64 MiB per call and
# does not see ../shared (the `device` tool of this workplace). Writes .device/ (git-ignored):
#   .device/mt3/      the converted folder without its weights, plus the weights' sha256
#   .device/partN/    the weights in 3 parts of at most 64.5 MB, one carried per call (a call carries 64 MiB,
#                     the working tree included; the last part leaves room for the folders below)
#   .device/shared/   the golden samples, the original Flax network and its tool
#   .device/cpu/      with --cpu-reference: row 8's input decoded on this CPU in float32 (~20 min on 2 cores),
#                     the ids the GPU's must be identical to
# Usage: benchmarks/device_prep.sh [CONVERTED_DIR] [--cpu-reference]; then see benchmarks/README.md, "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=converted/mt3
CPU_REFERENCE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-reference) CPU_REFERENCE=1 ;;
    *) MODEL=$arg ;;
  esac
done
SHARED=${MT3_SHARED_DIR:-../shared}
[ -f "$MODEL/model.safetensors" ] || { echo "error: $MODEL/model.safetensors: no converted folder (make convert)" >&2; exit 2; }
[ -d "$SHARED/golden" ] || { echo "error: $SHARED/golden: no shared folder (set MT3_SHARED_DIR)" >&2; exit 2; }

rm -rf .device/mt3 .device/part[0-9] .device/shared
mkdir -p .device/mt3 .device/shared/golden .device/shared/tools
find "$MODEL" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} .device/mt3/ \;
sha256sum "$MODEL/model.safetensors" | cut -d' ' -f1 > .device/mt3/model.safetensors.sha256
split -b 64500000 -d "$MODEL/model.safetensors" .device/model.safetensors.
for part in .device/model.safetensors.0*; do
  i=${part##*.0}
  mkdir -p ".device/part$i" && mv "$part" ".device/part$i/"
done
for case in "$SHARED"/golden/*/; do
  name=$(basename "$case")
  mkdir -p ".device/shared/golden/$name" && cp "$case/samples.npy" "$case/tokens.json" ".device/shared/golden/$name/"
done
cp -r "$SHARED/reference" .device/shared/
cp "$SHARED/tools/original_mt3.py" .device/shared/tools/

if [ "$CPU_REFERENCE" = 1 ]; then
  mkdir -p .device/cpu
  MT3_SHARED_DIR=$SHARED python3 benchmarks/bench.py --model-dir "$MODEL" --rows 8 --e2e-device cpu \
    --e2e-modes float32 --json .device/cpu/results.json
fi
du -sh .device/*
