"""The DALI input pipeline: WebDataset shards -> decoded, augmented, normalised CHW batches.

Reader: ``fn.readers.webdataset`` on the shard set's DALI index files, this rank's share of the
samples (``shard_id=rank``, ``num_shards=world_size``), a shuffle window of ``data.shuffle_buffer``
samples, a new order of the tar files every epoch (``shuffle_after_epoch`` with one seed on every
rank, so the ranks still split one common order), and ``pad_last_batch`` so that every rank runs
the same number of batches.

Exactly once per epoch: the N usable samples are split into ``world_size`` contiguous shares of
floor/ceil(N / W) samples; every rank runs ``steps_per_epoch = ceil(ceil(N / W) / B)`` batches of
B = ``train.micro_batch``; the tail of a rank's last batch repeats its share's last sample and is
marked ``batch["valid"] == False``. Over one epoch the valid rows of all ranks are every sample
exactly once.

Decoding runs on the GPU (``device="mixed"``, hardware decoder share ``data.hw_decoder_load``)
when the loader's device is CUDA, else the whole pipeline is CPU-only (``device_id=None``).

Resume: DALI's pipeline checkpointing (reader positions, shuffle buffers and every random
generator) taken through the iterator, so batches prefetched but not consumed are not lost.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mimae_scale.config import Config
from mimae_scale.data.shardset import ShardSet, padded_steps, resolve_shards, shard_sizes, valid_mask

log = logging.getLogger(__name__)
READER = "Reader"
LABEL_BYTES = 12  # ASCII class index, zero padded on the right by fn.pad


def labels_from_ascii(padded: torch.Tensor) -> torch.Tensor:
    """(B, L) uint8 ASCII digits, zero padded on the right -> (B,) int64."""
    digits = padded.to(torch.int64)
    is_digit = digits != 0
    length = is_digit.sum(dim=1, keepdim=True)
    place = length - 1 - torch.arange(digits.shape[1]).unsqueeze(0)  # power of ten of each column
    weights = torch.where(is_digit, torch.pow(10, place.clamp(min=0)), 0)
    return ((digits - 48).clamp(min=0) * weights).sum(dim=1)


def training_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 images when the engine trains in bf16 (``engine.precision`` auto on a GPU), else fp32."""
    precision = cfg.engine.precision
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def _pipeline_seed(cfg: Config, rank: int) -> int:
    return (cfg.seed * 1_000_003 + rank) % (2**31 - 1)


def _build_pipeline(
    cfg: Config,
    shards: ShardSet,
    rank: int,
    world_size: int,
    device: torch.device,
    batch_size: int,
    train: bool,
    checkpoint: str | None,
):
    from nvidia.dali import fn, pipeline_def, types

    d, size = cfg.data, cfg.model.img_size
    gpu = device.type == "cuda"
    decode_device = "mixed" if gpu else "cpu"
    decoder_args = {"hw_decoder_load": d.hw_decoder_load} if gpu else {}

    @pipeline_def(
        batch_size=batch_size,
        num_threads=d.num_threads,
        device_id=(device.index if device.index is not None else torch.cuda.current_device()) if gpu else None,
        seed=_pipeline_seed(cfg, rank),
        enable_checkpointing=True,
    )
    def pipe():
        jpegs, cls = fn.readers.webdataset(
            paths=shards.tars,
            index_paths=shards.indexes,
            ext=["jpg", "cls"],
            missing_component_behavior="skip",  # counted in skipped_samples, named by verify
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=train,
            initial_fill=d.shuffle_buffer,
            shuffle_after_epoch=train,
            **({"shuffle_after_epoch_seed": cfg.seed} if train else {}),  # same on every rank: one tar order
            stick_to_shard=not train,  # eval: each pass reads this rank's share again
            pad_last_batch=True,
            name=READER,
        )
        mean = [255 * m for m in d.mean]
        std = [255 * s for s in d.std]
        if train:
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decode_device,
                output_type=types.RGB,
                random_area=list(d.crop_scale),
                random_aspect_ratio=list(d.crop_ratio),
                num_attempts=10,
                **decoder_args,
            )
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC)
            mirror = fn.random.coin_flip(probability=0.5) if d.hflip else 0
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror
            )
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **decoder_args)
            images = fn.resize(images, resize_shorter=round(size / EVAL_CROP_FRACTION), interp_type=types.INTERP_CUBIC)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size), mean=mean, std=std
            )
        labels = fn.pad(cls, fill_value=0, shape=[LABEL_BYTES])
        return images, labels

    p = pipe(checkpoint=checkpoint)
    p.build()
    meta = p.reader_meta(READER)
    if meta["epoch_size"] != shards.num_samples:
        raise RuntimeError(
            f"DALI reads {meta['epoch_size']} samples but the index files list {shards.num_samples} usable ones"
        )
    return p


EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then centre crop (the ImageNet protocol)


class DaliLoader:
    """One rank's loader (train: augmented, reshuffled every epoch; eval: deterministic, fixed order)."""

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
        self._share_sizes = shard_sizes(self.num_samples, world_size)
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterator = None
        self._checkpoint: str | None = None

    def _dali_iterator(self):
        if self._iterator is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            pipe = _build_pipeline(
                self.cfg,
                self.shards,
                self.rank,
                self.world_size,
                self.device,
                self.batch_size,
                self.train,
                self._checkpoint,
            )
            self._iterator = DALIGenericIterator(
                pipe,
                ["images", "labels"],
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.FILL,
                auto_reset=False,
            )
        return self._iterator

    def _real_in_share(self) -> int:
        # With shuffle_after_epoch DALI keeps every rank on share `rank` (the tar order changes
        # instead); the exactly-once test over 1-3 ranks and 3 epochs pins this down.
        return self._share_sizes[self.rank]

    def _finish_epoch(self) -> None:
        self._dali_iterator().reset()
        self.batch_in_epoch = 0
        if self.train:
            self.epoch += 1

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        it = self._dali_iterator()
        if self.batch_in_epoch >= self.steps_per_epoch:  # restored at an epoch's very end
            self._finish_epoch()
        while self.batch_in_epoch < self.steps_per_epoch:
            try:
                out = next(it)[0]
            except StopIteration:
                raise RuntimeError(
                    f"DALI ended the epoch after {self.batch_in_epoch} of {self.steps_per_epoch} batches"
                ) from None
            except RuntimeError as e:  # a decode error: shards changed since they were verified
                raise RuntimeError(
                    f"DALI pipeline failed on rank {self.rank}, epoch {self.epoch}, batch {self.batch_in_epoch} "
                    f"({e}); check the shards with `mimae-shards verify`"
                ) from e
            valid = torch.tensor(valid_mask(self._real_in_share(), self.batch_in_epoch, self.batch_size))
            self.batch_in_epoch += 1
            yield {
                "images": out["images"].to(self.device, self.dtype, non_blocking=True),
                "labels": labels_from_ascii(out["labels"]).to(self.device, non_blocking=True),
                "valid": valid.to(self.device, non_blocking=True),
            }
        self._finish_epoch()

    def state_dict(self) -> dict[str, Any]:
        pipeline = self._iterator.checkpoints()[0] if self._iterator is not None else self._checkpoint
        return {
            "backend": "dali",
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "pipeline": pipeline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "dali":
            raise ValueError(f"data loader state is from backend {state.get('backend')!r}, this is 'dali'")
        for key in ("rank", "world_size", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]}, this run has {getattr(self, key)}: "
                    "DALI's reader state is per rank share; resume with the same ranks and shards"
                )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._checkpoint = state["pipeline"]
        self._iterator = None  # rebuilt from the checkpoint on the next iter()


def build_dali_loader(
    cfg: Config,
    spec: str,
    field: str,
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    batch_size: int,
    train: bool,
) -> DaliLoader:
    return DaliLoader(cfg, resolve_shards(spec, field), rank, world_size, device, batch_size=batch_size, train=train)
