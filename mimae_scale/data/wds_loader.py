"""The fallback input pipeline without DALI: the webdataset library reads the tars, PIL decodes.

Same batches as the DALI backend (random-resized crop with ``data.crop_scale``/``crop_ratio``,
bicubic resize to ``model.img_size``, horizontal flip, mean/std normalisation, CHW; ``valid``
marks padding rows) and the same epoch arithmetic: every epoch the tar order is permuted with
(``seed``, epoch), identically on every rank; rank r reads the r-th contiguous share of that order
through a shuffle window of ``data.shuffle_buffer`` samples; the last batch is padded.

Everything random is a pure function of (seed, epoch, rank, position): the shuffle window draws
from a generator seeded per (epoch, rank) and each sample's crop/flip from one seeded by its
position in the epoch. Resuming mid-epoch therefore replays the epoch's sample stream up to the
saved position without decoding (tar reads only) and continues bit-identically.

Decoding and augmentation run in a thread pool of ``data.num_threads`` (PIL releases the GIL).
An image that does not decode becomes a padding row (``valid`` False), is counted in
``skipped_samples`` and logged with its key; training goes on.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mimae_scale.data.common import EVAL_CROP_FRACTION, ShardLoader, tar_order, to_device

log = logging.getLogger(__name__)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): torchvision's RandomResizedCrop sampling, with our own generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: the largest centre crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def timm_rand_augment(cfg) -> Callable[[Image.Image, int], Image.Image]:
    """timm's RandAugment (``finetune.rand_augment``) with the hyper-parameters timm's ``create_transform``
    gives it, applied as a pure function of (image, seed): timm draws from the global ``random`` and
    NumPy generators, so each call seeds them under a lock and restores them (the decode threads
    share them, and a resumed epoch must draw the same operations)."""
    from timm.data.auto_augment import rand_augment_transform

    size = cfg.model.img_size
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in cfg.data.mean),
               "interpolation": Image.Resampling.BICUBIC}
    transform = rand_augment_transform(cfg.finetune.rand_augment, hparams)
    lock = threading.Lock()

    def apply(img: Image.Image, seed: int) -> Image.Image:
        with lock:
            saved = random.getstate(), np.random.get_state()
            random.seed(seed)
            np.random.seed(seed)
            try:
                return transform(img)
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])

    return apply


class WdsLoader(ShardLoader):
    """One rank's loader on the webdataset library (train: augmented and reshuffled; eval: fixed)."""

    BACKEND = "webdataset"

    def _setup_backend(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.cfg.data.num_threads)
        augment = self.train and self.cfg.task == "finetune" and self.cfg.finetune.rand_augment
        self._rand_augment = timm_rand_augment(self.cfg) if augment else None
        self._mean = torch.tensor(self.cfg.data.mean).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(self.cfg.data.std).view(1, 3, 1, 1) * 255

    # -- the sample stream ------------------------------------------------------------------
    def _share_stream(self) -> Iterator[dict[str, Any]]:
        """This rank's contiguous share of the pass's sample order (raw bytes, not decoded); train
        samples carry their global id (``__id__``) and a pass over the rest of an epoch reads only
        the ``remaining`` ones."""
        order = tar_order(self.cfg.seed, self.epoch, len(self.shards.tars)) if self.train else None
        order = order or list(range(len(self.shards.tars)))
        start = sum(self.share_sizes[: self.rank])
        count = self.share_sizes[self.rank]
        if count == 0:
            return
        pos, taken = 0, 0
        for i in order:
            ids = self.ids.tar_ids(i) if self.train else range(self.shards.counts[i])
            in_pass = len(ids) if self.remaining is None else int(self.remaining[ids.start:ids.stop].sum())
            if pos + in_pass <= start:  # the whole tar lies before this rank's share
                pos += in_pass
                continue
            usable = (s for s in wds.DataPipeline(wds.SimpleShardList([self.shards.tars[i]]),
                                                  wds.tarfile_to_samples()) if "jpg" in s and "cls" in s)
            for sample_id, sample in zip(ids, usable, strict=True):  # not usable ones: counted in shards.skipped
                if self.remaining is not None and not self.remaining[sample_id]:
                    continue
                pos += 1
                if pos <= start:
                    continue
                yield {**sample, "__id__": sample_id}
                taken += 1
                if taken == count:
                    return

    def _shuffled(self, stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if not self.train:
            yield from stream
            return
        rng = random.Random(f"{self.cfg.seed}-window-{self.epoch}-{self.rank}")
        buffer: list[dict[str, Any]] = []
        for sample in stream:
            buffer.append(sample)
            if len(buffer) >= self.cfg.data.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        while buffer:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()

    # -- decoding -----------------------------------------------------------------------------
    def _decode(self, sample: dict[str, Any], position: int) -> np.ndarray | None:
        size = self.cfg.model.img_size
        try:
            img = Image.open(io.BytesIO(sample["jpg"]))
            img = img.convert("RGB")
        except Exception as e:  # any decoder failure: count and pad, never kill the run
            log.warning("skipping undecodable sample %s (%s): %s", sample.get("__key__"), sample.get("__url__"), e)
            return None
        if self.train:
            rng = random.Random(f"{self.cfg.seed}-aug-{self.epoch}-{self.rank}-{position}")
            d = self.cfg.data
            box = random_resized_crop_box(img.width, img.height, d.crop_scale, d.crop_ratio, rng)
            img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
            if self.cfg.data.hflip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self._rand_augment is not None:
                img = self._rand_augment(img, rng.getrandbits(32))
        else:
            short = round(size / EVAL_CROP_FRACTION)
            scale = short / min(img.width, img.height)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.Resampling.BICUBIC)
            # DALI's centre-crop anchor: roundf(0.5 * spare), halves rounded up.
            left, top = math.floor((w - size) / 2 + 0.5), math.floor((h - size) / 2 + 0.5)
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img)

    def _batch(self, samples: list[dict[str, Any]], first_position: int, real: int) -> dict[str, torch.Tensor]:
        arrays = list(self._pool.map(self._decode, samples, range(first_position, first_position + len(samples))))
        valid = [a is not None and i < real for i, a in enumerate(arrays)]
        bad = sum(a is None for a in arrays[:real])
        self.skipped_samples += bad
        fill = next((a for a in arrays if a is not None), None)
        size = self.cfg.model.img_size
        if fill is None:
            fill = np.zeros((size, size, 3), np.uint8)
        images = torch.from_numpy(np.stack([a if a is not None else fill for a in arrays]))
        images = (images.permute(0, 3, 1, 2).float() - self._mean) / self._std
        labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.int64)
        return {
            "images": to_device(images.to(self.dtype), self.device),  # cast on the host: fewer bytes to copy
            "labels": to_device(labels, self.device),
            "valid": to_device(torch.tensor(valid), self.device),
        }

    def __iter__(self):
        if self.batch_in_epoch >= self.pass_batches:  # restored at a pass's very end
            self._next_epoch()
        stream = self._shuffled(self._share_stream())
        real_total = self.share_sizes[self.rank]
        consumed = self.batch_in_epoch * self.batch_size
        for _ in range(min(consumed, real_total)):  # resume: replay without decoding
            next(stream)
        while self.batch_in_epoch < self.pass_batches:
            first = self.batch_in_epoch * self.batch_size
            samples = list(itertools.islice(stream, self.batch_size))
            if not samples:  # past this rank's share: a pass stretched to whole steps, or an empty share
                if real_total == 0:
                    raise ValueError(
                        f"rank {self.rank} has no samples: {sum(self.share_sizes)} samples for {self.world_size} ranks"
                    )
                self.batch_in_epoch += 1
                yield self._padding_batch()
                continue
            real = len(samples)
            if self.train:
                self._mark_seen([s["__id__"] for s in samples],
                                [f"{s['__url__'].rsplit('/', 1)[-1]}/{s['__key__']}" for s in samples]
                                if self.tracing else None)
            samples += [samples[-1]] * (self.batch_size - real)
            batch = self._batch(samples, first, real)
            self.batch_in_epoch += 1
            yield batch
        self._next_epoch()

    def state_dict(self) -> dict[str, Any]:
        # skipped_samples: the counter goes on across restarts
        return {**self._position_state(), "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_position(state, ("world_size", "num_samples"), "resume with the same world size and shards")
        self.skipped_samples = int(state["skipped_samples"])

