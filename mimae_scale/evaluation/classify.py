"""Top-1/top-5 of a classifier on held-out shards, exact over any number of ranks.

The evaluation loader gives every held-out sample to exactly one rank (its other rows are padding,
``valid`` False), so summing each rank's correct counts over valid rows and all-reducing the sums
counts every sample once: the result equals one process's, whatever the set's size and the ranks.
Collective: every rank calls it (under ZeRO 3 the forward gathers the parameters on all ranks).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def evaluate_classifier(model, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
                        ) -> dict[str, float | int]:
    """``{"top1", "top5", "loss", "samples", "seconds"}`` (cross-entropy without smoothing), the same on
    every rank. ``model``: a DeepSpeed engine or a plain module (the EMA); left in its former mode."""
    start = time.perf_counter()
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, samples
    dtype = next(module.parameters()).dtype
    try:
        for batch in batches:
            logits = model(batch["images"].to(device, dtype)).float()
            labels = batch["labels"].to(device)
            valid = batch.get("valid", torch.ones_like(labels, dtype=torch.bool)).to(device)
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            loss = F.cross_entropy(logits, labels, reduction="none")
            sums += torch.stack([(ranked[:, 0] & valid).sum(), (ranked.any(dim=1) & valid).sum(),
                                 (loss * valid).sum(), valid.sum()]).double()
    finally:
        module.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    top1, top5, loss, count = sums.tolist()
    if count == 0:
        raise RuntimeError("the held-out loader yielded no labelled sample")
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "samples": int(count),
            "seconds": time.perf_counter() - start}
