"""Inputs that ``mimae-bench`` (bench.py) and ``mimae-bench gpu`` (gpubench) both measure with.

It sits below both: bench.py registers gpubench's sub-command and gpubench's data sections need
these two helpers, so keeping them in bench.py made the two modules import each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def loader_batches(loader) -> Iterator[torch.Tensor]:
    """The images of a training loader's batches, epoch after epoch."""
    while True:
        yield from (b["images"] for b in loader)


def imagenet_like_tree(root: Path, count: int) -> list[Path]:
    """JPEGs of ImageNet's typical size (350-500 x 300-400 px), smooth content plus grain."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = int(rng.integers(350, 500)), int(rng.integers(300, 400))
        coarse = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        pixels += rng.integers(-20, 20, (h, w, 3), dtype=np.int16)
        path = root / f"n{i % 10:08d}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90, progressive=i % 10 == 0)
        paths.append(path)
    return paths
