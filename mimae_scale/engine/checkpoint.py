"""Checkpoints that survive crashes: DeepSpeed's own files, our state, and a completion protocol.

Layout of ``<run_dir>/checkpoints/``::

    step_000000500/                 one checkpoint ("tag"), written by every rank
        mp_rank_00_model_states.pt  DeepSpeed: module (+ our client state, rank 0's copy)
        *_optim_states.pt           DeepSpeed: ZeRO partitions, one per rank
        mimae_rank00000.pt          ours: that rank's share of the TrainState (loader position, RNG)
        mimae_complete.json         ours: written by rank 0 only after every rank finished; lists
                                    every file above with its size and sha256
        universal/                  DeepSpeed's universal format, made once when a run resumes it
                                    on another number of ranks (its own marker inside)
    latest                          name of the newest complete tag (moved atomically)
    damaged_step_000000400/         a checkpoint that failed verification, set aside (never deleted)

A tag without ``mimae_complete.json`` was interrupted: it is never loaded and is deleted by the
next save. ``latest`` is moved (write a temporary file, then ``os.replace``) only after the marker,
so a crash at any moment leaves the previous checkpoint complete and chosen on restart.

Before a checkpoint is loaded, the sizes and sha256 sums of the files its marker lists are checked
(each rank checks a share of the files); a damaged one, or one DeepSpeed cannot read, is renamed
``damaged_<tag>`` with an error in the log and the ``mimae_checkpoints_set_aside_total`` metric,
and the next older complete checkpoint is tried. When none is usable, :class:`CheckpointUnusable`
(one line naming the files; train.py exits 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from mimae_scale.config import Config, method_sections
from mimae_scale.diskfull import (
    DiskFull,
    disk_full_errno,
    free_bytes,
    human_bytes,
    release_files,
    remove_tree,
    tree_bytes,
)
from mimae_scale.engine import faults
from mimae_scale.fileio import atomic_path, write_text_atomic

log = logging.getLogger("mimae_scale.engine")

MARKER = "mimae_complete.json"
LATEST = "latest"
FORMAT = "mimae_scale/3"  # 3: loaders record the epoch's used samples, the trainer its accumulation
UNIVERSAL = "universal"  # the tag's universal-format copy, for resuming on another number of ranks
CONFIG_KEY = "config"  # the run's config in the client state (evaluation and export read it there)
DAMAGED_PREFIX = "damaged_"  # not "step_*": never pruned, never chosen
CHUNK = 8 << 20  # bytes read at a time while hashing


class CheckpointMismatch(RuntimeError):
    """The run directory's checkpoint cannot be resumed by this run (config or world size differ)."""


class CheckpointUnusable(RuntimeError):
    """Every complete checkpoint of the run failed verification or loading (all set aside)."""


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    return f"mimae_rank{rank:05d}.pt"


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


# -- integrity ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def describe(tag_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{relative name: {"size", "sha256"}} of ``names`` under ``tag_dir``."""
    return {name: {"size": (tag_dir / name).stat().st_size, "sha256": sha256_file(tag_dir / name)} for name in names}


def problems_in(tag_dir: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """What differs from the marker's record of ``files``: missing, wrong size, wrong checksum."""
    found = []
    for name, want in sorted(files.items()):
        path = tag_dir / name
        try:
            size = path.stat().st_size
            if size != want["size"]:
                found.append(f"{path} has {size} bytes, the marker says {want['size']}")
            elif sha256_file(path) != want["sha256"]:
                found.append(f"{path} fails its sha256 check")
        except OSError as exc:
            found.append(f"{path}: {exc.strerror or exc}")
    return found


def _all_ranks(mine: Any) -> list[Any]:
    """Every rank's ``mine``, in rank order (just ``[mine]`` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _shared(items: list[Any]) -> list[Any]:
    """This rank's share of ``items`` (every rank hashes a part of the files, in parallel)."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


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


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RngStreams:
    """This process's Python, NumPy and torch (CUDA) generators as a :class:`Stateful`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.device)


class RunConfig:
    """The run's whole config in the checkpoint (evaluation and export read it from a tag folder
    alone); loading it refuses a checkpoint whose method sections differ from this run's."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def state_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        diffs = _diff(method_sections(state), self.cfg.method())
        if diffs:
            raise CheckpointMismatch("the checkpoint was written with another model/method configuration: "
                                     + "; ".join(diffs))


