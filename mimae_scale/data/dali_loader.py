"""The DALI input pipeline: WebDataset shards -> decoded, augmented, normalised CHW batches.

Reader: ``fn.readers.webdataset`` on the shard set's DALI index files, this rank's share of the
samples (``shard_id=rank``, ``num_shards=world_size``), a shuffle window of ``data.shuffle_buffer``
samples (``random_shuffle``/``initial_fill``) and ``pad_last_batch`` so that every rank runs the
same number of full batches.

A new shard order every epoch: each epoch gets its own pipeline whose tar list is permuted with
(``seed``, epoch), the same permutation on every rank (the webdataset backend uses the same one).
We do not use the reader's ``shuffle_after_epoch``: DALI documents that with checkpointing on it
"might shuffle samples differently", and resume must be exact. One pipeline per epoch also makes an
epoch's state self-contained: (epoch, DALI checkpoint of that epoch's pipeline).

Exactly once per epoch: the N usable samples of the epoch's order are split into ``world_size``
contiguous shares of floor/ceil(N / W) samples; every rank runs ``steps_per_epoch =
ceil(ceil(N / W) / B)`` batches of B = ``train.micro_batch``; the tail of a rank's last batch
repeats a sample and is marked ``batch["valid"] == False``. Over one epoch the valid rows of all
ranks are every usable sample exactly once.

Decoding runs on the GPU (``device="mixed"``, hardware decoder share ``data.hw_decoder_load``)
when the loader's device is CUDA, else the whole pipeline is CPU-only (``device_id=None``).

Resume: DALI's pipeline checkpointing (reader position, shuffle window and every random
generator) taken through the iterator, so batches prefetched but not consumed are not lost. Each
sample also carries its source (``fn.get_property(key="source_info")``: tar, offset, name), from
which the loader marks the epoch's used samples; on another layout the rest of the epoch is read
through index files that list only the samples not yet used (mimae_scale.data.samples).
"""

from __future__ import annotations

import logging
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from mimae_scale.config import Config
from mimae_scale.data.common import EVAL_CROP_FRACTION, ShardLoader, tar_order, to_device
from mimae_scale.data.samples import source_key, write_remainder_indexes
from mimae_scale.data.shardset import padded_steps, valid_mask

log = logging.getLogger(__name__)
READER = "Reader"
LABEL_BYTES = 12  # ASCII class index, zero padded on the right by fn.pad


def labels_from_ascii(padded: torch.Tensor) -> torch.Tensor:
    """(B, L) uint8 ASCII digits, zero padded on the right -> (B,) int64. Trailing whitespace
    (``"7\\n"``, as some writers store ``.cls``) is ignored."""
    digits = padded.to(torch.int64)
    is_digit = (digits >= 48) & (digits <= 57)
    length = is_digit.sum(dim=1, keepdim=True)
    place = length - 1 - torch.arange(digits.shape[1], device=digits.device).unsqueeze(0)  # power of ten per column
    weights = torch.where(is_digit, torch.pow(10, place.clamp(min=0)), 0)
    return ((digits - 48).clamp(min=0) * weights).sum(dim=1)


def rand_augment_args(config: str) -> dict[str, Any] | None:
    """timm's RandAugment string (``rand-m9-mstd0.5-inc1``) as DALI's ``rand_augment`` arguments: n
    operations (timm's ``n``, default 2) at magnitude m of 10 (timm's scale: bins 0-10), increasing
    severity with ``inc1``. DALI has no magnitude noise: timm's ``mstd`` is not reproduced (docs/FINETUNE.md)."""
    if not config:
        return None
    parts = dict(re.fullmatch(r"([a-z]+)([0-9.]+)", p).groups() for p in config.split("-")[1:])
    return {"n": int(parts.get("n", 2)), "m": int(float(parts.get("m", 9))), "num_magnitude_bins": 11,
            "monotonic_mag": parts.get("inc", "0") == "1"}


