"""The optimiser (AdamW, or LARS for linear probing) with MAE's parameter groups, learning-rate rule
and schedule. A group may carry ``lr_scale`` (layer-wise lr decay): the trainer sets its lr to
schedule(step) x lr_scale before every step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mimae_scale.config import Config

# Learned tokens and position embeddings are not decayed (MAE's recipe); in our model the
# position embeddings are fixed buffers, listed here so a learned variant stays covered.
_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices, and everything else (biases, norms, tokens)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf == "bias" or leaf in _NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def classifier_param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Fine-tuning: timm's layer-decay groups (``lr_scale`` = layer_decay^(depth + 1 - layer); cls token,
    positions and patch embedding are layer 0, the head depth + 1), no decay on 1-D tensors and tokens.
    Linear probing: the head's weight (LARS-adapted) and its bias (not adapted), no weight decay (MAE's)."""
    if cfg.task == "linprobe":
        head = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for _, p in head if p.ndim > 1], "weight_decay": 0.0, "always_adapt": True},
            {"params": [p for _, p in head if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
        ]
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay=cfg.optim.weight_decay,
                                    no_weight_decay_list=model.no_weight_decay(), layer_decay=cfg.finetune.layer_decay)


def peak_lr(cfg: Config) -> float:
    """MAE's linear scaling rule: lr = base_lr x global image batch / 256."""
    return cfg.optim.base_lr * cfg.train.global_batch / 256


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from 0, then a half-cycle cosine to ``min_lr``; a pure function of the step,
    so a resumed run needs no scheduler state."""

    peak: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int) -> LRSchedule:
        return cls(
            peak=peak_lr(cfg),
            min_lr=cfg.optim.min_lr,
            warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
            total_steps=cfg.train.epochs * steps_per_epoch,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteSkipping:
    """An optimiser that refuses a step whose gradients are not finite, the way DeepSpeed's own wrappers do.

    DeepSpeed wraps the client optimiser (ZeRO 1-3, bf16) in code that checks the gradients, skips a
    non-finite step on every rank and counts it in ``engine.skipped_steps``. With ZeRO 0 in fp32 it
    uses the client optimiser as is, so this class provides the same two attributes DeepSpeed reads
    (``overflow``, ``_global_grad_norm``). The gradients are already averaged over the ranks when
    ``step`` runs, so every rank reaches the same decision without talking to the others.
    """

    overflow: bool = False
    _global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self._global_grad_norm = norm.item()  # one host read per optimiser step, as DeepSpeed's ZeRO does
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        return super().step(closure)


class NonFiniteSkippingAdamW(NonFiniteSkipping, torch.optim.AdamW):
    pass


def _lars():
    from timm.optim import Lars

    class NonFiniteSkippingLars(NonFiniteSkipping, Lars):
        pass

    return NonFiniteSkippingLars


def build_optimizer(
    model: nn.Module, cfg: Config, wrapped_by_deepspeed: bool, device: torch.device
) -> torch.optim.Optimizer:
    """``wrapped_by_deepspeed``: whether DeepSpeed puts its own checking wrapper around it.

    On CUDA the update is torch's fused AdamW (one kernel over all tensors instead of a dozen per
    tensor). DeepSpeed's ZeRO 1-3 and bf16 wrappers call the client optimiser's ``step`` on their
    fp32 master partitions, which the fused kernel takes as they are. On CPU the plain loop.
    """
    groups = param_groups(model, cfg.optim.weight_decay) if cfg.task == "pretrain" else classifier_param_groups(
        model, cfg)
    # the lr is set before every step from LRSchedule; this value is only the initial one
    if cfg.optim.name == "lars":  # ZeRO 0 only (config.validate): DeepSpeed does not wrap it in fp32
        # MAE's LARS: momentum 0.9, trust coefficient 0.001, no clipping of the trust ratio
        return _lars()(groups, lr=peak_lr(cfg), momentum=0.9, trust_coeff=0.001)
    cls = torch.optim.AdamW if wrapped_by_deepspeed else NonFiniteSkippingAdamW
    return cls(groups, lr=peak_lr(cfg), betas=cfg.optim.betas, fused=device.type == "cuda")
