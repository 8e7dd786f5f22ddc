#!/usr/bin/env bash
# MAE's ViT-B/16 end-to-end fine-tuning on ImageNet-1k, 100 epochs, global batch 1024 (the MAE paper
# reports 83.6% top-1 from its 1600-epoch encoder).
#
#   MIMAE_INIT=/shared/runs/mimae_vit_b16_400ep sbatch [--nodes=N ...] launch/finetune_vit_b_100ep.sh [key.sub=value ...]
#
# MIMAE_INIT: the pretrained encoder (a pretraining run dir, a checkpoint tag folder, or a file written by
# mimae-export); MIMAE_DATA / MIMAE_VAL_DATA: labelled train and val shard sets (docs/FINETUNE.md).
# 4 nodes x 8 GPUs = 32 ranks: 32 images per GPU, no accumulation.
# Site settings (MIMAE_* environment variables), requeue on preemption and the rest: launch/common.sh.
#SBATCH --job-name=finetune_vit_b16_100ep
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

mimae_launch finetune_vit_b16 finetune_vit_b16_100ep 1024 32 "$@"
