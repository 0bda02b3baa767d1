#!/usr/bin/env bash
# The GPU check: everything a lent GPU machine should tell us, in one device `run` call (<= 8 min).
#
#   run: bash bench/gpu_check.sh            (on the GPU machine; results under $OUT)
#   bash bench/gpu_check.sh --dry-run       (here, on the CPU: the script's own plumbing, small sizes)
#
# Each step has its own time cap, so one hang cannot eat the rest; each writes STEP.log (and its
# JSON) under $OUT, and summary.txt lists every step with its exit status and seconds. The
# project is installed without dependencies into the machine's python3 (torch, CuPy, transformers,
# accelerate, safetensors, typer, rich and pytest are already there; nothing can be fetched).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ $DRY = 1 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run with a cap, log, and record the status
  local name=$1 cap=$2
  shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - started))" "$*" | tee -a "$SUMMARY"
}

json_step() {  # json_step NAME SECONDS COMMAND...: stdout to NAME.json, stderr to NAME.log
  local name=$1 cap=$2
  shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - started))" "$*" | tee -a "$SUMMARY"
}

if [ $DRY = 1 ]; then
  DEVICE=cpu SHAPES=64x172 TOKENS=4,16 PRESET=tiny PROMPTS=16 BATCHES=1,2 NEW=4 TEST_CAP=400 MEMCHECK_CAP=5  # 2 cores: the CPU parity suite is slow
else
  DEVICE=cuda SHAPES=paper TOKENS=512,4096 PRESET=llama3-8b PROMPTS=128,2048 BATCHES=1,8 NEW=32 TEST_CAP=120 MEMCHECK_CAP=75
fi
export LLMINT8_CACHE_DIR="$OUT/cache" PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1

step machine 10 bash -c 'date -u; uname -a; nproc; nvidia-smi || echo "no nvidia-smi"'
if [ $DRY = 0 ]; then
  step install 45 "$PY" -m pip install --no-deps --no-build-isolation -q -e .
fi
step versions 20 "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import cupy; print("cupy", cupy.__version__, cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc: print("cupy unavailable:", exc)
from llmint8_cli.backends import available_backends; print("backends", [b.name for b in available_backends()])'
# the real CUDA backend against the reference (the CPU emulation of the same kernels runs in every CI run)
step tests-cuda "$TEST_CAP" "$PY" -m pytest -q -p no:cacheprovider -k "not emulated" tests/test_cuda.py tests/test_backend_parity.py
# memory errors in our kernels (out-of-bounds reads, races are not its tool): the CUDA tests under
# compute-sanitizer, where the machine has it; a missing tool is a line in the log, not a failure
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ $DRY = 0 ] && [ -n "$SANITIZER" ]; then
  step memcheck "$MEMCHECK_CAP" "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
else
  step memcheck 5 echo "compute-sanitizer: ${SANITIZER:-not found} (dry run: $DRY)"
fi
json_step bench-layer 70 "$PY" -m llmint8_cli bench --device "$DEVICE" --shapes "$SHAPES" --tokens "$TOKENS" --outlier-cols 0,6 --repeat 5
json_step bench-model 110 "$PY" bench/gpu_model_bench.py --device "$DEVICE" --preset "$PRESET" --prompt-tokens "$PROMPTS" --batch "$BATCHES" --new-tokens "$NEW"

echo "results under $OUT:"
ls "$OUT"
# the check's own result: every step ran (a failed step is a finding, reported above, not a crash)
! grep -q "rc=12[4-9]\|rc=137" "$SUMMARY" || echo "some step hit its time cap: see summary.txt"
