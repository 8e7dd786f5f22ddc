"""Input pipelines. Every backend yields the same batches and saves the same kind of state.

A train loader (see :class:`TrainLoader`) yields ``{"images": (B, C, H, W) float, "labels": (B,)
int64}`` with B = ``cfg.train.micro_batch``, exactly ``steps_per_epoch`` batches per pass, and
each new ``iter()`` starts the next epoch. ``state_dict()`` / ``load_state_dict()`` capture where
it stands, so a resumed run sees the same next batches as one that never stopped; on another
number of ranks, ``continue_epoch(old ranks' states, ...)`` goes on with the samples of the
interrupted epoch that no rank used yet.

The shard backends (``dali``, ``webdataset``) also yield ``"valid": (B,) bool``: False marks the
padding rows of a rank's last batch of an epoch (repeats of a real sample, there so that every
rank runs the same number of full batches). Over one epoch the valid rows of all ranks are every
usable sample exactly once; ``steps_per_epoch = ceil(ceil(N / world_size) / micro_batch)`` for N
usable samples. ``loader.skipped_samples`` counts samples that could not be used (no .jpg/.cls in
the index; for ``webdataset`` also undecodable images, which become padding rows).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mimae_scale.config import Config
from mimae_scale.data import remote
from mimae_scale.data.cache import cached
from mimae_scale.data.shardset import resolve_shards


class TrainLoader(Protocol):
    steps_per_epoch: int  # batches of a whole epoch on this layout
    skipped_samples: int
    epoch: int

    @property
    def batches_left(self) -> int: ...  # batches the current pass still yields

    def __iter__(self): ...

    def continue_epoch(self, states: list[dict[str, Any]], steps_left: int, accumulation: int) -> dict[str, int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_train_loader(cfg: Config, rank: int, world_size: int, device: torch.device) -> TrainLoader:
    """The configured backend for this rank's share of the training data."""
    if cfg.data.backend == "synthetic":
        from mimae_scale.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, rank, world_size, device)
    return _shard_loader(
        cfg, cfg.data.backend, cfg.data.train_shards, "data.train_shards", rank, world_size, device,
        batch_size=cfg.train.micro_batch, train=True,
    )


def build_eval_loader(
    cfg: Config, shards: str, rank: int, world_size: int, device: torch.device, batch_size: int | None = None
):
    """Deterministic evaluation batches (resize shorter side to img_size/0.875, centre crop, no
    augmentation, fp32) over ``shards`` (e.g. ``cfg.data.val_shards``): each ``iter()`` is one pass in
    which the ``valid`` rows of all ranks are every sample exactly once. Uses ``data.backend``'s
    decoder (``dali`` or ``webdataset``; ``synthetic`` falls back to ``webdataset``)."""
    backend = "dali" if cfg.data.backend == "dali" else "webdataset"
    return _shard_loader(
        cfg, backend, shards, "eval shards", rank, world_size, device,
        batch_size=batch_size or cfg.train.micro_batch, train=False,
    )


def _shard_loader(
    cfg: Config, backend: str, spec: str, field: str, rank: int, world_size: int, device: torch.device, *,
    batch_size: int, train: bool,
):
    """``backend``'s loader over the shards ``spec`` names (``field``: the setting, for errors)."""
    if backend == "dali":  # imported on use: a webdataset-only install need not have DALI
        from mimae_scale.data.dali_loader import DaliLoader as loader_class
    elif backend == "webdataset":
        from mimae_scale.data.wds_loader import WdsLoader as loader_class
    else:
        raise ValueError(f"data.backend: unknown backend {backend!r}")
    remote.use_endpoint(cfg.data.s3_endpoint_url)
    shards = resolve_shards(spec, field, backend)
    if cfg.data.remote_cache and remote.is_remote(spec):
        shards = cached(shards, cfg.data.remote_cache, cfg.data.remote_cache_gb, f"{field}={spec!r}")
    return loader_class(cfg, shards, rank, world_size, device, batch_size=batch_size, train=train)
