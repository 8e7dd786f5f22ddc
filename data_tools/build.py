"""``mimae-shards build SRC OUT``: images -> globally shuffled, validated, indexed shards.

The shuffled input list is cut into fixed chunks of ``shard_size``; chunk i becomes shard i (minus
its rejected inputs). A chunk is the unit of parallel work and of restart: its shard, index and a
small record (``.parts/<shard>.json``: count, checksum, rejections) are each written atomically,
the record last. A re-run skips chunks that have a record, so an interrupted build finishes
without duplicating or losing samples. The settings are fixed by the first run (``.parts/build.json``);
a re-run with different settings or inputs is refused. A full disk (ENOSPC/EDQUOT) stops the build
with :class:`DiskFull` (one line: the folder, about how much more it needs, what is free); the
finished chunks stay, the temporary files of the unfinished ones go, and the same command finishes
the build once there is room.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mimae_scale.data_tools.encode import UNREADABLE, EncodeSettings, Rejected, to_baseline_jpeg
from mimae_scale.data_tools.shards import (
    REJECTED,
    Sample,
    ShardRecord,
    load_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from tqdm import tqdm

from mimae_scale.diskfull import DiskFull, disk_full_errno, free_bytes, human_bytes, release_files
from mimae_scale.fileio import write_json_atomic, write_text_atomic

PARTS = ".parts"
TAR_RECORD = 10240  # tarfile pads every archive to a multiple of this


class BuildError(Exception):
    """Bad build input (unknown class, empty source, settings changed between runs)."""


@dataclass(frozen=True)
class BuildSettings:
    prefix: str = "train"
    shard_size: int = 1000
    seed: int = 0
    encode: EncodeSettings = field(default_factory=EncodeSettings)


def read_class_list(path: Path) -> list[str]:
    """Classes from another shard set's manifest.json (or its directory), or a text file, one per line."""
    if path.is_dir() or path.suffix == ".json":
        return list(load_manifest(path if path.is_dir() else path.parent)["classes"])
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def list_source(src: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every input, and the class list.

    ``src`` is a class-per-folder tree (ImageNet's train layout: ``SRC/<class>/<image>``) or a text
    file of ``PATH CLASS`` lines (relative paths are relative to the file; CLASS is a class name).
    The class list is ``classes`` when given (so a val set shares the train set's indices), else the
    sorted class names found.
    """
    pairs: list[tuple[str, str]] = []
    if src.is_dir():
        for class_dir in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for root, dirs, files in os.walk(class_dir):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                pairs += [(os.path.join(root, f), class_dir.name) for f in sorted(files) if not f.startswith(".")]
    elif src.is_file():
        for lineno, line in enumerate(src.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2:
                raise BuildError(f"{src}:{lineno}: expected 'PATH CLASS', got {line!r}")
            path = fields[0] if os.path.isabs(fields[0]) else str(src.parent / fields[0])
            pairs.append((path, fields[1]))
    else:
        raise BuildError(f"{src}: no such directory or file list")
    if not pairs:
        raise BuildError(f"{src}: no input files found")
    if classes is None:
        classes = sorted({c for _, c in pairs})
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for _, c in pairs} - lookup.keys())
    if unknown:
        raise BuildError(f"{src}: classes not in the class list: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return [(p, lookup[c]) for p, c in pairs], classes


def _build_chunk(job: tuple[Path, str, list[tuple[int, str, int]], EncodeSettings]) -> dict[str, Any]:
    """Worker: encode one chunk's inputs and write its shard; returns the chunk's record."""
    out_dir, name, items, enc = job
    samples, rejected, reencoded = [], [], 0
    for global_idx, path, label in items:
        try:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise Rejected(UNREADABLE, str(e)) from e
            jpg, _w, _h, was_reencoded = to_baseline_jpeg(data, enc)
        except Rejected as r:
            rejected.append({"path": path, "class": label, "reason": r.reason, "detail": r.detail})
            continue
        reencoded += was_reencoded
        samples.append(Sample(f"{global_idx:09d}", jpg, label, path))
    shard = asdict(write_shard(out_dir, name, samples)) if samples else None
    record = {"name": name, "inputs": len(items), "shard": shard, "rejected": rejected, "reencoded": reencoded}
    write_json_atomic(out_dir / PARTS / (name + ".json"), record)
    return record


def build(
    src: Path,
    out_dir: Path,
    settings: BuildSettings,
    *,
    workers: int = 1,
    classes: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish building) the shard set in ``out_dir``; returns the manifest."""
    items, classes = list_source(src, classes)
    order = list(range(len(items)))
    random.Random(settings.seed).shuffle(order)  # global shuffle: DALI's shuffle is only a window
    shuffled = [(i, items[j][0], items[j][1]) for i, j in enumerate(order)]

    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    plan = {
        "source": str(src.resolve()),
        "inputs": len(items),
        "classes": classes,
        "settings": asdict(settings),
    }
    plan_path = out_dir / PARTS / "build.json"
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            changed = [k for k in plan if previous.get(k) != plan[k]]
            raise BuildError(f"{out_dir}: an earlier build used other {changed}; use a new OUT or remove it")
    else:
        write_json_atomic(plan_path, plan)

    size = settings.shard_size
    jobs, records = [], {}
    for n, start in enumerate(range(0, len(shuffled), size)):
        name = shard_name(settings.prefix, n)
        part = out_dir / PARTS / (name + ".json")
        if part.exists():
            record = json.loads(part.read_text())
            if record["shard"] is None or (out_dir / name).exists():
                records[name] = record
                continue
        jobs.append((out_dir, name, shuffled[start : start + size], settings.encode))

    chunks = [*records, *(job[1] for job in jobs)]
    try:
        return _run(src, out_dir, settings, jobs, records, items, classes, workers, progress)
    except Exception as exc:
        code = disk_full_errno(exc, out_dir)
        if code is None:
            raise
        release_files(exc)
        raise _disk_full(code, out_dir, jobs, chunks) from None


def _run(src: Path, out_dir: Path, settings: BuildSettings, jobs: list, records: dict[str, Any],
         items: list[tuple[str, int]], classes: list[str], workers: int, progress: bool) -> dict[str, Any]:
    """Build the chunks of ``jobs`` (adding their records to ``records``), then the manifest."""
    done = sum(r["inputs"] for r in records.values())
    with tqdm(total=len(items), initial=done, unit="img", disable=not progress, desc="build") as bar:
        if workers > 1 and len(jobs) > 1:
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for record in pool.imap_unordered(_build_chunk, jobs):
                    records[record["name"]] = record
                    bar.update(record["inputs"])
        else:
            for job in jobs:
                record = _build_chunk(job)
                records[record["name"]] = record
                bar.update(record["inputs"])

    ordered = [records[k] for k in sorted(records)]
    rejected = [r for rec in ordered for r in rec["rejected"]]
    write_text_atomic(out_dir / REJECTED, "".join(json.dumps(r) + "\n" for r in rejected))
    return write_manifest(
        out_dir,
        classes=classes,
        shards=[ShardRecord(**rec["shard"]) for rec in ordered if rec["shard"] is not None],
        settings={**asdict(settings), "source": str(src.resolve())},
        inputs=len(items),
        rejected=len(rejected),
        reencoded=sum(rec["reencoded"] for rec in ordered),
        tool="mimae-shards build",
    )


def _disk_full(code: int, out_dir: Path, jobs: list, chunks: list[str]) -> DiskFull:
    """Remove the unfinished chunks' temporary files (workers killed mid-write leave them under their
    own pid, which no later run would reuse) and describe what is left to build."""
    for tmp in [*out_dir.glob(".*.tmp-*"), *(out_dir / PARTS).glob(".*.tmp-*")]:
        tmp.unlink(missing_ok=True)
    unfinished = [job for job in jobs if not (out_dir / PARTS / (job[1] + ".json")).exists()]
    # the inputs still to encode (their JPEG bytes are kept unless re-encoded) plus the tar format's
    # share: per sample three 512-byte headers, the .cls and .path.txt blocks and half a block of
    # padding; per shard the 10240-byte end-of-archive record
    inputs = [path for job in unfinished for _, path, _ in job[2]]
    left = sum(Path(p).stat().st_size for p in inputs if Path(p).is_file()) + 2816 * len(inputs)
    left += TAR_RECORD * len(unfinished)
    return DiskFull(code, "shards into", out_dir, f"about {human_bytes(left)} more", free_bytes(out_dir),
                    f"{len(chunks) - len(unfinished)} of {len(chunks)} shards done and kept; run the same command "
                    "again to finish the build once there is room")
