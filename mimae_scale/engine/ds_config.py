"""DeepSpeed's configuration, generated from ours (one source of truth: ``Config``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mimae_scale.config import Config, grad_accumulation

# We print our own progress line and metrics; DeepSpeed's would duplicate them every N steps.
_NEVER = 2**62


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """``auto`` means bf16 on a GPU and fp32 on a CPU (bf16 matmuls are slow on most CPUs)."""
    precision = cfg.engine.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_ds_config(cfg: Config, world_size: int, device: torch.device) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``. Batch sizes are images:
    global = micro-batch x world size x accumulation steps, which DeepSpeed checks again."""
    accumulation = grad_accumulation(cfg, world_size)  # raises ConfigError if the batch does not split
    precision = resolve_precision(cfg, device)
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # our checkpoint tags are "step_<n>", identical on every rank by construction
        "checkpoint": {"tag_validation": "FAIL"},
        # always explicit: DeepSpeed clips at 1.0 unless told otherwise, MAE's recipe does not clip
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
    }


def write_ds_config(ds: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")
