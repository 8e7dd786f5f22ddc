"""Small shard sets for the data tests: fast to write, every sample identifiable by its label."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from mimae_scale.data_tools.shards import Sample, shard_name, write_manifest, write_shard
from PIL import Image


def jpeg_bytes(rng: np.random.Generator, h: int = 40, w: int = 48, **save_args) -> bytes:
    # Smooth gradients plus noise: a realistic JPEG, not just noise.
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3) + rng.uniform(-2, 2, size=3) * (x[..., None] + y[..., None])
    img = np.clip(base + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85, **save_args)
    return buf.getvalue()


def write_id_shards(out: Path, num_samples: int, per_shard: int, seed: int = 0) -> dict:
    """A shard set where sample i has label i (so labels identify samples), uneven last shard."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = [Sample(f"{i:09d}", jpeg_bytes(rng), i, f"test/{i}") for i in range(num_samples)]
    records = [
        write_shard(out, shard_name("train", n), samples[s : s + per_shard])
        for n, s in enumerate(range(0, num_samples, per_shard))
    ]
    return write_manifest(
        out, classes=[str(i) for i in range(num_samples)], shards=records, settings={}, inputs=num_samples,
        rejected=0, reencoded=0, tool="tests",
    )
