"""Input pipelines. Every backend yields the same batches and saves the same kind of state.

A train loader (see :class:`TrainLoader`) yields ``{"images": (B, C, H, W) float, "labels": (B,)
int64}`` with B = ``cfg.train.micro_batch``, exactly ``steps_per_epoch`` batches per pass, and
each new ``iter()`` starts the next epoch. ``state_dict()`` / ``load_state_dict()`` capture where
it stands, so a resumed run sees the same next batches as one that never stopped.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mimae_scale.config import Config


class TrainLoader(Protocol):
    steps_per_epoch: int

    def __iter__(self): ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_train_loader(cfg: Config, rank: int, world_size: int, device: torch.device) -> TrainLoader:
    """The configured backend for this rank's share of the training data."""
    if cfg.data.backend == "synthetic":
        from mimae_scale.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, rank, world_size, device)
    raise NotImplementedError(f"data.backend {cfg.data.backend!r} is not available yet")
