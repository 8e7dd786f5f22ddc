"""Checkpoints that survive crashes: DeepSpeed's own files, our state, and a completion protocol.

Layout of ``<run_dir>/checkpoints/``::

    step_000000500/                 one checkpoint ("tag"), written by every rank
        mp_rank_00_model_states.pt  DeepSpeed: module (+ our client state, rank 0's copy)
        *_optim_states.pt           DeepSpeed: ZeRO partitions, one per rank
        mimae_rank00000.pt          ours: that rank's data-loader position and RNG states
        mimae_complete.json         ours: written by rank 0 only after every rank finished
    latest                          name of the newest complete tag (moved atomically)

A tag without ``mimae_complete.json`` was interrupted: it is never loaded and is deleted by the
next save. ``latest`` is moved (write a temporary file, then ``os.replace``) only after the marker,
so a crash at any moment leaves the previous checkpoint complete and chosen on restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mimae_scale.engine import faults

log = logging.getLogger("mimae_scale.engine")

MARKER = "mimae_complete.json"
LATEST = "latest"
FORMAT = "mimae_scale/1"


class CheckpointMismatch(RuntimeError):
    """The run directory's checkpoint cannot be resumed by this run (config or world size differ)."""


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    return f"mimae_rank{rank:05d}.pt"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the state we add to DeepSpeed's ------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch generator states, in plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(frozen=True)
class Complete:
    """What the completion marker says about a checkpoint (readable without loading it)."""

    tag: str
    step: int
    world_size: int
    zero_stage: int
    fingerprint: str
    method: dict[str, Any]  # the config sections the fingerprint covers


class CheckpointManager:
    def __init__(self, root: Path, rank: int, keep_last: int) -> None:
        self.root = root
        self.rank = rank
        self.keep_last = keep_last

    # -- reading -------------------------------------------------------------------------------

    def complete(self) -> list[Complete]:
        """Complete checkpoints, oldest first."""
        found = []
        for marker in self.root.glob(f"step_*/{MARKER}"):
            info = json.loads(marker.read_text())
            found.append(Complete(marker.parent.name, info["step"], info["world_size"], info["zero_stage"],
                                  info["fingerprint"], info["method"]))
        return sorted(found, key=lambda c: c.step)

    def newest(self) -> Complete | None:
        done = self.complete()
        return done[-1] if done else None

    # -- writing -------------------------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             marker: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. Returns the tag directory once it is complete."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        started = time.perf_counter()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # left by a save that crashed at this step before: never half-reuse it
                shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        tmp = tag_dir / (rank_file(self.rank) + ".tmp")
        torch.save(rank_state, tmp)
        os.replace(tmp, tag_dir / rank_file(self.rank))
        faults.maybe_crash_in_save(step, self.rank)
        dist.barrier()  # every rank has written everything it owns
        if self.rank == 0:
            _fsync_tree(tag_dir)
            _write_atomic(tag_dir / MARKER, json.dumps({"tag": tag, "step": step, **marker}, indent=2) + "\n")
            _write_atomic(self.root / LATEST, tag + "\n")
            self._prune(keep=tag)
        dist.barrier()  # nobody leaves (or exits) before the checkpoint counts
        log.info("checkpoint %s complete (%.1f s)", tag_dir, time.perf_counter() - started)
        return tag_dir

    def _prune(self, keep: str) -> None:
        """Delete complete checkpoints beyond the newest ``keep_last`` and every interrupted one."""
        complete = [c.tag for c in self.complete()]
        doomed = set(complete[: -self.keep_last])
        doomed |= {p.name for p in self.root.glob("step_*") if p.is_dir() and p.name not in complete}
        doomed.discard(keep)
        for name in sorted(doomed):
            marker = self.root / name / MARKER
            marker.unlink(missing_ok=True)  # first un-complete it, so a crash mid-delete leaves it ignored
            shutil.rmtree(self.root / name)

    # -- loading -------------------------------------------------------------------------------

    def load(self, engine, chosen: Complete, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load a complete checkpoint; returns (client state, this rank's state)."""
        path, client_state = engine.load_checkpoint(str(self.root), tag=chosen.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / chosen.tag}")
        rank_state = torch.load(self.root / chosen.tag / rank_file(self.rank), map_location="cpu",
                                weights_only=True)
        return client_state, rank_state


def check_resumable(chosen: Complete, fingerprint: str, method: dict[str, Any], world_size: int,
                    zero_stage: int, root: Path) -> None:
    """Refuse, naming what differs, a checkpoint this run cannot continue."""
    if chosen.fingerprint != fingerprint:
        diffs = _diff(chosen.method, method)
        raise CheckpointMismatch(
            f"{root / chosen.tag} was written with a different model/method configuration "
            f"(fingerprint {chosen.fingerprint}, this run {fingerprint}): " + "; ".join(diffs)
            + ". Use a new run_dir, or the original settings."
        )
    if chosen.world_size != world_size or chosen.zero_stage != zero_stage:
        tag_dir = root / chosen.tag
        raise CheckpointMismatch(
            f"{tag_dir} was written by {chosen.world_size} ranks with ZeRO stage {chosen.zero_stage}; this run "
            f"has {world_size} ranks and stage {zero_stage}. Resume with {chosen.world_size} ranks and stage "
            f"{chosen.zero_stage}, or convert it to a universal checkpoint for another layout with "
            f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {tag_dir} "
            f"--output_folder {tag_dir}_universal` (loading universal checkpoints is not wired into "
            f"train.py yet; the data position restarts with the new layout)."
        )


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix}: checkpoint {old!r}, now {new!r}"]
