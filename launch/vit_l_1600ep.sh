#!/usr/bin/env bash
# MI-MAE ViT-L/16 (K 4 orthogonal masks), 1600 epochs, global batch 4096 images: the flagship run.
#
#   sbatch [--nodes=N --ntasks-per-node=G --gpus-per-node=G] [--partition=P --account=A] \
#          launch/vit_l_1600ep.sh [key.sub=value ...]
#
# 8 nodes x 8 GPUs = 64 ranks: 64 images per GPU, no accumulation. On fewer GPUs the micro-batch
# is capped at MIMAE_MAX_MICRO_BATCH (64; 128 fits an 80 GB card) and accumulation makes up the rest.
# Site settings (MIMAE_* environment variables), requeue on preemption and the rest: launch/common.sh.
#SBATCH --job-name=mimae_vit_l16_1600ep
#SBATCH --nodes=8
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

mimae_launch mimae_vit_l16 mimae_vit_l16_1600ep 4096 64 "$@"
