"""MAE's linear probe on frozen, precomputed features.

The head is MAE's (``main_linprobe.py``): ``BatchNorm1d(D, affine=False, eps=1e-6)`` then a
``Linear(D, classes)`` initialised with std 0.01 and zero bias. What differs from MAE, and why:
features are computed once (deterministic resize + centre crop) instead of per augmented crop,
so one probe run costs seconds; the optimiser is SGD with momentum 0.9, no weight decay and a
cosine schedule instead of LARS, which MAE needs only for its 16384-image batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe_head(dim: int, num_classes: int) -> nn.Sequential:
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def _accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> float:
    head.eval()
    with torch.no_grad():
        correct = sum((head(features[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                      for i in range(0, features.shape[0], batch))
    return correct / features.shape[0]


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> nn.Sequential:
    """The probe head trained on (features, labels), in eval mode, on the features' device."""
    x, y = features.float(), labels.long().to(features.device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's initialisation
    head = linear_probe_head(x.shape[1], num_classes).to(x.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    total = epochs * math.ceil(x.shape[0] / batch_size)
    step = 0
    for _ in range(epochs):
        head.train()
        order = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for i in range(0, x.shape[0], batch_size):
            idx = order[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm cannot normalise a batch of one
                continue
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float | int]:
    """Train the probe on (train_features, train_labels); top-1 accuracy in [0, 1] on both sets."""
    device = torch.device(device)
    x, y = train_features.float().to(device), train_labels.long().to(device)
    xt, yt = test_features.float().to(device), test_labels.long().to(device)
    num_classes = int(max(y.max(), yt.max())) + 1
    head = fit_linear_probe(x, y, num_classes, epochs, batch_size, lr, seed)
    return {
        "top1": _accuracy(head, xt, yt), "train_top1": _accuracy(head, x, y),
        "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "n_train": int(x.shape[0]), "n_test": int(xt.shape[0]), "num_classes": num_classes,
    }
