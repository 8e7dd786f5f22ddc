"""``data.remote_cache``: read an ``s3://`` shard set from local copies, fetched once per tar.

Why: DALI 2.4 reads an ``s3://`` tar with one ranged GET per sample component, one after another
in its reader thread (82 GETs for 40 two-component samples, measured against the loopback server),
so the store's request latency, not its bandwidth, sets the rate. One GET per whole tar into a
local directory, then the usual local reading, does not have that limit.

The copies live in ``<data.remote_cache>/<bucket>/<key>``, tars and index files, each beside a
``.etag`` file holding the object's ETag: a copy whose object has changed is fetched again. At most
``data.remote_cache_gb`` (0: no limit) are kept: before a fetch, copies of other shard sets are
removed, least recently used first; a shard set larger than the limit is refused (DataError), since
every reader opens all of its tars at once. Ranks on one machine share the directory: an exclusive
lock makes one fetch while the others wait and then find the copies.

Sample identity does not change: the copies keep the tars' order and file names, and the offsets
are the tars' own, so sample ids, traces and checkpoints are those of the remote set.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import replace
from pathlib import Path

from mimae_scale.data import remote
from mimae_scale.data.shardset import DataError, ShardSet

log = logging.getLogger(__name__)
ETAG = ".etag"


def _local(cache: Path, url: str) -> Path:
    bucket, key = remote.split_s3(url)
    return cache / bucket / key


def _copies(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and p.suffix != ETAG and p.name != ".lock"
            and not p.name.startswith(".")]


def _evict(cache: Path, keep: set[Path], room: int, limit: int) -> None:
    """Remove copies outside ``keep``, least recently used first, until ``room`` more bytes fit."""
    copies = _copies(cache)
    used = sum(p.stat().st_size for p in copies)
    for old in sorted((p for p in copies if p not in keep), key=lambda p: p.stat().st_mtime):
        if used + room <= limit:
            return
        used -= old.stat().st_size
        old.unlink()
        old.with_name(old.name + ETAG).unlink(missing_ok=True)


def _fetch(url: str, local: Path, etag: str) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    remote.download(url, tmp)
    os.replace(tmp, local)
    local.with_name(local.name + ETAG).write_text(etag)


def cached(shards: ShardSet, cache_dir: str, limit_gb: float, where: str) -> ShardSet:
    """``shards`` (``s3://`` tars and indexes) read from copies under ``cache_dir``, fetched when
    missing or changed; a :class:`DataError` naming ``where`` and the setting otherwise."""
    if any(remote.scheme(u) != "s3" for u in shards.tars):
        raise DataError(f"{where}: data.remote_cache holds s3:// shards only")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    urls = [*shards.tars, *shards.indexes]
    try:
        heads = remote.read_many(urls, remote.object_head)
    except remote.RemoteError as exc:
        raise DataError(f"{where}: {exc}") from None
    locals_ = [_local(cache, u) for u in urls]
    total = sum(size for size, _ in heads)
    limit = int(limit_gb * 1e9) if limit_gb > 0 else None
    if limit is not None and total > limit:
        raise DataError(f"{where}: the shard set is {total / 1e9:.3f} GB, more than data.remote_cache_gb={limit_gb}; "
                        "raise it, or leave data.remote_cache empty to read from the store")
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank fetches, the others then find the copies
        stale = [i for i, (p, (size, etag)) in enumerate(zip(locals_, heads, strict=True))
                 if not p.exists() or p.stat().st_size != size
                 or not p.with_name(p.name + ETAG).exists() or p.with_name(p.name + ETAG).read_text() != etag]
        if limit is not None:
            _evict(cache, set(locals_), sum(heads[i][0] for i in stale), limit)
        try:
            remote.read_many(stale, lambda i: _fetch(urls[i], locals_[i], heads[i][1]))
        except remote.RemoteError as exc:
            raise DataError(f"{where}: {exc}") from None
        for p in locals_:
            os.utime(p)  # used now: the last to go when room is needed
    log.info("%s: %d of %d objects fetched (%.1f MB) into data.remote_cache=%s", where, len(stale), len(urls),
             sum(heads[i][0] for i in stale) / 1e6, cache_dir)
    n = len(shards.tars)
    return replace(shards, tars=[str(p) for p in locals_[:n]], indexes=[str(p) for p in locals_[n:]])
