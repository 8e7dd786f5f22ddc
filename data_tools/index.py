"""DALI's WebDataset index files (the ``v1.2`` format that DALI's ``wds2idx`` writes).

One line per sample: ``ext offset size name`` for each of its components, where ``offset`` is the
byte offset of the component's data (not its tar header). We derive it from the tar headers with
``tarfile`` instead of shelling out to GNU tar as ``wds2idx`` does; the output is byte-identical
(tested against ``wds2idx.IndexCreator``).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mimae_scale.fileio import write_text_atomic

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    ext: str
    offset: int
    size: int
    name: str


def split_name(name: str) -> tuple[str, str]:
    """(sample key, extension): the extension starts at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def scan_tar(tar_path: str | Path) -> list[list[Component]]:
    """Samples of a tar in stored order, grouped like DALI groups them (consecutive equal keys).

    Raises ``tarfile.TarError`` (or ``EOFError``) when the archive is truncated or damaged.
    """
    samples: list[list[Component]] = []
    last_key = None
    file_size = os.path.getsize(tar_path)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            # tarfile stops quietly at a cut; a member running past the end of the file is one.
            if member.offset_data + member.size > file_size:
                raise tarfile.ReadError(f"{tar_path}: truncated inside {member.name}")
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/"):  # hidden files: DALI skips them
                continue
            comp = Component(ext, member.offset_data, member.size, member.name)
            if key != last_key:
                samples.append([comp])
                last_key = key
            else:
                samples[-1].append(comp)
        end = tar.offset
    # A cut exactly between members loses the end-of-archive marker (two zero blocks).
    with open(tar_path, "rb") as f:
        f.seek(end)
        if f.read(1024) != bytes(1024):
            raise tarfile.ReadError(f"{tar_path}: no end-of-archive marker after byte {end} (truncated?)")
    return samples


def format_index(samples: list[list[Component]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in sample))
    return "\n".join(lines) + "\n"


def parse_index(idx_path: str | Path) -> list[list[Component]]:
    text = Path(idx_path).read_text()
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{idx_path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{idx_path}: header {lines[0]!r} is not '{INDEX_VERSION} <num_samples>'")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name'")
        samples.append(
            [
                Component(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            ]
        )
    if len(samples) != int(head[1]):
        raise ValueError(f"{idx_path}: header says {head[1]} samples, file lists {len(samples)}")
    return samples


def index_path_for(tar_path: str | Path) -> Path:
    """``train-000001.tar`` -> ``train-000001.idx`` (DALI's naming, beside the tar)."""
    p = Path(tar_path)
    return p.with_name(p.name[: -len(".tar")] + ".idx" if p.name.endswith(".tar") else p.name + ".idx")


def write_index(tar_path: str | Path, idx_path: str | Path | None = None) -> Path:
    """Index ``tar_path`` atomically (temp file + rename) and return the index path."""
    idx = Path(idx_path) if idx_path is not None else index_path_for(tar_path)
    write_text_atomic(idx, format_index(scan_tar(tar_path)))
    return idx
