"""Shard sets on object storage: ``mimae-shards build SRC s3://bucket/prefix`` and ``verify s3://...``.

A build writes the set to a local staging directory first (the same resumable build as for a local
OUT: chunk records, atomic files), then uploads it: each tar and its index, ``rejected.jsonl``, and
``manifest.json`` last, so a reader never sees a manifest naming a tar that is not there yet. An
object already there with the local file's size is not sent again, so a re-run after an interrupted
upload sends only the rest. The staging directory is kept (a later build of the same OUT resumes
from it; delete it when done): ``--stage DIR``, by default ``$MIMAE_CACHE/stage/<bucket>/<prefix>``
(``MIMAE_CACHE`` defaults to ``~/.cache/mimae_scale``).

Verify downloads one shard (tar and index) at a time to a temporary directory and runs the local
checks on it: every byte is read anyway for the checksum.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from mimae_scale.data_tools.shards import MANIFEST, REJECTED

from mimae_scale.data import remote


def default_stage(url: str) -> Path:
    cache = Path(os.environ.get("MIMAE_CACHE", Path.home() / ".cache" / "mimae_scale"))
    bucket, prefix = remote.split_s3(url)
    return cache / "stage" / bucket / prefix.strip("/")


def publish(stage: Path, url: str, manifest: dict) -> int:
    """Upload the staged shard set to ``url`` (manifest last); returns how many objects were sent."""
    names = [n for s in manifest["shards"] for n in (s["name"], s["index"])] + [REJECTED]
    sent = 0
    for name in names:
        local, target = stage / name, remote.join(url, name)
        if remote.object_size(target) != local.stat().st_size:
            remote.upload(local, target)
            sent += 1
    remote.upload(stage / MANIFEST, remote.join(url, MANIFEST))
    return sent + 1


def load_remote_manifest(url: str) -> dict:
    """The manifest of the shard set at ``url``; ``ValueError``/``RemoteError`` naming it otherwise."""
    from mimae_scale.data_tools.shards import FORMAT

    where = remote.join(url, MANIFEST)
    try:
        manifest = json.loads(remote.read_text(where))
    except remote.RemoteMissing:
        raise FileNotFoundError(f"{where}: no manifest (not a shard set written by mimae-shards?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class ShardDownloads:
    """Each shard of a remote set, fetched to a temporary directory when its turn comes and removed
    after: ``with ShardDownloads(url) as d: d.fetch(entry)`` -> the local directory holding it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> ShardDownloads:
        self._tmp = tempfile.TemporaryDirectory(prefix="mimae-verify-")
        self.dir = Path(self._tmp.name)
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def fetch(self, entry: dict) -> Path:
        for old in self.dir.iterdir():
            old.unlink()
        for name in (entry["name"], entry["index"]):
            with contextlib.suppress(remote.RemoteMissing):  # the local checks name the missing file
                remote.download(remote.join(self.url, name), self.dir / name)
        return self.dir

    def tar_names(self) -> list[str]:
        return [t.rsplit("/", 1)[-1] for t in remote.list_tars(self.url)]
