"""Atomic file writes: a file is either absent or complete under its final name, never half-written.

Used by the checkpoints (``latest``, the completion marker, each rank's state), the shard writer
(tars, indexes, manifests, build records) and the exporters, so a crash or a kill at any moment
leaves at worst a hidden temporary file, which the next run overwrites or ignores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path(path: Path) -> Path:
    """The hidden sibling a write goes to first; the pid keeps concurrent writers (build workers) apart."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success flush it to disk (fsync, so
    the rename never publishes a file whose data a crash could still lose) and rename it over
    ``path``; on an exception remove it."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON (``indent=1`` unless ``dumps`` says otherwise) and a final newline."""
    write_text_atomic(path, json.dumps(obj, **{"indent": 1, **dumps}) + "\n")