class TrainState:
    """The one owner of what a checkpoint holds beside DeepSpeed's engine (torchtitan's pattern).

    Components register under a name. ``replicated`` ones are identical on every rank (counters, the
    config, a replicated network): saved once, in DeepSpeed's client state of the model-states file,
    which evaluation and export read. The others are each rank's own (loader position, RNG streams):
    saved in that rank's ``mimae_rankNNNNN.pt``. Loading hands each component back its own entry.
    """

    def __init__(self) -> None:
        self.replicated: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}

    def register(self, name: str, component: Stateful, *, replicated: bool) -> None:
        if name in self.replicated or name in self.per_rank or name == "format":
            raise ValueError(f"TrainState: {name!r} is registered twice")
        (self.replicated if replicated else self.per_rank)[name] = component

    def client_state(self) -> dict[str, Any]:
        # imported here: importing DeepSpeed logs its accelerator choice on stdout, which the readers
        # of this module that print JSON there (mimae-export) must not get
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # UNIVERSAL_CHECKPOINT_INFO: what DeepSpeed's ds_to_universal needs to convert the checkpoint
        # for another layout (data parallel only: no tensor-parallel merge patterns)
        return {"format": FORMAT, **{name: c.state_dict() for name, c in self.replicated.items()},
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}

    def rank_state(self) -> dict[str, Any]:
        return {"format": FORMAT, **{name: c.state_dict() for name, c in self.per_rank.items()}}

    def load(self, client: dict[str, Any], rank_state: dict[str, Any] | None, where: Path,
             skip: tuple[str, ...] = ()) -> None:
        """Hand every component its entry; ``rank_state`` None: this rank has no file of its own (the
        checkpoint was written by fewer ranks) and its per-rank components keep their fresh state;
        ``skip``: per-rank components whose saved state does not apply (another layout)."""
        for part in (client, rank_state or {"format": FORMAT}):
            if part.get("format") != FORMAT:
                raise CheckpointMismatch(f"{where}: format {part.get('format')!r}, this version reads {FORMAT!r}")
        # A component refuses a state it cannot continue (ValueError: e.g. the loader's shard set
        # changed): the checkpoint is sound and this run does not fit it, not a damaged file to set aside.
        try:
            for name, component in self.replicated.items():
                component.load_state_dict(client[name])
            if rank_state is not None:
                for name, component in self.per_rank.items():
                    if name not in skip:
                        component.load_state_dict(rank_state[name])
        except ValueError as exc:
            raise CheckpointMismatch(f"{where}: {name}: {exc}") from None


@dataclass(frozen=True)
class Complete:
    """What the completion marker says about a checkpoint (readable without loading it)."""

    tag: str
    step: int
    world_size: int
    zero_stage: int
    fingerprint: str
    method: dict[str, Any]  # the config sections the fingerprint covers
    files: dict[str, dict[str, Any]]  # relative name -> {"size", "sha256"}