def _pipeline_seed(cfg: Config, rank: int, epoch: int) -> int:
    # Different augmentations per rank and per epoch, reproducible per (seed, rank, epoch).
    return zlib.crc32(f"{cfg.seed}-{rank}-{epoch}".encode()) & 0x7FFFFFFF


def _build_pipeline(
    cfg: Config,
    tars: list[str],
    indexes: list[str],
    rank: int,
    world_size: int,
    device: torch.device,
    batch_size: int,
    train: bool,
    seed: int,
    checkpoint: str | None,
):
    from nvidia.dali import fn, pipeline_def, types

    d, size = cfg.data, cfg.model.img_size
    gpu = device.type == "cuda"
    decode_device = "mixed" if gpu else "cpu"
    decoder_args = {"hw_decoder_load": d.hw_decoder_load} if gpu else {}

    rand_augment = rand_augment_args(cfg.finetune.rand_augment) if train and cfg.task == "finetune" else None

    @pipeline_def(
        batch_size=batch_size,
        num_threads=d.num_threads,
        device_id=(device.index if device.index is not None else torch.cuda.current_device()) if gpu else None,
        seed=seed,
        enable_checkpointing=True,
        enable_conditionals=rand_augment is not None,  # RandAugment picks its operations per sample
    )
    def pipe():
        jpegs, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=indexes,
            ext=["jpg", "cls"],
            missing_component_behavior="skip",  # counted in skipped_samples, named by verify
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=train,
            initial_fill=d.shuffle_buffer,
            stick_to_shard=True,  # eval passes re-read this rank's share; train builds a pipeline per epoch
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
            if rand_augment is not None:  # fine-tuning: on the uint8 crop, before normalisation (as timm)
                from nvidia.dali.auto_aug import rand_augment as dali_rand_augment

                images = dali_rand_augment.rand_augment(images, **rand_augment)
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
        source = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)  # "tar:offset:name", 0-padded
        return images, labels, source

    # (DALI 2.4's own RandAugment calls two of its deprecated aliases: it prints that once per process, under a
    # warnings filter of its own that no caller's filter overrides)
    p = pipe(checkpoint=checkpoint)
    p.build()
    return p


