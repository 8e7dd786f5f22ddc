#!/usr/bin/env bash
# MAE ViT-B/16 baseline (one mask, no MI terms), 1600 epochs, global batch 4096 images.
#
#   sbatch [--nodes=N --ntasks-per-node=G --gpus-per-node=G] [--partition=P --account=A] \
#          launch/mae_vit_b_1600ep.sh [key.sub=value ...]
#
# 2 nodes x 8 GPUs = 16 ranks: 256 images per GPU in one micro-batch (MIMAE_MAX_MICRO_BATCH 256).
# Site settings (MIMAE_* environment variables), requeue on preemption and the rest: launch/common.sh.
#SBATCH --job-name=mae_vit_b16_1600ep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# Slurm runs a copy of this script from its spool directory: find the checkout from the submitted path.
if [[ -z "${MIMAE_REPO:-}" ]]; then
  submitted=""
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    submitted=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p') || true
  fi
  MIMAE_REPO=$(cd "$(dirname "${submitted:-${BASH_SOURCE[0]}}")/.." && pwd)
fi
export MIMAE_REPO
# shellcheck source=launch/common.sh
source "$MIMAE_REPO/launch/common.sh"

mimae_launch mae_vit_b16 mae_vit_b16_1600ep 4096 256 "$@"
