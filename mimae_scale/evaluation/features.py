"""Frozen-encoder features of labelled batches: the input of the kNN and linear probes.

Works on any iterable of ``{"images": (B, C, H, W), "labels": (B,)}`` batches (the evaluation
loader, or tensors in memory), on whatever device the model is on. Rows whose ``"valid"`` flag is
False (the shard loaders' padding of a rank's last batch) are dropped, so every sample counts once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

Pool = Literal["cls", "mean"]


def pool_tokens(tokens: torch.Tensor, pool: Pool) -> torch.Tensor:
    """(B, 1+N, D) normed tokens -> (B, D): the cls token, or the mean of the patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    pool: Pool = "cls",
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, D) float32 CPU, labels (n,) int64 CPU) from ``model.forward_features``, pooled,
    or from ``model.image_features`` where it has one (the reference rows, mimae_scale.evaluation.reference).

    The model runs in eval mode (restored afterwards) in its own parameters' device and dtype (a
    model without parameters, as the references: the CPU in float32).
    ``progress`` names the set in a line printed to stderr every 50 batches.
    """
    param = next(model.parameters(), torch.empty(0))
    direct = getattr(model, "image_features", None)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for i, batch in enumerate(batches, 1):
            images = batch["images"].to(param.device, param.dtype, non_blocking=True)
            pooled = direct(images) if direct else pool_tokens(model.forward_features(images), pool)
            pooled = pooled.float().cpu()
            batch_labels = batch["labels"].reshape(-1).long().cpu()
            if "valid" in batch:
                valid = batch["valid"].reshape(-1).bool().cpu()
                pooled, batch_labels = pooled[valid], batch_labels[valid]
            feats.append(pooled)
            labels.append(batch_labels)
            if progress and i % 50 == 0:
                print(f"{progress}: {sum(len(y) for y in labels)} images", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"{progress or 'features'}: no batches")
    return torch.cat(feats), torch.cat(labels)
