"""Few-label evaluation: a stratified share of the training labels, then end-to-end fine-tuning.

The fine-tuning is the engine's ``task: finetune`` run in one process on images held in memory, built
from the same pieces: timm's ViT classifier (``build_classifier``), the encoder loaded and checked by
``load_encoder``, AdamW with timm's layer-decay groups (``build_optimizer``), the warm-up + cosine
schedule (``LRSchedule``) times each group's ``lr_scale``, and ``BatchAugment``'s soft targets. What it
leaves out, because a few hundred labelled images are not ImageNet: RandAugment, Mixup/CutMix and random
erasing (MAE's recipe sets them for 1.28M labels; here label smoothing alone). Training views are
random-resized crops (``data.crop_scale``, ``data.crop_ratio``; flips when ``data.hflip``) of the
evaluation view (resize, centre crop), so one tensor of images serves both.

Used by ``mimae-eval compare --label-fraction F --finetune`` (``make demo``) and ``mimae-ablate``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mimae_scale.config import Config

FINETUNE_BATCH = 64


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``fraction`` of the rows, the same share of every class (at least one each), seeded."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique(sorted=True):
        rows = (labels == c).nonzero().flatten()
        take = max(1, round(fraction * len(rows)))
        keep.append(rows[torch.randperm(len(rows), generator=gen)[:take]])
    return torch.cat(keep).sort().values


def crop_views(images: torch.Tensor, cfg: Config, gen: torch.Generator, size: int | None = None) -> torch.Tensor:
    """A random-resized crop (``data.crop_scale``, ``data.crop_ratio``; a flip with ``data.hflip``) of
    each image, resized to ``size`` x ``size`` (default: the image's own size), in float."""
    d = cfg.data
    n, c, h, w = images.shape
    out_h, out_w = (size, size) if size else (h, w)
    area = torch.empty(n).uniform_(*d.crop_scale, generator=gen) * h * w
    ratio = torch.empty(n).uniform_(math.log(d.crop_ratio[0]), math.log(d.crop_ratio[1]), generator=gen).exp()
    cw = (area * ratio).sqrt().round().clamp(1, w)
    ch = (area / ratio).sqrt().round().clamp(1, h)
    x0 = (torch.rand(n, generator=gen) * (w - cw + 1)).floor()
    y0 = (torch.rand(n, generator=gen) * (h - ch + 1)).floor()
    # one affine grid per image: crop box -> output square, flipped horizontally half the time
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if d.hflip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w * flip
    theta[:, 1, 1] = ch / h
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def classifier_config(cfg: Config, num_classes: int, base_lr: float, steps: int) -> Config:
    """The fine-tuning config of ``cfg``'s encoder shape (a pretraining run's config will do)."""
    ft = dataclasses.replace(cfg.finetune, init="", num_classes=num_classes, global_pool="avg",
                             drop_path_rate=0.1, layer_decay=0.75, rand_augment="", reprob=0.0, mixup=0.0,
                             cutmix=0.0, label_smoothing=0.1, ema_decay=None)
    optim = dataclasses.replace(cfg.optim, name="adamw", base_lr=base_lr, weight_decay=0.05, betas=(0.9, 0.999),
                                min_lr=1e-6, clip_grad=None, warmup_epochs=0.1)
    train = dataclasses.replace(cfg.train, epochs=1, global_batch=FINETUNE_BATCH, micro_batch=FINETUNE_BATCH)
    # the schedule's "epoch" is the whole run here: warm-up over its first 10% of steps
    return dataclasses.replace(cfg, task="finetune", finetune=ft, optim=optim, train=train, run_dir=f"<{steps} steps>")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def train_classifier(encoder: dict[str, torch.Tensor] | None, cfg: Config, images: torch.Tensor,
                     labels: torch.Tensor, num_classes: int, *, base_lr: float, steps: int, seed: int) -> nn.Module:
    """timm's classifier fine-tuned from ``encoder`` (timm-named tensors; None: timm's random
    initialisation) on (images, labels), normalised evaluation views."""
    from mimae_scale.engine.optim import LRSchedule, build_optimizer
    from mimae_scale.engine.tasks import BatchAugment, soft_target_loss
    from mimae_scale.model.classifier import build_classifier, load_encoder

    ft_cfg = classifier_config(cfg, num_classes, base_lr, steps)
    torch.manual_seed(seed)
    model = build_classifier(ft_cfg)
    if encoder is not None:
        load_encoder(model, dict(encoder), ft_cfg, "the encoder under evaluation")
    optimizer = build_optimizer(model, ft_cfg, wrapped_by_deepspeed=False, device=torch.device("cpu"))
    schedule = LRSchedule.from_config(ft_cfg, steps_per_epoch=steps)
    augment = BatchAugment(ft_cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        rows = torch.randint(len(images), (FINETUNE_BATCH,), generator=gen)
        x, soft = augment(crop_views(images[rows], ft_cfg, gen), labels[rows])
        loss = soft_target_loss(model(x), soft).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def finetune(encoder: dict[str, torch.Tensor] | None, cfg: Config, images: torch.Tensor, labels: torch.Tensor,
             scored: dict[str, tuple[torch.Tensor, torch.Tensor]], *, base_lr: float, steps: int,
             seed: int) -> dict[str, float]:
    """``train_classifier``, then top-1 on each of ``scored``'s (images, labels)."""
    num_classes = max([int(labels.max()) + 1, *(int(y.max()) + 1 for _, y in scored.values())])
    model = train_classifier(encoder, cfg, images, labels, num_classes, base_lr=base_lr, steps=steps, seed=seed)
    return {name: (predict(model, x) == y).float().mean().item() for name, (x, y) in scored.items()}
