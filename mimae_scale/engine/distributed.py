"""Who am I in the job: rank and world from whichever launcher started us, and the process group.

Launchers announce ranks differently: the ``deepspeed`` launcher and ``torchrun`` set ``RANK`` /
``LOCAL_RANK`` / ``WORLD_SIZE``; ``srun`` sets ``SLURM_PROCID`` / ``SLURM_LOCALID`` /
``SLURM_NTASKS`` (and the batch script exports ``MASTER_ADDR`` / ``MASTER_PORT``); a plain
``python mimae_scale/train.py`` sets nothing and is one rank of one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torch" (deepspeed / torchrun), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise RuntimeError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, local rank and world size. ``RANK`` wins over Slurm's variables, because a
    ``torchrun`` or ``deepspeed`` started inside an allocation sees both."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank = _int(environ, "RANK")
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        return DistEnv(rank, local, _int(environ, "WORLD_SIZE"), "torch")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank = _int(environ, "SLURM_PROCID")
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        return DistEnv(rank, local, _int(environ, "SLURM_NTASKS"), "slurm")
    return DistEnv(0, 0, 1, "single")


def free_port() -> int:
    """A TCP port free on loopback now (for a rendezvous, or a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_rendezvous(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Make the ``env://`` rendezvous variables that torch.distributed reads agree with ``env``."""
    environ = os.environ if environ is None else environ
    if env.launcher == "single":
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    elif env.launcher == "slurm":
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
        if missing and env.world_size > 1:
            raise RuntimeError(
                f"launched by srun without {' and '.join(missing)}: the batch script must export them "
                "(e.g. MASTER_ADDR=$(scontrol show hostnames $SLURM_NODELIST | head -n1), MASTER_PORT=29500)"
            )
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    environ["RANK"] = str(env.rank)
    environ["LOCAL_RANK"] = str(env.local_rank)
    environ["WORLD_SIZE"] = str(env.world_size)


def pick_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """NCCL on GPUs, gloo on CPUs, through DeepSpeed so its communication layer is set up too."""
    import deepspeed

    if dist.is_initialized():
        return
    export_rendezvous(env)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, rank=env.rank, world_size=env.world_size)
    _unlink_shared_allreduce_buffer(env.rank)


def _unlink_shared_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU communication op (all ranks on one host) gives every rank a 66 MB buffer in
    /dev/shm, ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never removes
    it: every run left its ranks' buffers behind (14 GB of memory on the dev box after a day of
    tests). Every rank maps every buffer during ``init_distributed``; after a barrier the names are
    not needed any more, so each rank removes its own and the mappings live on until it exits (a
    killed run leaves nothing either)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    buffer = Path("/dev/shm") / name
    if not buffer.exists():  # GPUs (NCCL), ranks on several hosts, or no shared memory: nothing made
        return
    dist.barrier()
    buffer.unlink(missing_ok=True)


def destroy_process_group() -> None:
    """End this process's group and forget the groups DeepSpeed derived from it (world, data
    parallel), which it caches: a later group in the same process (tests, benchmarks) needs new ones."""
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in list(vars(groups).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(groups, name, None)
