"""What both shard backends share: the epoch's tar order, the eval crop, the output dtype."""

from __future__ import annotations

import random

import torch

from mimae_scale.config import Config

EVAL_CROP_FRACTION = 0.875  # eval: resize the shorter side to size / 0.875, centre crop (ImageNet protocol)


def training_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 images when the engine trains in bf16 (``engine.precision`` auto on a GPU), else fp32."""
    precision = cfg.engine.precision
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def tar_order(seed: int, epoch: int, num_tars: int) -> list[int]:
    """The epoch's tar order, identical on every rank (and for both shard backends)."""
    order = list(range(num_tars))
    random.Random(f"{seed}-tars-{epoch}").shuffle(order)
    return order
