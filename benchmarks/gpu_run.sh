#!/usr/bin/env bash
# Everything one short GPU slot should produce, in one call (about 8 minutes on an H100/H200).
#
#   bash benchmarks/gpu_run.sh             # on a CUDA machine (make gpu-run); no internet or PyPI needed
#   bash benchmarks/gpu_run.sh --dry-run   # rehearsal anywhere (make gpu-run-dry): checks that every step's
#                                          # command, script and flag exists and parses; runs nothing heavy
#
# Steps, in order of value; each runs under its own timeout, and all of them under one deadline
# (GPU_RUN_BUDGET seconds, default 480), so a hang costs one step, never the slot:
#   preflight     a CUDA GPU is visible (checked first: without one the script stops in seconds),
#                 the Python modules the steps need are importable; versions and device recorded
#   install       pip install --no-build-isolation --no-deps -e . (the CUDA extension is built for this
#                 GPU's arch only); if that build fails, again without the CUDA sources
#   gpu-tests     python -m pytest -q -m gpu tests (both per-row select variants at layer shapes)
#   ops           benchmarks/bench_ops.py --device cuda --shapes all --variants bisect,radix: every op,
#                 GB/s against the measured device copy bandwidth, ratios against the torch baselines
#   sparse24      benchmarks/bench_sparse24.py: 2:4 semi-structured Linear vs dense
#   model-*       benchmarks/bench_model.py: every Linear of MODEL_LAYERS (default 4) LLaMA-7B layers,
#                 ours vs the torch sort path; unstructured (bisect, radix) and 2:4
#   triton-tests  tests/test_triton_kernels.py on CUDA tensors (awkward shapes, ties, both variants)
# Results: benchmarks/results/{ops,linear24,model,model_radix,gpu_steps}_cuda.csv (the device name is in
# every row) and gpu_run_cuda.log; all copied into $OUT when that variable is set.
#
# Environment: PY (the Python to use; default python, else python3), GPU_RUN_BUDGET, MODEL_LAYERS,
# OPS_SHAPES (default all), OPS_REP_MS (default 100).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  "") ;;
  -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
  *) echo "gpu_run: unknown argument '$1' (use --dry-run or nothing)" >&2; exit 64 ;;
esac

PY=${PY:-$(command -v python || command -v python3 || echo python)}
BUDGET=${GPU_RUN_BUDGET:-480}
MODEL_LAYERS=${MODEL_LAYERS:-4}
OPS_SHAPES=${OPS_SHAPES:-all}
OPS_REP_MS=${OPS_REP_MS:-100}
RESULTS=$ROOT/benchmarks/results
STEPS_CSV=$RESULTS/gpu_steps_cuda.csv
LOG=$RESULTS/gpu_run_cuda.log
START=$(date +%s)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET ECOFLAP_TRITON_CPU ECOFLAP_SELECT_VARIANT
FAILED=0
DEVICE="none"

say() { echo "gpu_run [$(( $(date +%s) - START ))s] $*"; }

