#!/usr/bin/env bash
# The GPU checks in one run (under 8 minutes on one H100/H200-class GPU), printed as one table:
#   1. calibration + quantization of the full-width DiT4SR transformer (random weights) on CUDA in bf16:
#      stage times and peak GPU memory (bench/gpu_calibrate.py);
#   2. the fused Triton quantized linear's numerics and speed against torch fp16 nn.Linear
#      (bench/bench_kernels_gpu.py).
#
#     bash bench/gpu_check.sh                 # LAYERS=8 blocks by default (full width, full config otherwise)
#     LAYERS=24 STEPS=2 bash bench/gpu_check.sh
#
# Without a CUDA GPU it stops at once with the reason (exit 2). Each part has its own time limit, so one
# slow part cannot use up the other's time; a part that fails or runs out of time is named in the output.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    reason=$("$PYTHON" -c 'import torch; print("torch", torch.__version__ + ", CUDA build:", torch.version.cuda or "none")' 2>&1 | tail -1)
    echo "gpu_check: needs a CUDA GPU, and torch sees none here ($reason); nothing was run" >&2
    exit 2
fi

LAYERS="${LAYERS:-8}"; STEPS="${STEPS:-4}"; CROPS="${CROPS:-2}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0

echo "[1/2] Triton kernels vs torch fp16 (time limit 180 s)" >&2
if ! timeout 180 "$PYTHON" bench/bench_kernels_gpu.py --runs 20 --warmup 5 --tokens 4096 >"$work/kernels.txt" 2>"$work/kernels.err"; then
    echo "gpu_check: bench_kernels_gpu.py failed or ran out of time:" >&2
    tail -5 "$work/kernels.err" >&2
    status=1
fi

echo "[2/2] calibration + quantization, full width, $LAYERS blocks, bf16 on CUDA (time limit 270 s)" >&2
if ! timeout 270 "$PYTHON" bench/gpu_calibrate.py --device cuda --dtype bfloat16 --config full --layers "$LAYERS" \
        --steps "$STEPS" --crops "$CROPS" --kernels-log "$work/kernels.txt"; then
    echo "gpu_check: gpu_calibrate.py failed or ran out of time" >&2
    status=1
fi
exit $status