class DaliLoader(ShardLoader):
    """One rank's DALI loader (train: augmented, a new order every epoch; eval: deterministic, fixed order)."""

    BACKEND = "dali"

    def _setup_backend(self) -> None:
        self._iterator = None  # the current epoch's DALI iterator
        self._resume_from: str | None = None  # DALI checkpoint for the next pipeline built
        self._restart_point: tuple[int, str | None] = (0, None)  # (batch, checkpoint) within this epoch
        self.pipeline_restarts = 0  # DALI failures survived by restarting from a checkpoint

    def _dali_iterator(self):
        if self._iterator is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            order = tar_order(self.cfg.seed, self.epoch, len(self.shards.tars)) if self.train else None
            order = order or list(range(len(self.shards.tars)))
            with tempfile.TemporaryDirectory(prefix="mimae-remainder-") as scratch:  # read by build()
                if self.remaining is None:
                    tars = [self.shards.tars[i] for i in order]
                    indexes = [self.shards.indexes[i] for i in order]
                else:  # the rest of an epoch begun on another layout
                    tars, indexes = write_remainder_indexes(self.ids, order, self.remaining, Path(scratch))
                pipe = _build_pipeline(
                    self.cfg,
                    tars,
                    indexes,
                    self.rank,
                    self.world_size,
                    self.device,
                    self.batch_size,
                    self.train,
                    _pipeline_seed(self.cfg, self.rank, self.epoch),
                    self._resume_from,
                )
            epoch_size = pipe.reader_meta(READER)["epoch_size"]
            if epoch_size != sum(self.share_sizes):
                raise RuntimeError(f"DALI reads {epoch_size} samples, the index files list {sum(self.share_sizes)} "
                                   "usable")
            self._iterator = DALIGenericIterator(
                pipe,
                ["images", "labels", "source"],
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.FILL,
                auto_reset=False,
                prepare_first_batch=False,  # decode errors surface in next(), where restarts handle them
            )
            self._resume_from = None
        return self._iterator

    def _next_epoch(self) -> None:
        super()._next_epoch()
        self._restart_point = (0, None)
        if self.train:  # a new pipeline with the next epoch's order
            self._iterator = None
        else:  # eval: the same pipeline reads the same share again
            self._dali_iterator().reset()

    def _restart(self) -> None:
        """Rebuild this epoch's pipeline from the last checkpoint and replay up to the current batch."""
        batch, checkpoint = self._restart_point
        self._iterator, self._resume_from = None, checkpoint
        it = self._dali_iterator()
        for _ in range(self.batch_in_epoch - batch):
            next(it)
        self.pipeline_restarts += 1

    def _next_batch(self):
        try:
            return next(self._dali_iterator())[0]
        except StopIteration:
            raise RuntimeError(
                f"DALI ended the epoch after {self.batch_in_epoch} of {self.steps_per_epoch} batches"
            ) from None
        except RuntimeError as first:
            where = f"rank {self.rank}, epoch {self.epoch}, batch {self.batch_in_epoch}"
            log.warning("DALI pipeline failed at %s (%s); restarting it from its checkpoint", where, first)
        try:  # A transient failure (I/O) passes on a restart; a bad sample fails again, same place.
            self._restart()
            return next(self._dali_iterator())[0]
        except RuntimeError as second:
            raise RuntimeError(
                f"DALI pipeline failed twice at {where}: {second}. A sample that does not decode: run "
                "`mimae-shards verify` on the shard set and rebuild the damaged shards"
            ) from second

    def __iter__(self):
        if self.batch_in_epoch >= self.pass_batches:  # a state saved at a pass's very end
            self._next_epoch()
        reader_batches = padded_steps(sum(self.share_sizes), self.world_size, self.batch_size)  # what DALI yields
        while self.batch_in_epoch < self.pass_batches:
            if self.batch_in_epoch >= reader_batches:  # a pass stretched to whole steps: padding only
                self.batch_in_epoch += 1
                yield self._padding_batch()
                continue
            out = self._next_batch()
            valid = torch.tensor(valid_mask(self.share_sizes[self.rank], self.batch_in_epoch, self.batch_size))
            if self.train:
                self._mark_batch(out["source"], valid)
            self.batch_in_epoch += 1
            yield {
                "images": to_device(out["images"], self.device, self.dtype),  # mixed decode: already there
                "labels": to_device(labels_from_ascii(out["labels"]), self.device),
                "valid": to_device(valid, self.device),
            }
        if self.train:  # eval resets its pipeline when the next pass starts, not before it is wanted
            self._next_epoch()

    def _mark_batch(self, source: torch.Tensor, valid: torch.Tensor) -> None:
        infos = [bytes(row).rstrip(b"\0").decode() for row, ok in zip(source.numpy(), valid.tolist(), strict=True)
                 if ok]
        self._mark_seen([self.ids.from_source_info(i) for i in infos],
                        [source_key(i) for i in infos] if self.tracing else None)

    def state_dict(self) -> dict[str, Any]:
        """The shared position (``ShardLoader._position_state``: epoch, batches consumed in the pass,
        layout, the epoch's used samples) and "pipeline": the DALI checkpoint string of the pass's
        pipeline (None at a pass's start or end); safe for ``torch.load(weights_only=True)``."""
        at_edge = self.batch_in_epoch in (0, self.pass_batches) or self._iterator is None
        pipeline = self._resume_from if at_edge else self._iterator.checkpoints()[0]
        if not at_edge:
            self._restart_point = (self.batch_in_epoch, pipeline)  # a later restart replays less
        return {**self._position_state(), "pipeline": pipeline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hint = "DALI's reader state is per rank share; resume with the same ranks and shards"
        self._load_position(state, ("rank", "world_size", "num_samples"), hint)
        self._iterator = None  # rebuilt from the checkpoint on the next iter()
        self._resume_from = state["pipeline"]
        self._restart_point = (self.batch_in_epoch, self._resume_from)