copy_out() {
  if [[ $MODE == run && -n "${OUT:-}" ]]; then
    sleep 1  # let tee write the last lines of the log
    mkdir -p "$OUT" && cp -f "$RESULTS"/*_cuda.csv "$LOG" "$OUT"/ 2>/dev/null
    say "results copied to $OUT"
  fi
}
trap copy_out EXIT

record() {  # step status exit_code seconds timeout
  [[ $MODE == run ]] || return 0
  [[ -f $STEPS_CSV ]] || echo "step,status,exit_code,seconds,timeout_s,device,commit,date" > "$STEPS_CSV"
  local commit
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "$1,$2,$3,$4,$5,\"$DEVICE\",$commit,$(date -u '+%Y-%m-%d %H:%M UTC')" >> "$STEPS_CSV"
}

# run_step NAME TIMEOUT CHECK -- COMMAND...
#   CHECK (what --dry-run does instead of running): dry-run (run COMMAND with --dry-run appended),
#   help (every --flag of COMMAND appears in COMMAND's --help), collect (pytest --collect-only),
#   none (checked elsewhere)
run_step() {
  local name=$1 limit=$2 check=$3
  shift 4
  if [[ $MODE == dry ]]; then
    dry_check "$name" "$check" "$@"
    return
  fi
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if (( left < 20 )); then
    say "$name: skipped, the budget of ${BUDGET}s is spent"
    record "$name" skipped-no-time "" 0 0
    return 1
  fi
  (( limit > left )) && limit=$left
  say "$name: $* (timeout ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  local secs=$(( $(date +%s) - t0 )) status=ok
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
  [[ $status == ok ]] || FAILED=$(( FAILED + 1 ))
  say "$name: $status (exit $rc, ${secs}s)"
  record "$name" "$status" "$rc" "$secs" "$limit"
  return $rc
}

dry_check() {
  local name=$1 check=$2
  shift 2
  local out rc=0
  case $check in
    dry-run) out=$("$@" --dry-run 2>&1) || rc=$?
             out=$(echo "$out" | tail -1) ;;
    collect)  # -q -q lists "file: count" per test file
      local listing n
      listing=$("$@" --collect-only -q 2>&1) || rc=$?
      n=$(echo "$listing" | awk -F': ' '/^tests\/.*: [0-9]+$/ {s += $2} END {print s + 0}')
      (( n > 0 )) || rc=${rc/#0/5}
      out="$n tests collected"
      (( rc == 0 )) || out="$out; $(echo "$listing" | grep -iE "error" | head -2 | tr '\n' ' ')" ;;
    help)
      local help flag missing=""
      help=$("$1" "$2" --help 2>&1) || rc=$?
      for flag in "$@"; do
        [[ $flag == --* && $help != *"$flag"* ]] && missing="$missing $flag"
      done
      if [[ -n $missing ]]; then rc=1; out="flags not in $2 --help:$missing"; else out="$2 parses; flags ok"; fi ;;
    none) out="checked in preflight" ;;
  esac
  if (( rc == 0 )); then say "dry-run $name: ok ($out)"; else say "dry-run $name: FAILED ($out)"; FAILED=$(( FAILED + 1 )); fi
}

# ---- preflight: the GPU first --------------------------------------------------------------------
gpu_check() {  # prints the device name (exit 0) or why there is none (exit 1, 2)
  local smi="not found" probe
  if command -v nvidia-smi >/dev/null 2>&1; then
    smi=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -1)
  fi
  probe=$(timeout 60 "$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1)
  if [[ $? != 0 ]]; then echo "$PY cannot import torch: $(echo "$probe" | tail -1)"; return 2; fi
  probe=$(echo "$probe" | tail -1)
  if [[ -z $probe ]]; then echo "no CUDA GPU visible to torch (nvidia-smi: $smi)"; return 1; fi
  echo "$probe"
}

if probe=$(gpu_check); then
  DEVICE=$probe
  if [[ $MODE == run ]]; then  # from here on, everything is logged next to the results
    mkdir -p "$RESULTS"
    exec > >(tee -a "$LOG") 2>&1
  fi
  say "GPU: $DEVICE"
elif [[ $MODE == run ]]; then
  say "FATAL: $probe; nothing was run and nothing written. This script needs a CUDA GPU (rehearse it with --dry-run)."
  exit 2
else
  say "dry-run: $probe (expected in a rehearsal; a real run stops here)"
fi

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "triton", "numpy", "transformers", "safetensors", "pytest", "setuptools"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n $missing ]]; then
  say "preflight: missing Python modules: $missing (the steps that need them will fail and be recorded)"
  [[ $MODE == dry ]] && FAILED=$(( FAILED + 1 ))
fi
"$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null || say "preflight: ninja not found: the extension builds serially (slower)"
command -v timeout >/dev/null || { say "FATAL: coreutils timeout is missing"; exit 3; }
"$PY" - <<'EOF'
import platform, shutil, subprocess
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"unavailable ({type(e).__name__})"
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
nvcc = shutil.which("nvcc")
nv = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else "not found"
print(f"gpu_run preflight: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}, capability {cap}, nvcc {nv}")
EOF
record preflight ok 0 $(( $(date +%s) - START )) 60

# ---- install ---------------------------------------------------------------------------------------
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null || echo 90)
if [[ $MODE == dry ]]; then  # pip resolves and prepares the editable install (runs setup.py), builds nothing
  if out=$("$PY" -m pip install --dry-run --no-build-isolation --no-deps -e . 2>&1); then
    say "dry-run install: ok ($(echo "$out" | tail -1))"
  else
    say "dry-run install: FAILED ($(echo "$out" | tail -2 | tr '\n' ' '))"; FAILED=$(( FAILED + 1 ))
  fi
else
  export ECOFLAP_CUDA_ARCHS=${ECOFLAP_CUDA_ARCHS:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if ! run_step install 240 none -- "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    say "install: retrying without the CUDA sources (the Triton kernels do not need them)"
    ECOFLAP_SKIP_CUDA=1 run_step install-cpu-ext 120 none -- "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
  "$PY" -c "from ecoflap_fast import _ext, kernels; print('gpu_run: extension', _ext.reason(), '| CUDA kernels', \
_ext.has_cuda_kernels(), '|', kernels.REASON, '| select variant', kernels.select_variant())"
fi

# ---- tests and benchmarks --------------------------------------------------------------------------
run_step gpu-tests 150 collect -- "$PY" -m pytest -q -m gpu tests
run_step ops 200 dry-run -- "$PY" benchmarks/bench_ops.py --device cuda --shapes "$OPS_SHAPES" --dtype bfloat16 \
  --variants bisect,radix --rep-ms "$OPS_REP_MS"
run_step sparse24 75 dry-run -- "$PY" benchmarks/bench_sparse24.py --device cuda --shapes "$OPS_SHAPES" --tokens 16,128,2048
run_step model-unstructured 60 help -- "$PY" benchmarks/bench_model.py --device cuda --layers "$MODEL_LAYERS" \
  --pattern unstructured
ECOFLAP_SELECT_VARIANT=radix run_step model-unstructured-radix 60 help -- "$PY" benchmarks/bench_model.py --device cuda \
  --layers "$MODEL_LAYERS" --pattern unstructured --out "$RESULTS/model_radix_cuda.csv"
run_step model-2:4 60 help -- "$PY" benchmarks/bench_model.py --device cuda --layers "$MODEL_LAYERS" --pattern 2:4
run_step triton-tests 120 collect -- "$PY" -m pytest -q tests/test_triton_kernels.py

if [[ $MODE == dry ]]; then
  if (( FAILED )); then say "rehearsal: $FAILED check(s) FAILED"; exit 1; fi
  say "rehearsal: every step exists and parses; run it on a CUDA machine without --dry-run"
  exit 0
fi
say "done in $(( $(date +%s) - START ))s; $FAILED step(s) not ok; results in $RESULTS (*_cuda.csv, gpu_run_cuda.log)"
(( FAILED == 0 ))
