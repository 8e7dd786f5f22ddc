"""Read a W&B offline run (``<dir>/wandb/offline-run-*/run-*.wandb``) back, for the tracking tests.

wandb 0.31 dropped its Python reader of this file, so this one follows the format: a 7-byte header
(``:W&B``, magic, version), then LevelDB's log format (32 KiB blocks; each chunk has a 7-byte header:
CRC, little-endian length, type 1 full / 2 first / 3 middle / 4 last; a block's tail under 7 bytes is
padding), each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, out, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        if pos + HEADER + length > len(data):  # the writer is still at it: what is complete so far
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wait_for_exit(path: Path, timeout_s: float = 30.0) -> None:
    """Wait until the run's exit record is in the file: ``wandb.finish()`` returns once the W&B service
    has the run's data, which its own process writes to the file a moment later."""
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in records(path)):
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s"
        time.sleep(0.1)


def history(path: Path) -> dict[int, dict[str, Any]]:
    """{step: {key: value}} of the run's ``wandb.log`` calls (values decoded from their JSON)."""
    rows = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[items["_step"]] = items
    return rows


def config(path: Path) -> dict[str, Any]:
    """The run's config (``wandb.init(config=...)``), top-level keys to values."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return {item.key: json.loads(item.value_json) for item in record.run.config.update if item.key != "_wandb"}
    return {}
