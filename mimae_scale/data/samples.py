"""Which samples of an epoch have been trained on, in terms that do not depend on the layout.

Every usable sample of a shard set has a global id: its rank in the set's canonical order (tars in
the set's order, samples in their index file's order, only those with every required component).
A train loader marks the ids it hands to the trainer in a per-epoch bitmap. On another number of
ranks, the union of the old ranks' bitmaps is exactly what the interrupted epoch has used, so the
new layout can go on with the rest of it: no sample skipped, none repeated.

The DALI reader reads what its index files list, so the rest of an epoch is read through index
files that list only the remaining samples (:func:`write_remainder_indexes`); the webdataset
backend filters its stream by id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from mimae_scale.data.shardset import ShardSet, read_index


class SampleIds:
    """Global sample ids of a shard set, and the way back from what the readers report."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.bases = np.concatenate([[0], np.cumsum(shards.counts)]).astype(np.int64)
        self._tar_of = {tar: i for i, tar in enumerate(shards.tars)}

    @property
    def total(self) -> int:
        return int(self.bases[-1])

    def from_source_info(self, info: str) -> int:
        """The id of the sample DALI's webdataset reader reports as ``"<tar path>:<offset>:<name>"``."""
        tar, offset, _ = info.rsplit(":", 2)
        i = self._tar_of[tar]
        offsets = self.shards.jpg_offsets[i]
        j = int(np.searchsorted(offsets, int(offset)))
        if j == len(offsets) or offsets[j] != int(offset):
            raise ValueError(f"{tar}: no usable sample at offset {offset} in its index file")
        return int(self.bases[i] + j)

    def tar_ids(self, tar: int) -> range:
        """The ids of tar ``tar``'s usable samples, in stream order."""
        return range(int(self.bases[tar]), int(self.bases[tar + 1]))


def source_key(info: str) -> str:
    """``"<tar name>/<sample key>"`` from a DALI source-info string (the sample trace's name)."""
    tar, _, name = info.rsplit(":", 2)
    return f"{Path(tar).name}/{base_plus_ext(name)[0]}"


def pack(mask: np.ndarray | None) -> torch.Tensor | None:
    """A bool bitmap as a uint8 tensor (8 samples a byte; safe for ``torch.load(weights_only=True)``)."""
    return None if mask is None else torch.from_numpy(np.packbits(mask))


def unpack(packed: Any, total: int) -> np.ndarray | None:
    if packed is None:
        return None
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=total).astype(bool)


def write_remainder_indexes(ids: SampleIds, order: list[int], remaining: np.ndarray,
                            out: Path) -> tuple[list[str], list[str]]:
    """DALI index files under ``out`` that list only the ``remaining`` samples, for the tars in
    ``order`` that still have some. Returns (tars, index files) to hand to the reader."""
    out.mkdir(parents=True, exist_ok=True)
    tars, indexes = [], []
    for i in order:
        keep = remaining[ids.tar_ids(i)]
        if not keep.any():
            continue
        usable, _ = read_index(ids.shards.indexes[i], "the rest of an epoch")
        lines = [" ".join(f) for f, k in zip(usable, keep, strict=True) if k]
        path = out / f"{i:06d}.idx"
        path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
        tars.append(ids.shards.tars[i])
        indexes.append(str(path))
    return tars, indexes
