#!/usr/bin/env bash
# On the GPU machine, after the calls that copied .device/part0..3/* to $PARTS (default /root/parts): join the
# weights into .device/mt3, check their sha256, and run rows 7-8 of `make bench` (or the bench arguments given),
# writing results.json and row 8's ids to $OUT. See benchmarks/README.md, "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-/root/parts}
OUT=${OUT:?OUT must name the folder that comes back}
cat "$PARTS"/model.safetensors.0[0-3] > .device/mt3/model.safetensors
echo "$(cat .device/mt3/model.safetensors.sha256)  .device/mt3/model.safetensors" | sha256sum -c --quiet
reference=()
[ -f .device/cpu/e2e_tokens_cpu_float32.json ] && reference=(--e2e-reference .device/cpu/e2e_tokens_cpu_float32.json)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
args=("$@")
# default: rows 7 and 8 with the float32 and mixed modes, eager and with the experimental CUDA graphs, float32
# also with EOS looked for every 8 steps (the cast modes were 20x slower than float32 on CUDA once)
[ ${#args[@]} -eq 0 ] && args=(--rows 7,8 --reps 2 --e2e-modes \
  float32,float32+graphs,float32+graphs+eos8,autocast-bfloat16,autocast-bfloat16+graphs,autocast-float16+graphs)
PYTHONUNBUFFERED=1 python3 benchmarks/bench.py --model-dir .device/mt3 --shared .device/shared \
  ${reference[@]+"${reference[@]}"} "${args[@]}" --json "$OUT/results.json"