def checkpoint_bytes(chosen: Complete) -> int:
    """The size of a complete checkpoint, from its marker."""
    return sum(entry["size"] for entry in chosen.files.values())


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class CheckpointManager:
    def __init__(self, root: Path, rank: int, keep_last: int,
                 on_set_aside: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.rank = rank
        self.keep_last = keep_last
        self.on_set_aside = on_set_aside or (lambda tag: None)

    # -- reading -------------------------------------------------------------------------------

    def _markers(self) -> tuple[list[Complete], list[str]]:
        """(complete checkpoints oldest first, tags whose marker cannot be read)."""
        found, unreadable = [], []
        for marker in self.root.glob(f"step_*/{MARKER}"):
            try:
                info = json.loads(marker.read_text())
                # no "files": written before markers listed them; its state's format then names the version
                found.append(Complete(marker.parent.name, info["step"], info["world_size"], info["zero_stage"],
                                      info["fingerprint"], info["method"], info.get("files", {})))
            except (OSError, ValueError, KeyError, TypeError):
                unreadable.append(marker.parent.name)
        return sorted(found, key=lambda c: c.step), sorted(unreadable)

    def complete(self) -> list[Complete]:
        """Complete checkpoints, oldest first."""
        return self._markers()[0]

    def newest(self) -> Complete | None:
        done = self.complete()
        return done[-1] if done else None

    # -- writing -------------------------------------------------------------------------------

    def save(self, engine, step: int, state: TrainState, marker: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. Returns the tag directory once it is complete.
        A full disk (ENOSPC/EDQUOT) raises :class:`DiskFull` after removing the partial tag: the
        previous checkpoint stays the newest."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        started = time.perf_counter()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # left by a save that crashed at this step before: never half-reuse it
                shutil.rmtree(tag_dir)
            self._check_space()
        dist.barrier()
        try:
            self._write(engine, step, state, marker, tag_dir)
        except Exception as exc:
            code = disk_full_errno(exc, tag_dir)
            if code is None:
                raise
            release_files(exc)  # before measuring the free space
            raise self._disk_full(code, tag_dir) from None  # the one line says it all: no traceback
        log.info("checkpoint %s complete (%.1f s)", tag_dir, time.perf_counter() - started)
        return tag_dir

    def _write(self, engine, step: int, state: TrainState, marker: dict[str, Any], tag_dir: Path) -> None:
        tag = tag_dir.name
        engine.save_checkpoint(str(self.root), tag=tag, client_state=state.client_state(), save_latest=False)
        with atomic_path(tag_dir / rank_file(self.rank)) as tmp:
            torch.save(state.rank_state(), tmp)
        faults.maybe_crash_in_save(step, self.rank)
        faults.maybe_edquot_in_save(step, self.rank, tag_dir)
        dist.barrier()  # every rank has written everything it owns
        names = [sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file())]
        dist.broadcast_object_list(names, src=0)  # rank 0's listing is the checkpoint
        files: dict[str, dict[str, Any]] = {}
        for part in _all_ranks(describe(tag_dir, _shared(names[0]))):
            files.update(part)
        if self.rank == 0:
            _fsync_tree(tag_dir)
            record = {"tag": tag, "step": step, **marker, "files": dict(sorted(files.items()))}
            write_text_atomic(tag_dir / MARKER, json.dumps(record, indent=1) + "\n")
            write_text_atomic(self.root / LATEST, tag + "\n")
            self._prune(keep=tag)
        dist.barrier()  # nobody leaves (or exits) before the checkpoint counts

    # -- a full disk -----------------------------------------------------------------------------

    def _check_space(self) -> None:
        """Rank 0, before a save: warn when this save, or the one after it, will not fit, judged by
        the last checkpoint's size (a save needs room for a whole new tag before the oldest is pruned)."""
        done = self.complete()
        if not done:
            return
        size, free = checkpoint_bytes(done[-1]), free_bytes(self.root)
        pruned = sum(checkpoint_bytes(c) for c in done[: max(0, len(done) + 1 - self.keep_last)])
        if free < size:
            log.warning("DISK SPACE: %s free on %s, the last checkpoint (%s) took %s: this save will probably fail",
                        human_bytes(free), self.root, done[-1].tag, human_bytes(size))
        elif free - size + pruned < size:
            log.warning("DISK SPACE: %s free on %s: room for this checkpoint (%s) but not for the next one; free "
                        "space or lower checkpoint.keep_last", human_bytes(free), self.root, human_bytes(size))

    def _disk_full(self, code: int, tag_dir: Path) -> DiskFull:
        """Remove the partial tag (not a complete one: its marker made it count) and describe the state."""
        written = tree_bytes(tag_dir)
        if not (tag_dir / MARKER).exists():
            remove_tree(tag_dir)
        previous = self.newest()
        if previous is not None and previous.tag != tag_dir.name:
            kept = f"partial checkpoint removed, {previous.tag} kept as the latest"
        elif previous is not None:
            kept = f"{previous.tag} was completed before that and is kept"
        else:
            kept = "partial checkpoint removed, there is no earlier checkpoint"
        if previous is not None:
            needed = f"{human_bytes(checkpoint_bytes(previous))} as {previous.tag} did"
        else:  # the first checkpoint: what it had written when the disk filled is a lower bound
            needed = f"more than {human_bytes(written)} (written when the disk filled)"
        return DiskFull(code, "checkpoint", tag_dir, needed, free_bytes(self.root),
                        f"{kept}; free space, then run the same command to resume")

    def _prune(self, keep: str) -> None:
        """Delete complete checkpoints beyond the newest ``keep_last`` and every interrupted one (a
        tag with no marker at all; one whose marker cannot be read is left for resume to set aside)."""
        complete = [c.tag for c in self.complete()]
        doomed = set(complete[: -self.keep_last])
        doomed |= {p.name for p in self.root.glob("step_*") if p.is_dir() and not (p / MARKER).exists()}
        doomed.discard(keep)
        for name in sorted(doomed):
            marker = self.root / name / MARKER
            marker.unlink(missing_ok=True)  # first un-complete it, so a crash mid-delete leaves it ignored
            shutil.rmtree(self.root / name)

    # -- loading -------------------------------------------------------------------------------

    def verify(self, chosen: Complete) -> list[str]:
        """Problems with ``chosen``'s files (empty: every file has its recorded size and sha256).
        Collective when a process group exists: each rank checks a share, all get every problem."""
        names = sorted(chosen.files)
        mine = problems_in(self.root / chosen.tag, {n: chosen.files[n] for n in _shared(names)})
        return [problem for part in _all_ranks(mine) for problem in part]

    def set_aside(self, tag: str, problems: list[str]) -> Path:
        """Rename a damaged checkpoint out of the way (rank 0; never deleted), warn loudly."""
        target = self.root / f"{DAMAGED_PREFIX}{tag}"
        n = 1
        while target.exists():
            target, n = self.root / f"{DAMAGED_PREFIX}{tag}.{n}", n + 1
        if self.rank == 0:
            os.replace(self.root / tag, target)
            log.error("CHECKPOINT DAMAGED: %s set aside as %s (kept for inspection): %s", self.root / tag, target,
                      "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""))
            self.on_set_aside(tag)
        if dist.is_initialized():
            dist.barrier()
        return target

    def resume(self, load: Callable[[Complete], None]) -> Complete | None:
        """Load the newest complete checkpoint that verifies and loads (``load`` raises otherwise),
        setting aside every newer one that does not. None: there is no checkpoint at all.
        Every rank calls this and takes the same decisions."""
        candidates, unreadable = self._markers()
        damaged: list[str] = []
        for tag in unreadable:
            damaged.append(str(self.root / tag / MARKER))
            self.set_aside(tag, [f"{self.root / tag / MARKER} cannot be read"])
        for chosen in reversed(candidates):
            problems = self.verify(chosen)
            if not problems:
                try:
                    load(chosen)
                except (CheckpointMismatch, CheckpointUnusable):
                    raise
                except Exception as exc:  # torch.load / DeepSpeed on a file that passed its checks
                    log.error("loading %s failed", chosen.tag, exc_info=True)
                    problems = [f"{self.root / chosen.tag} does not load: {type(exc).__name__}: {exc}"]
                problems = [p for part in _all_ranks(problems) for p in part]
            if not problems:
                self._point_latest(chosen)
                return chosen
            damaged += problems
            self.set_aside(chosen.tag, problems)
        if damaged:
            raise CheckpointUnusable(f"no usable checkpoint in {self.root}, all set aside as damaged: "
                                     + "; ".join(damaged))
        return None

    def universal(self, chosen: Complete) -> Path:
        """``<tag>/universal``: the checkpoint in DeepSpeed's universal format (any number of ranks),
        converted once by rank 0 with DeepSpeed's ``ds_to_universal`` and kept beside the original with
        its own marker; a conversion that was interrupted or damaged is redone. Collective."""
        tag_dir = self.root / chosen.tag
        out = tag_dir / UNIVERSAL
        failure: list[BaseException | None] = [None]
        if self.rank == 0:
            info = _read_marker(out / MARKER)
            try:
                if info is None or problems_in(out, info["files"]):
                    self._convert(tag_dir, out)
            except Exception as exc:  # every rank must hear of it, not wait for rank 0 at a barrier
                failure = [exc]
        if dist.is_initialized():
            dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise failure[0]
        return out

    def _convert(self, tag_dir: Path, out: Path) -> None:
        work = tag_dir / (UNIVERSAL + ".tmp")
        for stale in (out, work):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        extract = min(8, os.cpu_count() or 1)  # worker processes; merging holds whole tensors, so fewer
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(work), "--num_extract_workers", str(extract),
               "--num_merge_workers", str(max(1, extract // 4))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        (tag_dir / "ds_to_universal.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise CheckpointMismatch(f"{tag_dir}: DeepSpeed's ds_to_universal failed (status {done.returncode}), "
                                     f"see {tag_dir / 'ds_to_universal.log'}; resume with the original layout")
        _both_model_state_names(work)
        _loadable_by_any_stage(work)
        names = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
        _fsync_tree(work)
        write_text_atomic(work / MARKER, json.dumps({"files": describe(work, names)}) + "\n")
        os.replace(work, out)
        log.warning("converted %s to DeepSpeed's universal format in %.1f s (%s, kept for later resumes)",
                    tag_dir, time.perf_counter() - started, out)

    def _point_latest(self, chosen: Complete) -> None:
        latest = self.root / LATEST
        current = latest.read_text().strip() if latest.is_file() else None
        if current != chosen.tag and self.rank == 0:
            log.warning("%s names %s; resuming from %s and pointing it there", latest, current, chosen.tag)
            write_text_atomic(latest, chosen.tag + "\n")


def _both_model_state_names(universal: Path) -> None:
    """Let a universal copy load under any ZeRO stage. DeepSpeed restores the weights from its
    ``zero/`` folder and reads only metadata and our client state from the model-states file, but it
    looks that file up by the *loading* engine's naming: ``zero_pp_rank_0_mp_rank_00_model_states.pt``
    under ZeRO 3, ``mp_rank_00_model_states.pt`` below. The conversion keeps the writer's name;
    the other one is added as a hard link (a copy where links are not supported)."""
    pairs = [("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    for below, stage3 in pairs:
        for have, add in ((below, stage3), (stage3, below)):
            if (universal / have).is_file() and not (universal / add).exists():
                try:
                    os.link(universal / have, universal / add)
                except OSError:
                    shutil.copy2(universal / have, universal / add)


def load_universal(engine, universal: Path) -> tuple[str | None, dict[str, Any]]:
    """Load a universal copy into ``engine`` (configured with ``checkpoint.load_universal``), any ZeRO
    stage 1-3 and number of ranks. Two things DeepSpeed's ZeRO 3 loader gets wrong are put right:
    it gives every parameter group the settings of the first one (weight decay included, so the
    no-decay group would decay), so the groups keep the settings this run built them with; and it
    hands every group the *same* step tensor, which Adam then advances once per group and step (the
    bias correction runs ahead), so each group gets its own copy. The optimiser's moments and step
    come from the checkpoint."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    path, client = engine.load_checkpoint(str(universal), tag=".")
    for group, own in zip(engine.optimizer.param_groups, settings, strict=True):
        group.update(own)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer under ZeRO's wrapper
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return path, client


def _loadable_by_any_stage(universal: Path) -> None:
    """DeepSpeed's ZeRO 1/2 and ZeRO 3 read a universal checkpoint differently, and ``ds_to_universal``
    writes the form of the stage that *wrote* the checkpoint. Add what the other stage reads, so the
    copy resumes under any stage 1-3 (same values, other containers):
    - per parameter, ZeRO 1/2 read ``{"param": tensor of the parameter's shape, "cat_dim"}`` and a
      ``step.pt``; a ZeRO 3 writer leaves flat tensors and no step;
    - ZeRO 1/2 refuse optimizer global state without a DeepSpeed version (a ZeRO 3 writer writes none);
      ZeRO 3 reads the step and the groups' settings from an ``optimizer_state_dict`` entry (a ZeRO 1/2
      writer writes none)."""
    from deepspeed.checkpoint.constants import CAT_DIM, DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_SHAPES

    zero = universal / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim = torch.load(optim_path, map_location="cpu", weights_only=False)  # DeepSpeed's objects, just written
    meta = torch.load(sorted(universal.glob("*model_states.pt"))[0], map_location="cpu", weights_only=False)
    shapes = {name: shape for group in meta[PARAM_SHAPES] for name, shape in group.items()}
    if OPTIMIZER_STATE_DICT in optim:
        step = torch.as_tensor(float(optim[OPTIMIZER_STATE_DICT]["state"][0]["step"]))
    else:
        step = torch.load(next(zero.glob("*/step.pt")), map_location="cpu", weights_only=False)
    for folder in sorted(p for p in zero.iterdir() if p.is_dir() and p.name in shapes):  # not buffers
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            if not (folder / f"{key}.pt").exists():  # a parameter without optimiser state
                continue
            value = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)
            if not isinstance(value, dict):
                torch.save({PARAM: value.view(shapes[folder.name]), CAT_DIM: 0}, folder / f"{key}.pt")
        if not (folder / "step.pt").exists():
            torch.save(step, folder / "step.pt")
    optim.setdefault(DS_VERSION, meta[DS_VERSION])
    optim.setdefault(OPTIMIZER_STATE_DICT, {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]})
    torch.save(optim, optim_path)


def check_resumable(chosen: Complete, cfg: Config, world_size: int, root: Path) -> None:
    """Refuse, naming what differs, a checkpoint this run cannot continue (from its marker alone,
    before anything is built)."""
    fingerprint, zero_stage = cfg.fingerprint(), cfg.engine.zero_stage
    task = (chosen.method or {}).get("task", "pretrain")
    if task != cfg.task:
        hint = f", and finetune.init={root.parent} to start from its encoder" if task == "pretrain" else ""
        raise CheckpointMismatch(f"{root / chosen.tag} is a {task} checkpoint and this run's task is {cfg.task}: "
                                 f"use a new run_dir{hint}")
    if chosen.fingerprint != fingerprint:
        diffs = _diff(chosen.method, cfg.method())
        raise CheckpointMismatch(
            f"{root / chosen.tag} was written with a different model/method configuration "
            f"(fingerprint {chosen.fingerprint}, this run {fingerprint}): " + "; ".join(diffs)
            + ". Use a new run_dir, or the original settings."
        )
    if 0 in (chosen.zero_stage, zero_stage) and (chosen.zero_stage, chosen.world_size) != (zero_stage, world_size):
        raise CheckpointMismatch(
            f"{root / chosen.tag} was written with ZeRO stage {chosen.zero_stage} by {chosen.world_size} ranks; this "
            f"run has stage {zero_stage} and {world_size} ranks. Another layout is converted automatically between "
            f"ZeRO stages 1-3 only: set engine.zero_stage={chosen.zero_stage} and use {chosen.world_size} ranks."
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
