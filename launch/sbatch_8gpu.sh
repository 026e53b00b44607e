#!/bin/bash
# Your own sbatch file for a cluster with 8 GPUs per node: every srun task is one rank of fwpkm-train,
# which reads its rank, world size and master address from SLURM's variables (docs/slurm.md).
#   sbatch --nodes=4 launch/sbatch_8gpu.sh configs/paper-112m.yaml data.path=/shared/data/mine train.run_dir=/shared/runs/exp1
# `fwpkm-launch slurm` does the same in one command, with checks and records; this file is for sites
# that want their own. Edit the partition/account lines; keep one task per GPU.
#SBATCH --job-name=fwpkm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120          # 2 minutes before the wall time: checkpoint on every rank, requeue
#SBATCH --requeue                  # fwpkm-train requeues the job itself after SIGUSR2 (train.max_requeues)
#SBATCH --open-mode=append         # a requeued job appends to the same log
#SBATCH --output=slurm-%j.out
##SBATCH --partition=gpu
##SBATCH --account=myproj
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/sbatch_8gpu.sh CONFIG [section.key=value ...]}
shift
# one task per GPU; a rank that fails ends the job instead of leaving the others waiting
srun --kill-on-bad-exit=1 fwpkm-train --config "$CONFIG" "$@"
