#!/usr/bin/env bash
# One prepared GPU check of the memory-op kernels, meant to finish in under 5 minutes on one H200:
#   1. the kernel test tier on the GPU (compiled Triton, the same small odd shapes as the CPU interpreter runs),
#   2. Triton vs reference at the paper's size (N=512^2, d_v=512, d_k=512, k=8, C=512, 8 x 4096 tokens),
#      fp32 everywhere and bf16 inputs/tables for the addressing and the read,
#   3. the timing table (reference vs Triton, achieved GB/s vs the measured copy bandwidth).
# It builds nothing outside the repository: Triton's compile cache goes to build/triton-cache.
# Usage: bash bench/gpu_check.sh [python]      (exit status != 0 if any check fails)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
export TRITON_CACHE_DIR="$PWD/build/triton-cache"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$TRITON_CACHE_DIR"
"$PY" -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'

status=0
echo "== 1. kernel tests on the GPU"
timeout 120 "$PY" -m pytest tests/kernels -q -x -p no:cacheprovider || status=1
echo "== 2+3. paper-size equivalence and timing"
timeout 170 "$PY" bench/kernels.py --preset paper --check --reps 10 || status=1
exit $status
