"""Atomic writes (mimae_scale/fileio.py): the final name holds the old or the new content, never a part."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mimae_scale.fileio import atomic_path, write_json_atomic, write_text_atomic


def test_writes_replace_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    write_text_atomic(path, "step_1\n")
    write_text_atomic(path, "step_2\n")
    assert path.read_text() == "step_2\n"
    obj = {"b": [1, 2.5], "a": os.urandom(8).hex()}
    write_json_atomic(tmp_path / "m.json", obj)
    assert json.loads((tmp_path / "m.json").read_text()) == obj
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "m.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        assert tmp.parent == path.parent and tmp.name.startswith(".")
        raise RuntimeError("killed half-way")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]
