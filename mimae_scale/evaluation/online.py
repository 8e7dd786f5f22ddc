"""The online kNN monitor: how well the encoder's features separate the held-out classes, mid-training.

Every ``cfg.eval.knn_every_epochs`` epochs the trainer calls :func:`online_knn`. Each rank embeds
its share of ``cfg.data.val_shards`` (the evaluation loader gives every sample to exactly one
rank), the features are gathered to every rank, and each held-out sample is classified by its
k nearest *other* held-out samples (leave-one-out weighted kNN, k = ``eval.knn_k``, T =
``eval.knn_temperature``). Leave-one-out needs no pass over the training set, so the monitor costs
one forward pass over the held-out set; its numbers track, but are not equal to, the offline
``mimae-eval knn`` (which classifies the held-out set by the training set).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from mimae_scale.config import Config
from mimae_scale.evaluation.features import extract_features
from mimae_scale.evaluation.knn import knn_evaluate


def knn_due(cfg: Config, epochs_done: int) -> bool:
    """Whether the monitor runs after ``epochs_done`` complete epochs."""
    every = cfg.eval.knn_every_epochs
    return every > 0 and epochs_done > 0 and epochs_done % every == 0


def _gathered_root_parameters(model: nn.Module):
    """Under ZeRO-3 a module's own parameters are gathered by its forward hook, which only
    ``model(...)`` fires; ``forward_features`` reads ``cls_token`` directly, so gather it here.
    Below ZeRO-3 this is a no-op."""
    own = list(model.parameters(recurse=False))
    if not any(hasattr(p, "ds_id") for p in own):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(own, modifier_rank=None)


def _all_gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ) on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.to(device)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)]).cpu()


def online_knn(
    model: nn.Module,
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
) -> dict[str, float | int]:
    """``{"knn_top1", "knn_top5" (>= 5 classes), "knn_samples", "knn_seconds"}``, the same on every rank.

    ``model`` is the bare MIMAE (``engine.module``); ``batches`` defaults to
    ``build_eval_loader(cfg, cfg.data.val_shards, rank, world_size, device)``. Collective: every
    rank must call it.
    """
    start = time.perf_counter()
    device = device or next(model.parameters()).device
    if batches is None:
        from mimae_scale.data import build_eval_loader

        batches = build_eval_loader(cfg, cfg.data.val_shards, rank, world_size, device)
    with _gathered_root_parameters(model):
        feats, labels = extract_features(model, batches, cfg.eval.pool)
    # gloo gathers CPU tensors, NCCL device tensors
    comm_device = device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
    feats = _all_gather_rows(feats, comm_device)
    labels = _all_gather_rows(labels, comm_device)
    result = knn_evaluate(feats.to(device), labels.to(device), None, None, cfg.eval.knn_k, cfg.eval.knn_temperature)
    out: dict[str, float | int] = {"knn_top1": result["top1"], "knn_samples": int(labels.shape[0])}
    if "top5" in result:
        out["knn_top5"] = result["top5"]
    out["knn_seconds"] = time.perf_counter() - start
    return out
