#!/bin/bash
# A learning-rate sweep as one SLURM job array: one array task (2 nodes x 8 GPUs) per value, each in
# its own run directory <run_dir>/train.lr=<value>/. Check it first with --dry-run; then
#   fwpkm-launch status runs/lr-sweep     # one line per array task
# Usage: launch/sweep.sh [extra fwpkm-launch options or section.key=value overrides]
set -euo pipefail
exec fwpkm-launch slurm --config configs/paper-112m.yaml --nodes 2 --gpus-per-node 8 --time 720 \
    --array-sweep train.lr=1e-3,2e-3,4e-3 \
    data.path=/shared/data/mine train.run_dir=runs/lr-sweep train.exit_after_minutes=710 "$@"
