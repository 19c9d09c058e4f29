#!/usr/bin/env bash
# FD-GR vs DB-GR, SAM and SGD on the GPU (docs/profile.md): ResNet-18 (CIFAR, batch 128) and
# GPT-2 small (124M: 12 layers, 768 wide, 12 heads, vocab 50257; batch 8 x 512 tokens),
# both in bf16 autocast, every method on every gr_fused backend that can run. bench/gpu_check.sh
# gives this script at most 150 s. Targets: fused fd-gr <= 2.05x sgd, fd-gr faster than
# sam-ref; db-gr against fd-gr is measured. They are printed last, checked from the JSON.
#   usage: bash bench/profile_gpu.sh [OUTDIR]     (default: $OUT, else bench/results/latest)
#   SMOKE=1 bash bench/profile_gpu.sh /tmp/x      the same commands on CPU at tiny sizes
# Writes profile_resnet18.{json,csv,png} and profile_gpt.{json,csv,png} into OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench/results/latest}}
mkdir -p "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

DEVICE=cuda
RESNET_TINY=()
GPT_TINY=()
if [[ "${SMOKE:-0}" == 1 ]]; then  # later flags win: tiny sizes, one timed step, on CPU
  DEVICE=cpu
  RESNET_TINY=(--width 4 --batch-size 4 --warmup 0 --repeat 1)
  GPT_TINY=(--n-layer 1 --n-embd 32 --n-head 2 --vocab 64 --seq-len 16 --batch-size 2
            --warmup 0 --repeat 1)
fi
COMMON=(--device "$DEVICE" --dtype bf16-autocast --warmup 5 --repeat 20 --no-progress)

profile() {  # name, then the model's flags
  local name=$1
  shift
  echo "== profile $name: python -m gr_fused.profile $*"
  python -m gr_fused.profile "$@" --json "$OUTDIR/profile_$name.json" \
    --csv "$OUTDIR/profile_$name.csv" --plot "$OUTDIR/profile_$name.png"
}

profile resnet18 --model resnet18 --batch-size 128 "${COMMON[@]}" ${RESNET_TINY[@]+"${RESNET_TINY[@]}"}
profile gpt --model gpt --n-layer 12 --n-embd 768 --n-head 12 --vocab 50257 --seq-len 512 \
  --batch-size 8 "${COMMON[@]}" ${GPT_TINY[@]+"${GPT_TINY[@]}"}

python - "$OUTDIR" <<'EOF'
import json, sys
from gr_fused import backends
from gr_fused.profile.report import headline_ratios
fused = [name for name in backends.names() if name not in ("torch", "auto")]
for name in ("resnet18", "gpt"):
    report = json.load(open(f"{sys.argv[1]}/profile_{name}.json"))
    h = headline_ratios(report, fused)
    if h is None:
        print(f"{name}: no fused fd-gr ran ({report['skipped_backends']}); targets NOT met")
        continue
    met = {True: "met", False: "NOT met"}
    print(f"{name} ({report['device_name']}): fd-gr ({h['fd_backend']}) = "
          f"{h['fd_over_sgd']:.2f}x sgd [target <= 2.05: {met[h['fd_over_sgd'] <= 2.05]}], "
          f"{h['fd_over_sam_ref']:.2f}x sam-ref [target < 1: {met[h['fd_over_sam_ref'] < 1]}]; "
          f"db-gr = {h['db_over_fd']:.2f}x fd-gr")
EOF
