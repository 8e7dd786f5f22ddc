"""What both shard backends share: the epoch's tar order, the eval crop, the output dtype, and the
loader's bookkeeping (one rank's share, steps per epoch, where in the epoch it stands, which samples
the epoch has used, and how another layout goes on with the rest of it)."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimae_scale.config import Config
from mimae_scale.data.samples import SampleIds, pack, unpack
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
        self.epoch = 0
        self.batch_in_epoch = 0
        # Train only: global sample ids, and the current epoch's pass (mimae_scale.data.samples)
        self.ids = SampleIds(shards) if train else None
        self._trace = None  # data.trace_samples: this rank's record of every sample it hands out
        if train and cfg.data.trace_samples:
            path = Path(cfg.run_dir) / "samples" / f"rank{rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._trace = open(path, "a")  # noqa: SIM115 (open for the loader's lifetime)
        self._full_pass()
        self._setup_backend()

    # -- the epoch's pass ---------------------------------------------------------------------

    def _full_pass(self) -> None:
        """Every usable sample, in this epoch's order, split into contiguous per-rank shares."""
        self.remaining: np.ndarray | None = None  # None: the whole epoch; else the ids this pass reads
        self.seen = np.zeros(self.num_samples, dtype=bool) if self.train else None  # used this epoch
        self.share_sizes = shard_sizes(self.num_samples, self.world_size)  # real samples of each rank
        self.pass_batches = self.steps_per_epoch

    def _next_epoch(self) -> None:
        """The pass is over: the next iter() starts the next epoch (train) or the same pass again (eval)."""
        self.batch_in_epoch = 0
        if self.train:
            self.epoch += 1
            self._full_pass()

    @property
    def batches_left(self) -> int:
        """Batches this pass still yields (the trainer ends its epoch when fewer than a step's are left)."""
        return self.pass_batches - self.batch_in_epoch

    def _padding_batch(self) -> dict[str, torch.Tensor]:
        """A batch of padding rows only (``valid`` all False): the tail of a pass stretched to whole steps."""
        size, b = self.cfg.model.img_size, self.batch_size
        return {"images": torch.zeros(b, self.cfg.model.in_chans, size, size, dtype=self.dtype, device=self.device),
                "labels": torch.zeros(b, dtype=torch.int64, device=self.device),
                "valid": torch.zeros(b, dtype=torch.bool, device=self.device)}

    @property
    def tracing(self) -> bool:
        return self._trace is not None

    def _mark_seen(self, ids: list[int], names: list[str] | None) -> None:
        """The samples of a batch's real rows are used: mark them (and trace ``names``, when tracing)."""
        self.seen[ids] = True
        if self.tracing:
            record = {"world_size": self.world_size, "epoch": self.epoch, "rest": self.remaining is not None,
                      "batch": self.batch_in_epoch, "samples": names}
            self._trace.write(json.dumps(record) + "\n")
            self._trace.flush()

    def continue_epoch(self, states: list[dict[str, Any]], steps_left: int, accumulation: int) -> dict[str, int]:
        """Go on with the epoch that every rank of another layout stopped in (their ``state_dict()``s):
        a pass over the samples none of them used, split over this layout's ranks, ``steps_left``
        optimiser steps of ``accumulation`` batches long (longer if those cannot hold it). Returns
        what the log says: the epoch, samples used before, samples left, samples read twice (none)."""
        for state in states:
            self._check_source(state, ("num_samples",), "resume with the same shards")
        epoch = int(states[0]["epoch"])
        if any(int(s["epoch"]) != epoch for s in states):
            raise ValueError(f"data loader states disagree on the epoch: {[s['epoch'] for s in states]}")
        seen = np.zeros(self.num_samples, dtype=bool)
        for state in states:
            seen |= unpack(state["seen"], self.num_samples)
        self.epoch, self.batch_in_epoch = epoch, 0
        self._full_pass()
        left = int((~seen).sum())
        if left == self.num_samples:  # the epoch had not started
            return {"epoch": epoch, "used": 0, "left": left, "repeated": 0}
        if left == 0:  # it had ended: the next one starts as usual
            self._next_epoch()
            return {"epoch": epoch, "used": self.num_samples, "left": 0, "repeated": 0}
        if left < self.world_size:
            raise ValueError(f"epoch {epoch} has {left} samples left, fewer than the {self.world_size} ranks; "
                             "resume it on fewer ranks")
        self.seen, self.remaining = seen, ~seen
        self.share_sizes = shard_sizes(left, self.world_size)
        needed = padded_steps(left, self.world_size, self.batch_size)
        self.pass_batches = max(steps_left, math.ceil(needed / accumulation)) * accumulation
        return {"epoch": epoch, "used": self.num_samples - left, "left": left, "repeated": 0}

    def _check_source(self, state: dict[str, Any], must_match: tuple[str, ...], hint: str) -> None:
        if state.get("backend") != self.BACKEND:
            raise ValueError(f"data loader state is from backend {state.get('backend')!r}, this is {self.BACKEND!r}")
        for key in must_match:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]}, this run has {getattr(self, key)}; {hint}"
                )

    def _setup_backend(self) -> None:
        """The backend's own state (thread pools, pipelines), after the shared bookkeeping above."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _position_state(self) -> dict[str, Any]:
        """Where the loader stands and what it reads: the part of ``state_dict()`` both backends share.
        ``seen``/``remaining``: packed bitmaps over the sample ids (None for eval / a whole epoch)."""
        return {
            "backend": self.BACKEND,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "pass_batches": self.pass_batches,
            "seen": pack(self.seen),
            "remaining": pack(self.remaining),
        }

    def _load_position(self, state: dict[str, Any], must_match: tuple[str, ...], hint: str) -> None:
        """Refuse a state saved by another backend or for other ``must_match`` settings (with
        ``hint``), else take its position."""
        self._check_source(state, must_match, hint)
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._full_pass()
        if self.train:
            self.seen = unpack(state["seen"], self.num_samples)
            self.remaining = unpack(state["remaining"], self.num_samples)
            if self.remaining is not None:
                self.share_sizes = shard_sizes(int(self.remaining.sum()), self.world_size)
            self.pass_batches = int(state["pass_batches"])
