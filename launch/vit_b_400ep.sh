#!/usr/bin/env bash
# MI-MAE ViT-B/16 (K 4 orthogonal masks), 400 epochs, global batch 4096 images: the paper's headline schedule.
#
#   sbatch [--nodes=N --ntasks-per-node=G --gpus-per-node=G] [--partition=P --account=A] \
#          launch/vit_b_400ep.sh [key.sub=value ...]
#
# 4 nodes x 8 GPUs = 32 ranks: 128 images per GPU split into micro-batches of at most
# MIMAE_MAX_MICRO_BATCH (64) with accumulation 2.
# Site settings (MIMAE_* environment variables), requeue on preemption and the rest: launch/common.sh.
#SBATCH --job-name=mimae_vit_b16_400ep
#SBATCH --nodes=4
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

mimae_launch mimae_vit_b16 mimae_vit_b16_400ep 4096 64 "$@"
