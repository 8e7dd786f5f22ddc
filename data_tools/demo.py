"""``mimae-shards demo OUT``: the embedded demo dataset, generated (no downloads), deterministic per seed.

Ten classes of procedurally drawn patterns. The class is carried by *structure* only (orientation,
geometry, topology of the pattern); colours, frequency, phase, centre and noise are random per
image, so a model has to learn shapes, not look up a colour. Patterns are periodic or space
filling, so a random-resized crop of 20% of the area still shows the class at 32 px.

``OUT/train/`` and ``OUT/val/`` (held out: its own random draws) are complete shard sets with
manifests, written by the same shard writer as ``build``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mimae_scale.data_tools.shards import Sample, shard_name, write_manifest, write_shard
from PIL import Image

Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _wave(t: np.ndarray) -> np.ndarray:
    return (np.sin(t) > 0).astype(np.float32)


def _freq(rng: np.random.Generator) -> float:
    return rng.uniform(0.35, 0.8)  # radians per pixel: 8-18 px periods, visible in a 20% crop


def _hstripes(y, x, rng):
    return _wave(y * _freq(rng) + rng.uniform(0, 2 * np.pi))


def _vstripes(y, x, rng):
    return _wave(x * _freq(rng) + rng.uniform(0, 2 * np.pi))


def _diagonal(y, x, rng):
    return _wave((x + y) * _freq(rng) / np.sqrt(2) + rng.uniform(0, 2 * np.pi))


def _checker(y, x, rng):
    f, p, q = _freq(rng), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    return (_wave(x * f + p) != _wave(y * f + q)).astype(np.float32)


def _rings(y, x, rng):
    cy, cx = rng.uniform(0.2, 0.8, size=2) * y.shape[0]
    return _wave(np.hypot(y - cy, x - cx) * _freq(rng) + rng.uniform(0, 2 * np.pi))


def _dots(y, x, rng):
    f, p, q = _freq(rng), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    return ((np.cos(x * f + p) + np.cos(y * f + q)) > 1.0).astype(np.float32)


def _sectors(y, x, rng):
    cy, cx = rng.uniform(0.3, 0.7, size=2) * y.shape[0]
    return _wave(np.arctan2(y - cy, x - cx) * rng.integers(4, 9) + rng.uniform(0, 2 * np.pi))


def _grid(y, x, rng):
    f, p, q = _freq(rng), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    return ((np.cos(x * f + p) > 0.75) | (np.cos(y * f + q) > 0.75)).astype(np.float32)


def _zigzag(y, x, rng):
    f = _freq(rng)
    amp = rng.uniform(3.0, 6.0)
    tri = np.abs(((x * f / np.pi) % 2.0) - 1.0) * amp  # triangle wave across x
    return _wave((y + tri) * f + rng.uniform(0, 2 * np.pi))


def _blobs(y, x, rng):
    # Smooth low-frequency noise, thresholded: irregular blobs without any period or orientation.
    n = y.shape[0]
    coarse = rng.standard_normal((6, 6)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.Resampling.BICUBIC))
    return (up > 0).astype(np.float32)


CLASSES: list[tuple[str, Pattern]] = [
    ("horizontal_stripes", _hstripes),
    ("vertical_stripes", _vstripes),
    ("diagonal_stripes", _diagonal),
    ("checkerboard", _checker),
    ("rings", _rings),
    ("dots", _dots),
    ("sectors", _sectors),
    ("grid", _grid),
    ("zigzag", _zigzag),
    ("blobs", _blobs),
]


@functools.cache
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``."""
    y, x = _coords(size)
    pattern = CLASSES[label][1](y, x, rng)[..., None]
    fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    while np.abs(fg - bg).sum() < 150:  # keep the pattern visible
        fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    img = bg + (fg - bg) * pattern + rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _samples(split: str, per_class: int, size: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))
    samples = []
    for i, label in enumerate(labels.tolist()):
        buf = io.BytesIO()
        Image.fromarray(render(label, size, rng)).save(buf, "JPEG", quality=90)
        samples.append(Sample(f"{i:09d}", buf.getvalue(), label, f"demo/{split}/{CLASSES[label][0]}/{i:06d}"))
    return samples


def write_demo(
    out_dir: Path,
    *,
    train_per_class: int = 200,
    val_per_class: int = 100,
    size: int = 64,
    shard_size: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Write ``out_dir/train`` and ``out_dir/val``; returns their manifests."""
    manifests = {}
    classes = [name for name, _ in CLASSES]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        samples = _samples(split, per_class, size, seed)
        records = [
            write_shard(split_dir, shard_name(split, n), samples[start : start + shard_size])
            for n, start in enumerate(range(0, len(samples), shard_size))
        ]
        settings = {"generator": "demo", "seed": seed, "size": size, "per_class": per_class, "shard_size": shard_size}
        manifests[split] = write_manifest(
            split_dir,
            classes=classes,
            shards=records,
            settings=settings,
            inputs=len(samples),
            rejected=0,
            reencoded=0,
            tool="mimae-shards demo",
        )
        (split_dir / "rejected.jsonl").write_text("")
    return manifests
