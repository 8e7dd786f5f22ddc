"""DeepSpeed's configuration, generated from ours (one source of truth: ``Config``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mimae_scale.config import Config
from mimae_scale.precision import deepspeed_bf16

# We print our own progress line and metrics; DeepSpeed's would duplicate them every N steps.
_NEVER = 2**62


# Our engine.* communication settings and DeepSpeed's names for them (docs/SCALING.md).
_ZERO_TUNING = {
    "overlap_comm": "overlap_comm",
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
}


def zero_optimization(cfg: Config) -> dict[str, Any]:
    """The ZeRO section: the stage, plus only the tuning the config sets (DeepSpeed's defaults otherwise)."""
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    for ours, theirs in _ZERO_TUNING.items():
        value = getattr(cfg.engine, ours)
        if value is not None:
            zero[theirs] = value
    return zero


def build_ds_config(cfg: Config, accumulation: int, precision: str) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``, given the run's ``config.grad_accumulation`` and
    ``precision.resolve_precision``. Batch sizes are images: global = micro-batch x world size x
    accumulation steps, which DeepSpeed checks again."""
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero_optimization(cfg),
        "bf16": {"enabled": deepspeed_bf16(precision)},  # amp: an fp32 module to DeepSpeed, autocast in our forward
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # our checkpoint tags are "step_<n>", identical on every rank by construction
        "checkpoint": {"tag_validation": "FAIL"},
        # always explicit: DeepSpeed clips at 1.0 unless told otherwise, MAE's recipe does not clip
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
    }


def write_ds_config(ds: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")
