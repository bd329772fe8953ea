#!/usr/bin/env bash
# One prepared GPU session for the Pallas kernels (H100/H200). From the repo root, on the device:
#
#     bash benchmarks/gpu_session.sh OUT_DIR [STEP ...]
#
# STEPs (default: all, in this order; each under its own `timeout`, a failure or timeout is logged
# and the next step runs):
#   env      the device (nvidia-smi, JAX and PyTorch devices) and the Python packages' versions
#   test     JAX_DEFAULT_MATMUL_PRECISION=highest pytest -v tests/test_kernels.py tests/test_fm_block.py
#            tests/test_flash_attention.py tests/test_hstu_projection.py tests/test_residual_norm.py
#            tests/test_row_norm.py tests/test_hstu_mosaic.py (compiled Triton and Mosaic GPU kernels;
#            -v: a step cut short still names each test it finished and how)
#   kernels  benchmarks/kernels.py, full grid (HSTU, its fused projection, FM block, the
#            LayerNorm kernels, softmax)
#                                                          -> OUT/kernels.json
#   profile  benchmarks/kernel_profile.py: device time per kernel at L=4096, d=128, with the bias
#            and without, and the Mosaic GPU kernels'      -> OUT/profile.jsonl
#   gr       benchmarks/hstu_reference_side_by_side.py vs generative-recommenders' Triton hstu_mha
#            (ours on Triton and on Mosaic GPU, XLA; L = 4096 first: GR autotunes at each new
#            shape, so a step cut short keeps the shape the aims care most about)
#                                                          -> OUT/hstu_side_by_side.json
#   train    benchmarks/train_step.py                      -> OUT/train_step.json
#   ncu      Nsight Compute on one HSTU forward + backward at L=4096, d=128 with the bias (the
#            attention kernels' speed of light, tensor-pipe use, occupancy, warp stalls: what
#            limits them), skipped where the image has no `ncu`  -> OUT/ncu.csv
#   tiles    benchmarks/tile_sweep.py: the HSTU kernel at L=4096, d=128 under 9 tile settings, in one
#            process                                       -> OUT/tiles.json
#            (last: the aims' figures come first if the deadline cuts the session short)
# Everything the steps print goes to OUT/session.log (benchmark rows as JSON lines as they finish,
# so a step cut short keeps its finished rows); OUT/summary.txt lists each step's exit status and
# seconds (124 = timed out), then the speed aims as measured (`python -m benchmarks.aims
# OUT`: each aim's worst value, its target and whether it is met). OUT holds at most 8 files, what
# a device call brings back. Back on the workstation, `python -m benchmarks.plot_kernels OUT --out
# kernel_speed.png` draws the results beside the aims.
#
# Budget: a device command may run 10 minutes, so a global deadline (DEADLINE=570 seconds from the
# start) cuts the last step short rather than lose the whole call; the step timeouts (seconds,
# override with T_ENV, T_TEST, T_KERNELS, T_PROFILE, T_GR, T_TRAIN, T_NCU, T_TILES) sum to 680. Steps can be
# split over two calls on a warm machine: `... OUT env test kernels profile` then `... OUT gr train ncu tiles`.
#
# Packages: the device image's python3 has JAX (CUDA), flax, optax, orbax, PyTorch and Triton, but
# not grain (train_step needs it). Carry wheels in .whl/ (installed here into /tmp/site when the
# folder exists), made on the workstation from the repo root:
#     X=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$X")"; echo /.whl/ >> "$X"; echo /.gr/ >> "$X"
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d .whl grain==0.2.18 array_record==0.8.6 portpicker
# GR's Triton attention: a copy of its python package in .gr/ (GR_PATH, default .gr):
#     mkdir -p .gr; git -C <generative-recommenders checkout> archive HEAD generative_recommenders | tar -x -C .gr
# and carry [".whl", ".gr"]. PYTHON picks the interpreter (default python3). SMOKE=1 checks the
# script itself anywhere (CPU included): every benchmark with --smoke, one quick test.
set -u
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [env test kernels profile gr train ncu tiles]}
shift
STEPS=${*:-env test kernels profile gr train ncu tiles}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GR_PATH=${GR_PATH:-.gr}
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
export SMOKE_FLAG=${SMOKE:+--smoke}
TEST_SELECT=${SMOKE:+-k dispatch}
LOG="$OUT/session.log"
export PY OUT GR_PATH PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax-cache}
: > "$LOG"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    echo "installed $(ls .whl | tr '\n' ' ')" >> "$LOG"
  else
    echo "wheel install failed (session.log)" | tee -a "$LOG"
  fi
fi

