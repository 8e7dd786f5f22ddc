"""``mimae-shards verify OUT``: find every way a shard set can kill or skew a training run.

Checks, per shard listed in the manifest: the file exists and its sha256 matches; the tar reads to
its end; the DALI index equals the one the tar implies (a stale index makes DALI read garbage);
the sample count matches; every sample has ``jpg`` and ``cls``; the class index is in range; the
JPEG decodes fully (all samples, or a seeded random ``fraction`` of them). Tars in the directory
that the manifest does not list are reported too. OUT may be an ``s3://`` prefix.
"""

from __future__ import annotations

import random
import tarfile
from contextlib import nullcontext
from pathlib import Path

from mimae_scale.data_tools.encode import Rejected, check_jpeg
from mimae_scale.data_tools.index import format_index, scan_tar
from mimae_scale.data_tools.remote_set import ShardDownloads, load_remote_manifest
from mimae_scale.data_tools.shards import load_manifest, sha256_file
from tqdm import tqdm

from mimae_scale.data import remote

REQUIRED = ("jpg", "cls")


def _verify_shard(out_dir: Path, entry: dict, num_classes: int, fraction: float, rng: random.Random) -> list[str]:
    name = entry["name"]
    tar_path, idx_path = out_dir / name, out_dir / entry["index"]
    if not tar_path.exists():
        return [f"{name}: missing shard file"]
    problems = []
    if sha256_file(tar_path) != entry["sha256"]:
        problems.append(f"{name}: checksum mismatch (file changed or damaged since it was written)")
    try:
        samples = scan_tar(tar_path)
    except (tarfile.TarError, EOFError, OSError) as e:
        return [*problems, f"{name}: truncated or damaged tar: {e}"]
    if not idx_path.exists():
        problems.append(f"{entry['index']}: missing index file")
    elif idx_path.read_text() != format_index(samples):
        problems.append(f"{entry['index']}: index does not match {name} (stale index; rebuild it)")
    if len(samples) != entry["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['samples']}")
    with open(tar_path, "rb") as f:
        for comps in samples:
            by_ext = {c.ext: c for c in comps}
            key = comps[0].name.split(".", 1)[0]
            missing = [e for e in REQUIRED if e not in by_ext]
            if missing:
                problems.append(f"{name}: sample {key}: missing component {', '.join(missing)}")
                continue
            f.seek(by_ext["cls"].offset)
            cls_text = f.read(by_ext["cls"].size)
            if not cls_text.strip().isdigit() or not 0 <= int(cls_text) < num_classes:
                problems.append(f"{name}: sample {key}: class {cls_text[:20]!r} not in [0, {num_classes})")
            if fraction < 1.0 and rng.random() >= fraction:
                continue
            f.seek(by_ext["jpg"].offset)
            try:
                check_jpeg(f.read(by_ext["jpg"].size))
            except Rejected as r:
                problems.append(f"{name}: sample {key}: corrupt JPEG ({r.reason}: {r.detail})")
    return problems


def verify(out_dir: Path | str, *, fraction: float = 1.0, seed: int = 0, progress: bool = True) -> list[str]:
    """Every problem found, one line each; empty when the shard set is sound. ``out_dir`` may be an
    ``s3://`` prefix: each shard is then downloaded in turn (data_tools/remote_set.py)."""
    downloads = ShardDownloads(str(out_dir)) if remote.is_remote(str(out_dir)) else None
    try:
        manifest = load_remote_manifest(str(out_dir)) if downloads else load_manifest(out_dir)
    except (FileNotFoundError, ValueError, remote.RemoteError) as e:
        return [str(e)]
    rng = random.Random(seed)
    problems = []
    entries = manifest["shards"]
    with downloads or nullcontext():
        for entry in tqdm(entries, unit="shard", disable=not progress, desc="verify"):
            where = downloads.fetch(entry) if downloads else Path(out_dir)
            problems += _verify_shard(where, entry, manifest["num_classes"], fraction, rng)
        tars = downloads.tar_names() if downloads else [p.name for p in sorted(Path(out_dir).glob("*.tar"))]
    listed = {e["name"] for e in entries}
    problems += [f"{name}: shard not listed in the manifest" for name in tars if name not in listed]
    total = sum(e["samples"] for e in entries)
    if total != manifest["total_samples"]:
        problems.append(f"manifest: total_samples {manifest['total_samples']} but shards hold {total}")
    return problems
