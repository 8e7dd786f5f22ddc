"""What the one trainer trains (``cfg.task``): the model, its loss on a micro-batch, and what is
evaluated at an epoch's end. Everything else (DeepSpeed, the loop, checkpoints, signals, metrics,
the loaders) is the trainer's and the same for every task.

- ``pretrain``: MI-MAE (or MAE) on K masks per image, CLUB's critic beside it, the online kNN monitor;
- ``finetune`` / ``linprobe``: timm's ViT classifier (mimae_scale.model.classifier) trained with soft
  targets (Mixup/CutMix, label smoothing; timm's), random erasing on the batch, top-1/top-5 on the
  held-out shards every ``finetune.eval_every_epochs`` epochs, and the optional weight EMA.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimae_scale.config import Config, ConfigError
from mimae_scale.engine.distributed import DistEnv

log = logging.getLogger("mimae_scale.engine")


class StepLoss(NamedTuple):
    loss: torch.Tensor  # what the engine's backward takes
    terms: dict[str, torch.Tensor]  # logged beside it (loss_<term> in metrics.jsonl)


class PretrainTask:
    """MI-MAE: the model's own forward is the objective; CLUB's q is a critic outside the engine."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, fresh: bool) -> None:
        from mimae_scale.model import build_model
        from mimae_scale.model.club import ClubCritic
        from mimae_scale.model.compile import compile_blocks

        self.cfg, self.env, self.device = cfg, env, device
        self.model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
        if cfg.engine.compile:
            compile_blocks(self.model)
        # CLUB's q: outside the engine, with its own optimiser (mimae_scale.model.club)
        self.critic = ClubCritic(cfg, device) if cfg.loss.w_min > 0 else None

    def register(self, state) -> None:
        if self.critic is not None:
            state.register("critic", self.critic, replicated=True)  # the same q on every rank

    def forward(self, engine, batch: dict[str, torch.Tensor], images: torch.Tensor, generator: torch.Generator,
                steps_done: int, steps_per_epoch: int) -> StepLoss:
        from mimae_scale.model.club import min_weight

        out = engine(images, generator=generator, valid=batch.get("valid"), critic=self.critic,
                     w_min=min_weight(self.cfg, steps_done, steps_per_epoch))
        return StepLoss(out.loss, out.terms)

    def after_step(self, engine, step: int) -> None:
        pass

    def synchronise(self, engine) -> None:
        pass  # MI-MAE's buffers (the fixed positions) are the same on every rank

    def evaluate(self, engine, epochs_done: int, at_epoch_end: bool, final: bool) -> dict[str, float | int]:
        """Every ``eval.knn_every_epochs`` epochs: kNN top-1 of the encoder on ``data.val_shards``."""
        from mimae_scale.evaluation.online import knn_due, online_knn

        if not at_epoch_end or not knn_due(self.cfg, epochs_done):
            return {}
        result = online_knn(engine.module, self.cfg, self.env.rank, self.env.world_size, self.device)
        log.info("online kNN after epoch %d: top-1 %.4f on %d held-out images (%.1f s)", epochs_done,
                 result["knn_top1"], result["knn_samples"], result["knn_seconds"])
        return result


