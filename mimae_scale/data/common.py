"""What both shard backends share: the epoch's tar order, the eval crop, the output dtype, and the
loader's bookkeeping (one rank's share, steps per epoch, where in the epoch it stands)."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from mimae_scale.config import Config
from mimae_scale.data.shardset import ShardSet, padded_steps, shard_sizes
from mimae_scale.precision import training_dtype

log = logging.getLogger(__name__)

EVAL_CROP_FRACTION = 0.875  # eval: resize the shorter side to size / 0.875, centre crop (ImageNet protocol)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host batch to the device without stalling the host: from pinned memory, non-blocking.
    (A copy from pageable memory is synchronous whatever ``non_blocking`` says.)"""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)


def tar_order(seed: int, epoch: int, num_tars: int) -> list[int]:
    """The epoch's tar order, identical on every rank (and for both shard backends)."""
    order = list(range(num_tars))
    random.Random(f"{seed}-tars-{epoch}").shuffle(order)
    return order


class ShardLoader:
    """One rank's loader over a shard set (train: augmented, a new order every epoch; eval:
    deterministic, fixed order). The backends (DALI, webdataset) add the reading and decoding."""

    BACKEND = ""  # the data.backend name, recorded in the saved state

    def __init__(
        self,
        cfg: Config,
        shards: ShardSet,
        rank: int,
        world_size: int,
        device: torch.device,
        *,
        batch_size: int,
        train: bool,
    ) -> None:
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.device, self.batch_size, self.train = device, batch_size, train
        self.dtype = training_dtype(cfg, device) if train else torch.float32
        self.num_samples = shards.num_samples
        self.steps_per_epoch = padded_steps(self.num_samples, world_size, batch_size)
        self.skipped_samples = shards.skipped  # samples without jpg/cls in the indexes: never read
        if shards.skipped:
            log.warning("%d samples lack a .jpg or .cls component and are skipped", shards.skipped)
        self.share_sizes = shard_sizes(self.num_samples, world_size)  # real samples of each rank
        self.epoch = 0
        self.batch_in_epoch = 0
        self._setup_backend()

    def _setup_backend(self) -> None:
        """The backend's own state (thread pools, pipelines), after the shared bookkeeping above."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _position_state(self) -> dict[str, Any]:
        """Where the loader stands and what it reads: the part of ``state_dict()`` both backends share."""
        return {
            "backend": self.BACKEND,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def _load_position(self, state: dict[str, Any], must_match: tuple[str, ...], hint: str) -> None:
        """Refuse a state saved by another backend or for other ``must_match`` settings (with
        ``hint``), else take its position."""
        if state.get("backend") != self.BACKEND:
            raise ValueError(f"data loader state is from backend {state.get('backend')!r}, this is {self.BACKEND!r}")
        for key in must_match:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]}, this run has {getattr(self, key)}; {hint}"
                )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
