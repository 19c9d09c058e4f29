#!/usr/bin/env bash
# One call on the GPU machine, inside ~9 minutes in all: build csrc/ with nvcc, run the
# equality suites compiled on the GPU, time the Triton and CUDA kernels against a device copy,
# profile resnet18 and gpt FD vs DB, then print a short table last. Full results land in
# ${OUT:-bench/results/latest}/ (results.md + JSON/CSV/PNG), to be committed under
# bench/results/<date>-<gpu>/.
#   usage: bash bench/gpu_check.sh       (on the device machine, where OUT is set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
# timeout for a step: its own cap, or what is left of the whole budget, whichever is less
cap() { local left=$(( deadline - $(date +%s) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
status=0

{
  echo "# gr_fused GPU check"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  python -c "import sys, torch, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}')"
  nvcc --version | tail -1
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT/results.md" 2>&1
cat "$OUT/results.md"

log "build csrc (CUDA forced)"
GR_FUSED_BUILD_CUDA=1 timeout "$(cap 150)" python setup.py build_ext --inplace > "$OUT/build.txt" 2>&1 \
  || { echo "BUILD FAILED (see build.txt)"; tail -20 "$OUT/build.txt"; status=1; }
python -c "import gr_fused.backends as b; print('backends on cuda:', {n: b.unavailable_reason(n, 'cuda') or 'ok' for n in ('triton', 'cuda', 'torch')})" \
  2>&1 | tee -a "$OUT/results.md"

log "equality tests, compiled on the GPU"
# (the ahead-of-time compile check is for machines without a GPU: here every kernel compiles for real)
timeout "$(cap 150)" python -m pytest -q -x -p no:cacheprovider tests/test_triton.py tests/test_cext.py \
  tests/test_flat.py tests/test_nosync.py -k "not compiles_for_sm80" 2>&1 | tail -15 > "$OUT/pytest.txt"; [[ ${PIPESTATUS[0]} == 0 ]] || status=1
cat "$OUT/pytest.txt"

log "kernel timings: triton"
timeout "$(cap 110)" python bench/gpu_triton.py "$OUT/triton.json" > "$OUT/triton.txt" 2>&1 || status=1
tail -25 "$OUT/triton.txt"
log "kernel timings: cuda"
timeout "$(cap 110)" python bench/gpu_cuda.py "$OUT/cuda.json" > "$OUT/cuda.txt" 2>&1 || status=1
tail -25 "$OUT/cuda.txt"
log "FD vs DB profile"
timeout "$(cap 300)" bash bench/profile_gpu.sh "$OUT" > "$OUT/profile.txt" 2>&1 || status=1

{
  echo; echo "## equality tests"; echo '```'; cat "$OUT/pytest.txt"; echo '```'
  for f in triton cuda profile; do echo; echo "## $f"; echo '```'; tail -60 "$OUT/$f.txt"; echo '```'; done
} >> "$OUT/results.md"
log "done (status $status); summary:"
tail -3 "$OUT/pytest.txt"
grep -hE "copy|% of copy|launches" "$OUT/triton.txt" "$OUT/cuda.txt" 2>/dev/null | tail -12
tail -4 "$OUT/profile.txt"
exit $status
