"""Writing shard sets: tar shards with DALI index files, and the manifest that describes them.

Layout of a shard set directory::

    train-000000.tar, train-000000.idx, ...   shards and their DALI index files
    manifest.json                              classes, per-shard counts and sha256, totals, settings
    rejected.jsonl                             one JSON object per input that was not used (build only)

Each sample is ``<key>.jpg`` (baseline JPEG), ``<key>.cls`` (class index as ASCII, the webdataset
convention) and ``<key>.path.txt`` (where the image came from).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mimae_scale.data_tools.index import write_index

from mimae_scale.fileio import atomic_path, write_json_atomic

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
FORMAT = "mimae-shards/1"


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    cls: int
    path: str


@dataclass(frozen=True)
class ShardRecord:
    name: str  # tar file name, relative to the shard set directory
    index: str  # index file name
    samples: int
    bytes: int
    sha256: str


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same samples always give the same bytes (and checksum).
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: Path, name: str, samples: Iterable[Sample]) -> ShardRecord:
    """Write one shard and its index so that neither ever exists half-written under its final name."""
    tar_path = out_dir / name
    count = 0
    with atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                _add(tar, f"{s.key}.jpg", s.jpg)
                _add(tar, f"{s.key}.cls", str(s.cls).encode())
                _add(tar, f"{s.key}.path.txt", s.path.encode())
                count += 1
        idx_path = write_index(tmp, out_dir / (name[: -len(".tar")] + ".idx"))
    return ShardRecord(name, idx_path.name, count, tar_path.stat().st_size, sha256_file(tar_path))


def write_manifest(
    out_dir: Path,
    *,
    classes: list[str],
    shards: list[ShardRecord],
    settings: dict[str, Any],
    inputs: int,
    rejected: int,
    reencoded: int,
    tool: str,
) -> dict[str, Any]:
    manifest = {
        "format": FORMAT,
        "created_by": tool,
        "classes": classes,
        "num_classes": len(classes),
        "shards": [asdict(s) for s in shards],
        "total_samples": sum(s.samples for s in shards),
        "total_bytes": sum(s.bytes for s in shards),
        "total_inputs": inputs,
        "total_rejected": rejected,
        "total_reencoded": reencoded,
        "settings": settings,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest (not a shard set written by mimae-shards?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
