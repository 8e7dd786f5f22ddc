"""Which tar shards a run reads, how many usable samples they hold, and how ranks split them.

``data.train_shards`` / ``data.val_shards`` name a shard set directory (with ``manifest.json``,
as written by ``mimae-shards build`` or ``demo``) or a brace pattern of tar files
(``/data/train-{000000..001281}.tar``, e.g. shards written by ``webdataset.ShardWriter``). Every
tar needs its DALI index file beside it (``x.tar`` -> ``x.idx``); ``mimae-shards index`` writes
them for foreign shards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import braceexpand
import numpy as np

from mimae_scale.data_tools.index import index_path_for

REQUIRED_COMPONENTS = ("jpg", "cls")
TAR_MAGIC_OFFSET, TAR_MAGIC = 257, b"ustar"  # POSIX/GNU tar header: "ustar" at byte 257 of the first block


class DataError(ValueError):
    """A shard set that cannot be trained on; the one-line message names the path and the setting."""


@dataclass(frozen=True)
class ShardSet:
    tars: list[str]
    indexes: list[str]
    # per tar: the .jpg offsets of its usable samples (every required component), in index order,
    # which is the tar's order; a sample's identity (mimae_scale.data.samples)
    jpg_offsets: list[np.ndarray]
    skipped: int  # samples in the indexes without a jpg or cls: readers skip them, metrics count them
    classes: list[str] | None  # from the manifest, when there is one

    @cached_property
    def counts(self) -> list[int]:
        """Usable samples per tar."""
        return [len(offsets) for offsets in self.jpg_offsets]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def read_index(idx_path: Path, where: str) -> tuple[list[list[str]], int]:
    """(the usable entries of a DALI index file, each ``[ext, offset, size, name] * components``;
    how many entries lack a required component). A :class:`DataError` naming ``where`` when the
    file is not a DALI index."""
    try:
        lines = idx_path.read_text().splitlines()
        fields = [line.split() for line in lines[1:]]
        if not lines or not lines[0].startswith("v1") or any(len(f) < 4 or len(f) % 4 != 0 for f in fields):
            raise ValueError("not a DALI index (each line: ext offset size name, repeated per component)")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: unreadable DALI index {idx_path}: {exc}; rewrite it with "
                        "`mimae-shards index`") from None
    usable = [f for f in fields if all(e in f[0::4] for e in REQUIRED_COMPONENTS)]
    return usable, len(fields) - len(usable)


def jpg_offset(entry: list[str]) -> int:
    """The .jpg component's offset in the tar, from a usable index entry."""
    return int(entry[entry[0::4].index("jpg") * 4 + 1])


def read_offsets(indexes: list[str], where: str) -> tuple[list[np.ndarray], int]:
    """(per index file, the usable samples' .jpg offsets; entries skipped in all of them)."""
    offsets, skipped = [], 0
    for idx in indexes:
        usable, bad = read_index(Path(idx), where)
        offsets.append(np.asarray([jpg_offset(entry) for entry in usable], dtype=np.int64))
        skipped += bad
    return offsets, skipped


def _check_tar(tar: str, where: str) -> None:
    """A regular, readable file that starts with a tar header (not a zip, an image or a folder)."""
    path = Path(tar)
    if not path.exists():
        raise DataError(f"{where}: missing shard {tar}")
    if not path.is_file():
        raise DataError(f"{where}: {tar} is not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise DataError(f"{where}: cannot read shard {tar}: {exc}") from None
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + len(TAR_MAGIC)] != TAR_MAGIC:
        raise DataError(f"{where}: {tar} is not a tar archive (no tar header); shards are written by `mimae-shards`")


def _manifest_tars(root: Path, where: str) -> tuple[list[str], list[str]]:
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        return [str(root / s["name"]) for s in manifest["shards"]], list(manifest["classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: unreadable shard manifest {manifest_path}: {exc!r}") from None


def resolve_shards(spec: str, field: str = "data.train_shards") -> ShardSet:
    """The tars, index files and usable-sample counts named by ``spec``; a :class:`DataError`
    naming the path and ``field`` otherwise (missing or foreign files, bad index, nothing usable)."""
    if not spec:
        raise DataError(f"{field} is empty: point it at a shard set directory (mimae-shards build/demo)")
    where = f"{field}={spec!r}"
    root = Path(spec)
    classes = None
    if root.is_dir():
        if (root / "manifest.json").exists():
            tars, classes = _manifest_tars(root, where)
        else:
            tars = sorted(str(p) for p in root.glob("*.tar"))
    else:
        tars = list(braceexpand.braceexpand(spec))
    if not tars:
        raise DataError(f"{where}: no tar shards found")
    missing = [t for t in tars if not Path(t).exists()]
    if missing:
        raise DataError(f"{where}: missing shard {missing[0]} ({len(missing)} of {len(tars)} missing)")
    for tar in tars:
        _check_tar(tar, where)
    indexes = [str(index_path_for(t)) for t in tars]
    no_index = [i for i in indexes if not Path(i).exists()]
    if no_index:
        raise DataError(
            f"{where}: missing DALI index {no_index[0]} ({len(no_index)} missing); "
            "write them with `mimae-shards index TAR...`"
        )
    offsets, skipped = read_offsets(indexes, where)
    if sum(len(o) for o in offsets) == 0:
        raise DataError(f"{where}: no usable samples (each needs .jpg and .cls)")
    return ShardSet(tars, indexes, offsets, skipped, classes)


def shard_sizes(num_samples: int, world_size: int) -> list[int]:
    """Samples per rank shard, as DALI's readers split a dataset: [floor(N*i/W), floor(N*(i+1)/W))."""
    bounds = [num_samples * i // world_size for i in range(world_size + 1)]
    return [bounds[i + 1] - bounds[i] for i in range(world_size)]


def padded_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per epoch on every rank: the largest rank shard, rounded up to whole batches."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def valid_mask(real_in_shard: int, batch_in_epoch: int, batch_size: int) -> list[bool]:
    """Which rows of a batch are real samples; the rest repeat the shard's last sample (padding)."""
    real = min(max(real_in_shard - batch_in_epoch * batch_size, 0), batch_size)
    return [True] * real + [False] * (batch_size - real)
