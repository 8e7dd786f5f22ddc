"""Which tar shards a run reads, how many usable samples they hold, and how ranks split them.

``data.train_shards`` / ``data.val_shards`` name a shard set directory (with ``manifest.json``,
as written by ``mimae-shards build`` or ``demo``) or a brace pattern of tar files
(``/data/train-{000000..001281}.tar``, e.g. shards written by ``webdataset.ShardWriter``). Every
tar needs its DALI index file beside it (``x.tar`` -> ``x.idx``); ``mimae-shards index`` writes
them for foreign shards. Either may be remote (``s3://bucket/prefix``, ``https://host/path``, brace
patterns of those or of ``pipe:`` commands; mimae_scale.data.remote): a tar's name is then its URL,
which is what the readers report, so sample ids do not depend on where the shards are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import braceexpand
import numpy as np

from mimae_scale.data import remote
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


def read_index(idx_path: str | Path, where: str) -> tuple[list[list[str]], int]:
    """(the usable entries of a DALI index file, each ``[ext, offset, size, name] * components``;
    how many entries lack a required component). A :class:`DataError` naming ``where`` when the
    file is not a DALI index."""
    try:
        text = remote.read_text(str(idx_path)) if remote.is_remote(str(idx_path)) else Path(idx_path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: unreadable DALI index {idx_path}: {exc}; rewrite it with "
                        "`mimae-shards index`") from None
    return parse_index(text, idx_path, where)


def parse_index(text: str, idx_path: str | Path, where: str) -> tuple[list[list[str]], int]:
    """:func:`read_index` on the index file's text."""
    lines = text.splitlines()
    fields = [line.split() for line in lines[1:]]
    if not lines or not lines[0].startswith("v1") or any(len(f) < 4 or len(f) % 4 != 0 for f in fields):
        raise DataError(f"{where}: unreadable DALI index {idx_path}: not a DALI index (each line: ext offset "
                        "size name, repeated per component); rewrite it with `mimae-shards index`")
    usable = [f for f in fields if all(e in f[0::4] for e in REQUIRED_COMPONENTS)]
    return usable, len(fields) - len(usable)


def jpg_offset(entry: list[str]) -> int:
    """The .jpg component's offset in the tar, from a usable index entry."""
    return int(entry[entry[0::4].index("jpg") * 4 + 1])


def read_offsets(indexes: list[str], where: str) -> tuple[list[np.ndarray], int]:
    """(per index file, the usable samples' .jpg offsets; entries skipped in all of them)."""
    offsets, skipped = [], 0
    for idx in indexes:
        usable, bad = read_index(idx, where)
        offsets.append(np.asarray([jpg_offset(entry) for entry in usable], dtype=np.int64))
        skipped += bad
    return offsets, skipped


def _check_head(tar: str, head: bytes, where: str) -> None:
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + len(TAR_MAGIC)] != TAR_MAGIC:
        raise DataError(f"{where}: {tar} is not a tar archive (no tar header); shards are written by `mimae-shards`")


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
    _check_head(tar, head, where)


def _manifest_tars(root: Path, where: str) -> tuple[list[str], list[str]]:
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        return [str(root / s["name"]) for s in manifest["shards"]], list(manifest["classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: unreadable shard manifest {manifest_path}: {exc!r}") from None


def resolve_shards(spec: str, field: str = "data.train_shards", backend: str | None = None) -> ShardSet:
    """The tars, index files and usable-sample counts named by ``spec``; a :class:`DataError`
    naming the path and ``field`` otherwise (missing or foreign files, bad index, nothing usable,
    a location ``backend``'s reader cannot open)."""
    if not spec:
        raise DataError(f"{field} is empty: point it at a shard set directory (mimae-shards build/demo)")
    where = f"{field}={spec!r}"
    if remote.is_remote(spec):
        return _resolve_remote(spec, where, backend)
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


def _resolve_remote(spec: str, where: str, backend: str | None) -> ShardSet:
    """:func:`resolve_shards` for an ``s3://``, ``http(s)://`` or ``pipe:`` location: the same checks,
    through range reads and index downloads (in parallel) instead of the filesystem."""
    kind = remote.scheme(spec)
    if kind == "gs":
        raise DataError(f"{where}: gs:// shards are not supported (DALI could read them, but nothing here reads "
                        "a GCS manifest or index); use s3:// (GCS has an S3-compatible endpoint) or a local copy")
    readers = remote.DALI_SCHEMES if backend == "dali" else remote.WDS_SCHEMES
    if kind not in readers:
        raise DataError(f"{where}: data.backend={backend} cannot read {kind} shards "
                        f"(it reads {', '.join(readers)} and local files); use data.backend=webdataset")
    if kind == "s3":
        remote.register_webdataset_s3()
    expanded = list(braceexpand.braceexpand(spec))
    classes = None
    try:
        if all(".tar" in t for t in expanded):  # tars named one by one (a brace pattern)
            tars = expanded
        else:  # a shard set "directory": its manifest, else (s3) the tars under the prefix
            try:
                manifest = json.loads(remote.read_text(remote.join(spec, "manifest.json")))
                tars = [remote.join(spec, s["name"]) for s in manifest["shards"]]
                classes = list(manifest["classes"])
            except remote.RemoteMissing:
                tars = remote.list_tars(spec)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{where}: unreadable shard manifest {remote.join(spec, 'manifest.json')}: "
                                f"{exc!r}") from None
        if not tars:
            raise DataError(f"{where}: no tar shards found (no manifest.json and no .tar under it)")
        heads = remote.read_many(tars, _remote_head)
    except remote.RemoteError as exc:
        raise DataError(f"{where}: {exc}") from None
    missing = [t for t, h in zip(tars, heads, strict=True) if h is None]
    if missing:
        raise DataError(f"{where}: missing shard {missing[0]} ({len(missing)} of {len(tars)} missing)")
    for tar, head in zip(tars, heads, strict=True):
        _check_head(tar, head, where)
    indexes = [remote.index_url(t) for t in tars]
    try:
        texts = remote.read_many(indexes, _remote_text)
    except remote.RemoteError as exc:
        raise DataError(f"{where}: {exc}") from None
    no_index = [i for i, t in zip(indexes, texts, strict=True) if t is None]
    if no_index:
        raise DataError(f"{where}: missing DALI index {no_index[0]} ({len(no_index)} missing); "
                        "write them with `mimae-shards index TAR...` and upload them beside the tars")
    offsets, skipped = [], 0
    for idx, text in zip(indexes, texts, strict=True):
        usable, bad = parse_index(text, idx, where)
        offsets.append(np.asarray([jpg_offset(entry) for entry in usable], dtype=np.int64))
        skipped += bad
    if sum(len(o) for o in offsets) == 0:
        raise DataError(f"{where}: no usable samples (each needs .jpg and .cls)")
    return ShardSet(tars, indexes, offsets, skipped, classes)


def _remote_head(tar: str) -> bytes | None:
    """A remote tar's first block; None when the object does not exist."""
    try:
        return remote.read_bytes(tar, 0, 512)
    except remote.RemoteMissing:
        return None


def _remote_text(url: str) -> str | None:
    try:
        return remote.read_text(url)
    except remote.RemoteMissing:
        return None
    except UnicodeDecodeError as exc:
        raise remote.RemoteError(f"{url}: not a text file ({exc.reason})") from None


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
