"""A full disk (ENOSPC, or EDQUOT: the user's quota) while writing a checkpoint or a shard set.

The writers fail in several ways when the disk fills: Python's ``open``/``write``/``fsync`` raise
``OSError`` with the errno, but torch's C++ zip writer (``torch.save`` to a path, which DeepSpeed
uses) loses it and raises ``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected
pos ...``. :func:`disk_full_errno` recognises both: the errno where an exception carries one, else a
small probe write in the same folder, which fails with the real errno when (and only when) there is
no room. The caller then removes what it half-wrote and raises :class:`DiskFull`, whose message is
the one line a user sees (train.py and ``mimae-shards build`` exit with ``EXIT_DISK_FULL``).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import traceback
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
PROBE_BYTES = 1 << 20  # the probe write: more than the slack a failed write leaves (< one block)


class DiskFull(Exception):
    """No room (ENOSPC/EDQUOT) for a write; ``str()`` is the one-line report."""

    def __init__(self, code: int, what: str, path: Path, needed: str, free: int, outcome: str) -> None:
        self.code, self.path, self.free = code, path, free
        super().__init__(
            f"disk full ({errno.errorcode.get(code, code)}: {os.strerror(code)}) writing {what} {path}: "
            f"needs {needed}, {human_bytes(free)} free there; {outcome}"
        )


def human_bytes(n: int) -> str:
    """``3.9 MB (3912345 bytes)``: readable, and exact for whoever frees the space."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (its nearest existing folder)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it is absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile
            total += p.stat().st_size if p.is_file() else 0
    return total


def _errno_in_chain(exc: BaseException | None) -> int | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def probe(directory: Path) -> int | None:
    """ENOSPC/EDQUOT when ``PROBE_BYTES`` cannot be written (and flushed) in ``directory``, else None."""
    directory = Path(directory)
    while not directory.is_dir():
        directory = directory.parent
    path = directory / f".mimae-space-probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)  # delayed allocation (ext4, NFS) reports a full disk only here
        finally:
            os.close(fd)
    except OSError as exc:
        return exc.errno if exc.errno in DISK_FULL_ERRNOS else None
    finally:
        path.unlink(missing_ok=True)
    return None


def disk_full_errno(exc: BaseException, directory: Path) -> int | None:
    """ENOSPC/EDQUOT if ``exc`` (raised while writing under ``directory``) came from a full disk."""
    found = _errno_in_chain(exc)
    if found is not None:
        return found
    if isinstance(exc, (OSError, RuntimeError)):  # torch's zip writer drops the errno
        return probe(directory)
    return None


def release_files(exc: BaseException) -> None:
    """Close the files a failed write left open. torch's zip writer keeps its file open in the frames
    of the exception (and of the one its ``__exit__`` raised while handling it), and a deleted file's
    space is freed only when it is closed: without this the free space reported is too low."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def remove_tree(path: Path) -> None:
    """Remove a half-written folder or file (on a full disk deleting still works; errors are ignored
    because another rank may be removing the same shared folder)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
