"""The online kNN monitor's test inputs, identical in every process that asks with the same seed."""

from __future__ import annotations

import torch

from mimae_scale.config import Config, load_config
from mimae_scale.model import MIMAE, build_model


def knn_config() -> Config:
    return load_config("tiny", ["data.val_shards=/unused", "eval.knn_every_epochs=2"])


def model_and_data(cfg: Config, seed: int) -> tuple[MIMAE, torch.Tensor, torch.Tensor]:
    """The same model and 100 labelled images in every process that asks with the same seed."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (100,), generator=gen)
    return model, torch.randn(100, 3, 32, 32, generator=gen), labels
