#!/usr/bin/env bash
# The one call on a GPU machine, at most ~8 minutes (BUDGET_S, default 460 s), in order of
# value; each step writes its result as soon as it finishes:
#   1. build gr_fused._C with the CUDA kernels;
#   2. the equality suites on the GPU (the CUDA kernels, the Triton kernels compiled);
#   3. kernel GB/s against a device copy at 1M, 16M, 64M and an odd size, launches per step
#      (bench/gpu_triton.py, bench/gpu_cuda.py);
#   4. the profiler: ResNet-18 and GPT-2 124M in bf16 (bench/profile_gpu.sh).
# Everything lands in ${OUT:-bench/results/latest}/ as two files: summary.md (the table to
# commit under bench/results/) and details.tar.gz (logs, JSON, CSV, PNG), both rewritten
# after every step. Without a CUDA device every GPU step says so (a dry run).
#   usage: bash bench/gpu_check.sh            OUT=/tmp/x BUDGET_S=300 bash bench/gpu_check.sh
#   BUILD=0 skips step 1 (the dry-run test: CI has built gr_fused._C already)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3 || command -v python) || { echo "no python3 or python"; exit 1; }
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$(( $(date +%s) + ${BUDGET_S:-460} ))
status=0

# a step's time limit: its own cap, or what is left of the budget, whichever is less
cap() { local left=$(( deadline - $(date +%s) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$WORK/log.txt"; }
note() { echo "$*" | tee -a "$SUMMARY"; }
pack() { tar -czf "$OUT/details.tar.gz" -C "$WORK" . 2>/dev/null; }

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "# gr_fused GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  echo "- $("$PY" -c "import sys, torch, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}')" 2>&1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo none)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} > "$SUMMARY"
cat "$SUMMARY"
gpu_only() {  # a step that needs the GPU: say so without one
  if [[ "$CUDA" != 1 ]]; then note "- $1: skipped, needs a CUDA device"; return 1; fi
}

log "1. build gr_fused._C with CUDA"
if [[ "${BUILD:-1}" == 0 ]]; then
  note "- build: skipped (BUILD=0)"
elif GR_FUSED_BUILD_CUDA=1 timeout "$(cap 120)" "$PY" setup.py build_ext --inplace > "$WORK/build.txt" 2>&1; then
  note "- build: ok ($("$PY" -c "import gr_fused._C as c; print('CUDA archs', c.cuda_archs)" 2>&1))"
else
  note "- build: FAILED (details: build.txt)"; tail -20 "$WORK/build.txt"; status=1
fi
"$PY" -c "import gr_fused.backends as b; print('- backends on cuda:', {n: b.unavailable_reason(n, 'cuda') or 'ok' for n in ('triton', 'cuda', 'torch')})" 2>&1 | tee -a "$SUMMARY"
pack

log "2. equality suites on the GPU"
if gpu_only "equality suites"; then
  timeout "$(cap 150)" "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 tests/test_triton.py \
    tests/test_cext.py tests/test_nosync.py -k "triton or cuda or nosync" > "$WORK/pytest.txt" 2>&1
  rc=$?
  note "- equality (tests/test_triton.py, the CUDA tests of test_cext.py, test_nosync.py): $(tail -1 "$WORK/pytest.txt")$( ((rc == 124)) && echo ' (stopped at its time limit)')"
  ((rc == 0)) || { status=1; grep -E "^(FAILED|ERROR)" "$WORK/pytest.txt" | head -10 | sed 's/^/  - /' | tee -a "$SUMMARY"; }
fi
pack

log "3. kernel timings against a device copy, launches per step"
for part in triton cuda; do
  if [[ "$part" == triton ]]; then
    args=(--budget 55)
  else
    args=(--sizes 1M 16M 64M 5000011 --budget 55)
  fi
  if gpu_only "timings ($part)"; then
    timeout "$(cap 75)" "$PY" "bench/gpu_$part.py" "$WORK/$part.json" "${args[@]}" > "$WORK/$part.txt" 2>&1 || status=1
    note ""; note "### $part kernels"; note '```'
    tail -25 "$WORK/$part.txt" | tee -a "$SUMMARY"; note '```'
  else  # the script still runs (interpreter, tiny sizes: not speed figures), to show it works
    timeout "$(cap 60)" "$PY" "bench/gpu_$part.py" "$WORK/$part.json" "${args[@]}" \
      > "$WORK/$part.txt" 2>&1 || status=1
    tail -2 "$WORK/$part.txt"
  fi
  pack
done

log "4. profiler: ResNet-18 and GPT-2 124M in bf16"
if gpu_only "profiler (ResNet-18, GPT-2 124M)"; then
  timeout "$(cap 150)" bash bench/profile_gpu.sh "$WORK" > "$WORK/profile.txt" 2>&1 || status=1
  note ""; note "### profiler"; note '```'
  grep -E "^(method|sgd|fd-gr|bd-gr|central|db-gr|sam-ref|resnet18|gpt|==)" "$WORK/profile.txt" | tail -30 | tee -a "$SUMMARY"
  note '```'
fi
pack

log "done (status $status, $(( $(date +%s) - deadline + ${BUDGET_S:-460} )) s)"
note ""
note "status $status; details in details.tar.gz ($(tar -tzf "$OUT/details.tar.gz" | grep -v '/$' | tr '\n' ' '))"
rm -rf "$WORK"
exit $status
