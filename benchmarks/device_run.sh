#!/usr/bin/env bash
# On the GPU machine, after the calls that copied .device/part*/* to $PARTS (default /root/parts). The first run
# joins the weights into $WORK/mt3 (default /root/work), checks their sha256 and copies the golden data and the CPU
# reference beside it, so that later calls on the warm machine carry nothing. Then:
#   device_run.sh test [PYTEST ARGS]   tests/test_cuda.py on the real model and the golden data
#   device_run.sh [BENCH ARGS]         `make bench` (default rows 6 and 7), results.json and row 8's ids to $OUT
# See benchmarks/README.md, "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-/root/parts}
WORK=${WORK:-/root/work}
OUT=${OUT:?OUT must name the folder that comes back}
if [ ! -f "$WORK/mt3/model.safetensors" ]; then
  mkdir -p "$WORK" && cp -r .device/mt3 .device/shared "$WORK/"
  if [ -d .device/cpu ]; then cp -r .device/cpu "$WORK/"; fi
  cat "$PARTS"/model.safetensors.0* > "$WORK/mt3/model.safetensors.joined"
  (cd "$WORK/mt3" && echo "$(cat model.safetensors.sha256)  model.safetensors.joined" | sha256sum -c --quiet)
  mv "$WORK/mt3/model.safetensors.joined" "$WORK/mt3/model.safetensors"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# the model code measured is this checkout's, not the copy device_prep.sh took (a fix between calls counts)
find convert_mt3/mt3 -name '*_mt3.py' -exec cp {} "$WORK/mt3/" \;
export PYTHONUNBUFFERED=1
if [ "${1:-}" = test ]; then
  shift
  # --noconftest: conftest's T5X writer needs zarr, which the GPU image lacks; tests/test_cuda.py needs neither
  MT3_MODEL_DIR=$WORK/mt3 MT3_SHARED_DIR=$WORK/shared python3 -m pytest --noconftest -p no:cacheprovider -q -s \
    tests/test_cuda.py "$@"
  exit
fi
reference=()
if [ -f "$WORK/cpu/e2e_tokens_cpu_float32.json" ]; then
  reference=(--e2e-reference "$WORK/cpu/e2e_tokens_cpu_float32.json")
fi
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--rows 6,7 --reps 2)
python3 benchmarks/bench.py --model-dir "$WORK/mt3" --shared "$WORK/shared" ${reference[@]+"${reference[@]}"} \
  "${args[@]}" --json "$OUT/results.json"
