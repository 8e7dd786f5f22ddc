"""Random images of the model's size: a data-free backend for benchmarks and engine tests."""

from __future__ import annotations

from typing import Any

import torch

from mimae_scale.config import Config
from mimae_scale.precision import training_dtype


class SyntheticLoader:
    """Batch b of epoch e on rank r is a pure function of (seed, e, b, r): resuming is exact.

    The images are drawn on the device itself (a GPU run copies nothing from the host per step), in
    the training dtype, so the backend measures the model and not a host-to-device copy. A CPU and
    a CUDA generator draw different numbers from the same seed.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg = cfg
        self.rank = rank
        self.device = device
        self.dtype = training_dtype(cfg, device)
        self.steps_per_epoch = cfg.train.steps_per_epoch or 100
        self.epoch = 0
        self.batch_in_epoch = 0

    def _batch(self) -> dict[str, torch.Tensor]:
        m = self.cfg.model
        seed = hash((self.cfg.seed, self.epoch, self.batch_in_epoch, self.rank)) & 0x7FFFFFFF
        gen = torch.Generator(self.device).manual_seed(seed)
        b = self.cfg.train.micro_batch
        images = torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=gen, device=self.device)
        labels = torch.randint(0, 10, (b,), generator=gen, device=self.device)
        return {"images": images.to(self.dtype), "labels": labels}

    def __iter__(self):
        while self.batch_in_epoch < self.steps_per_epoch:
            batch = self._batch()
            self.batch_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batch_in_epoch = 0

    @property
    def batches_left(self) -> int:
        return self.steps_per_epoch - self.batch_in_epoch

    def continue_epoch(self, states: list[dict[str, Any]], steps_left: int, accumulation: int) -> dict[str, int]:
        """Another layout: go on in the same epoch with as many steps left (the images are made up)."""
        self.epoch = int(states[0]["epoch"])
        self.batch_in_epoch = max(self.steps_per_epoch - steps_left * accumulation, 0)
        return {"epoch": self.epoch, "used": 0, "left": 0, "repeated": 0}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "pass_batches": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
