"""The training precision (``engine.precision``): one place decides what each mode means.

- ``bf16``: DeepSpeed's bf16 mode. Every parameter is cast to bf16 (LayerNorm's included; DeepSpeed
  0.19 keeps buffers such as the sin-cos positions in fp32, older versions cast those too) and the
  optimiser keeps an fp32 master copy; images arrive in bf16.
- ``amp``: fp32 weights and buffers (DeepSpeed sees an fp32 model), the forward runs under
  ``torch.autocast(bf16)``: matmuls and convolutions in bf16, norms, softmax and losses in fp32.
  Images arrive in fp32. Costs a bf16 copy of each weight per forward, keeps the positions exact.
- ``fp32``: everything fp32 (the CPU default).
- ``auto``: ``bf16`` on a GPU, ``fp32`` on a CPU (bf16 matmuls are slow on most CPUs); with LARS
  (``optim.name: lars``) ``amp`` on a GPU, since DeepSpeed's bf16 mode would hand LARS flat fp32
  partitions instead of layers (config.validate refuses ``bf16`` with LARS).
"""

from __future__ import annotations

import contextlib

import torch

from mimae_scale.config import Config


def resolve_precision(cfg: Config, device: torch.device) -> str:
    precision = cfg.engine.precision
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "amp" if cfg.optim.name == "lars" else "bf16"
    return precision


def deepspeed_bf16(precision: str) -> bool:
    """Whether DeepSpeed runs its bf16 mode (``bf16`` only: ``amp`` hands it an fp32 module)."""
    return precision == "bf16"


def input_dtype(precision: str) -> torch.dtype:
    """The dtype the images are handed to the model in."""
    return torch.bfloat16 if deepspeed_bf16(precision) else torch.float32


def training_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The training images' dtype on ``device`` (what the loaders hand over)."""
    return input_dtype(resolve_precision(cfg, device))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the forward runs in: bf16 autocast for ``amp``, nothing otherwise."""
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