# run NAME SECONDS CMD...: CMD under `timeout`, output appended to OUT/session.log, status to
# OUT/summary.txt
run() {
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: ${left}s left of the ${DEADLINE}s deadline" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (timeout ${budget}s)"
  echo "== $name (timeout ${budget}s): $*" >> "$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "/tmp/gpu_session_$name.log" 2>&1
  rc=$?
  cat "/tmp/gpu_session_$name.log" >> "$LOG"
  echo "$name rc=$rc seconds=$(($(date +%s) - t0)) timeout=$budget" | tee -a "$OUT/summary.txt" "$LOG"
  tail -n 5 "/tmp/gpu_session_$name.log"
}

env_report() {
  nvidia-smi -L || echo "no nvidia-smi"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "yaml", "rich", "scipy", "pytest",
             "torch", "triton"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"{name} MISSING ({type(err).__name__}: {err})")
import jax
print("jax backend", jax.default_backend(), jax.devices())
try:
    import torch
    print("torch cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as err:
    print("torch", err)
EOF
}

append_json() {
  # one benchmark's JSON report (SRC, if it was written) as one line of DEST, then SRC removed
  [ -f "$1" ] && "$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$1" >> "$2"
  rm -f "$1"
}

profile_both() {
  : > "$OUT/profile.jsonl"
  for flag in "" --no-bias "--impl mosaic"; do
    "$PY" -m benchmarks.kernel_profile $flag $SMOKE_FLAG --out /tmp/gpu_session_profile.json > /dev/null \
      || echo "profile $flag failed"
    append_json /tmp/gpu_session_profile.json "$OUT/profile.jsonl"
  done
}

ncu_kernels() {
  # The first 6 attention launches of one timed forward and forward + backward (the forward's
  # warm-up and timed call, then the forward, dK/dV, dQ and dbias of the backward's warm-up),
  # each replayed by Nsight Compute for its sections, then the report as CSV.
  if ! command -v ncu > /dev/null; then
    echo "ncu not found: skipped"
    return 0
  fi
  ncu --target-processes all --kernel-name regex:hstu_attention --launch-count 6 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats -f -o /tmp/gpu_session_ncu \
    "$PY" -m benchmarks.kernels --ops hstu --impls pallas --lengths 4096 --dims 128 --iters 1 $SMOKE_FLAG \
    --out /tmp/gpu_session_ncu.json > /dev/null || return 1
  ncu --import /tmp/gpu_session_ncu.ncu-rep --csv --page details > "$OUT/ncu.csv"
}

echo "gpu_session: steps [$STEPS] -> $OUT ($(date -u +%FT%TZ), deadline ${DEADLINE}s)" | tee "$OUT/summary.txt"
for step in $STEPS; do
  case $step in
    env) run env "${T_ENV:-30}" bash -c "$(declare -f env_report); env_report" ;;
    test) run test "${T_TEST:-90}" env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -v -p no:cacheprovider \
            tests/test_kernels.py tests/test_fm_block.py tests/test_flash_attention.py tests/test_hstu_projection.py \
            tests/test_residual_norm.py tests/test_row_norm.py tests/test_hstu_mosaic.py $TEST_SELECT ;;
    kernels) run kernels "${T_KERNELS:-140}" "$PY" -m benchmarks.kernels --out "$OUT/kernels.json" $SMOKE_FLAG ;;
    profile) run profile "${T_PROFILE:-60}" bash -c "$(declare -f append_json profile_both); profile_both" ;;
    gr) run gr "${T_GR:-100}" "$PY" -m benchmarks.hstu_reference_side_by_side --gr-path "$GR_PATH" --iters 10 \
          --lengths 4096,2048,1024,512,8192 --out "$OUT/hstu_side_by_side.json" $SMOKE_FLAG ;;
    tiles) run tiles "${T_TILES:-80}" "$PY" -m benchmarks.tile_sweep --out "$OUT/tiles.json" $SMOKE_FLAG ;;
    ncu) run ncu "${T_NCU:-60}" bash -c "$(declare -f ncu_kernels); ncu_kernels" ;;
    train) run train "${T_TRAIN:-120}" "$PY" -m benchmarks.train_step --steps 10 --out "$OUT/train_step.json" \
             $SMOKE_FLAG ;;
    *) echo "unknown step $step (expected env test kernels profile gr train ncu tiles)" | tee -a "$OUT/summary.txt" ;;
  esac
done
# the aims from whatever the steps wrote (benchmarks/aims.py; for a session split over two calls,
# run it again on a folder holding both calls' files)
"$PY" -m benchmarks.aims "$OUT" >> "$OUT/summary.txt" 2>&1 || echo "aims: failed (summary.txt)" >> "$OUT/summary.txt"
echo "gpu_session: done in $(($(date +%s) - START))s" | tee -a "$OUT/summary.txt"