def check_labels(cfg: Config) -> None:
    """Refuse, in one line naming the shards, labels the head cannot take: another class count in a
    manifest. (Shards without a labelled sample are refused by ``resolve_shards`` itself.)"""
    from mimae_scale.data.shardset import resolve_shards

    classes = cfg.finetune.num_classes
    for field, spec in (("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards)):
        if not spec or (field == "data.train_shards" and cfg.data.backend == "synthetic"):
            continue
        shards = resolve_shards(spec, field)
        if shards.classes is not None and len(shards.classes) != classes:
            raise ConfigError(f"finetune.num_classes: {classes}, but {field} ({spec}) has {len(shards.classes)} "
                              "classes in its manifest")


class BatchAugment:
    """The training augmentations that need the whole batch, in timm's training-loop order: random
    erasing (``finetune.reprob``, per image, mode pixel), then Mixup/CutMix with label smoothing. Gives
    the images and their soft targets, (B, num_classes) rows that sum to 1. A linear probe uses neither
    (MAE's probe: crop and flip only) and takes plain one-hot targets."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        ft, probe = cfg.finetune, cfg.task == "linprobe"
        self.classes = ft.num_classes
        self.smoothing = 0.0 if probe else ft.label_smoothing
        erase = ft.reprob > 0 and not probe
        self.erasing = RandomErasing(ft.reprob, mode="pixel", device=str(device)) if erase else None
        self.mixup = (Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                            num_classes=ft.num_classes)
                      if (ft.mixup > 0 or ft.cutmix > 0) and not probe else None)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            return self.mixup(images, labels)
        off = self.smoothing / self.classes
        soft = torch.full((labels.shape[0], self.classes), off, device=images.device)
        return images, soft.scatter_(1, labels[:, None], 1.0 - self.smoothing + off)


def soft_target_loss(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against soft targets (timm's SoftTargetCrossEntropy before its mean), in fp32."""
    return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1)


class ClassifyTask:
    """Fine-tuning or linear probing of timm's ViT classifier, MAE's recipe."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, fresh: bool) -> None:
        from mimae_scale.model.classifier import build_classifier, load_pretrained

        self.cfg, self.env, self.device = cfg, env, device
        ft = cfg.finetune
        check_labels(cfg)
        self.model = build_classifier(cfg)
        if fresh and ft.init:  # a resumed run takes every weight from its checkpoint
            keys = load_pretrained(self.model, cfg)
            log.info("encoder from %s; initialised here: %s; not used: %s", ft.init,
                     ", ".join(keys["missing"]) or "none", ", ".join(keys["unused"]) or "none")
        elif fresh:
            log.warning("finetune.init is empty: the classifier starts from a random initialisation")
        self.augment = BatchAugment(cfg, device)
        self.ema = None
        if ft.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=ft.ema_decay, device=device)
        self._val = None  # the held-out loader, built at the first evaluation and kept

    def register(self, state) -> None:
        if self.ema is not None:
            state.register("ema", _EmaState(self.ema), replicated=True)

    def forward(self, engine, batch: dict[str, torch.Tensor], images: torch.Tensor, generator: torch.Generator,
                steps_done: int, steps_per_epoch: int) -> StepLoss:
        labels = batch["labels"].to(images.device)
        classes = self.cfg.finetune.num_classes
        # asynchronous on the GPU (no host wait); a manifest's class count was checked at start
        torch._assert_async(((labels >= 0) & (labels < classes)).all(),
                            f"finetune.num_classes: a training label lies outside [0, {classes})")
        images, soft = self.augment(images, labels)
        logits = engine(images)
        per_row = soft_target_loss(logits, soft)
        valid = batch.get("valid")
        if valid is None:
            return StepLoss(per_row.mean(), {})
        weight = valid.to(per_row.dtype)  # padding rows enter no loss
        return StepLoss((per_row * weight).sum() / weight.sum().clamp(min=1.0), {})

    def after_step(self, engine, step: int) -> None:
        if self.ema is not None:
            self.ema.update(engine.module, step=step)

    def synchronise(self, engine) -> None:
        """Average the floating-point buffers (a probe's BatchNorm statistics) over the ranks. Each rank
        updates its own from its own batches, and DeepSpeed, unlike DDP, never broadcasts buffers; the
        trainer calls this before an evaluation and a save, so every rank evaluates and the checkpoint
        holds the same statistics (a resumed run continues from exactly those)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        modules = [engine.module] + ([self.ema.module] if self.ema is not None else [])
        for buffer in (b for m in modules for b in m.buffers() if b.is_floating_point()):
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())

    def evaluate(self, engine, epochs_done: int, at_epoch_end: bool, final: bool) -> dict[str, float | int]:
        """Top-1/top-5 on ``data.val_shards`` every ``finetune.eval_every_epochs`` epochs and at the end."""
        from mimae_scale.data import build_eval_loader
        from mimae_scale.evaluation.classify import evaluate_classifier

        every = self.cfg.finetune.eval_every_epochs
        if not final and not (at_epoch_end and every and epochs_done % every == 0):
            return {}
        if self._val is None:
            self._val = build_eval_loader(self.cfg, self.cfg.data.val_shards, self.env.rank, self.env.world_size,
                                          self.device)
        result = {f"val_{k}": v for k, v in evaluate_classifier(engine, self._val, self.device).items()}
        if self.ema is not None:
            ema = evaluate_classifier(self.ema.module, self._val, self.device)
            result.update({"ema_val_top1": ema["top1"], "ema_val_top5": ema["top5"]})
        log.info("epoch %d: val top-1 %.4f, top-5 %.4f on %d held-out images (%.1f s)%s", epochs_done,
                 result["val_top1"], result["val_top5"], result["val_samples"], result["val_seconds"],
                 f"; EMA top-1 {result['ema_val_top1']:.4f}" if self.ema is not None else "")
        return result


class _EmaState:
    """The EMA weights as a replicated TrainState component."""

    def __init__(self, ema) -> None:
        self.ema = ema

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)


def build_task(cfg: Config, env: DistEnv, device: torch.device, fresh: bool) -> PretrainTask | ClassifyTask:
    """``cfg.task``'s model and objective; ``fresh``: no checkpoint to resume (load ``finetune.init``)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return (PretrainTask if cfg.task == "pretrain" else ClassifyTask)(cfg, env, device, fresh)
