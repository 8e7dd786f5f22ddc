"""Training jobs under the real deepspeed launcher (CPU ranks over gloo), for the integration tests: each
in its own session, so a test can SIGKILL a whole job the way a dead node does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mimae_scale.engine.checkpoint import MARKER
from mimae_scale.engine.distributed import free_port
from tests.helpers import REPO

TIMEOUT = 420


def clean_environ() -> dict[str, str]:
    """This environment without the rank variables a test's one-process group may have left in it: a
    job forms its own world."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


class Job:
    """One launcher run; its console output goes to a file (a pipe could fill and stall it)."""

    def __init__(self, script: str, args: list[str], log: Path, env: dict[str, str] | None = None,
                 ranks: int = 2) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(self.port), script, *args]
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**clean_environ(), "OMP_NUM_THREADS": "1", **(env or {})})

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"job did not finish in {TIMEOUT} s; output:\n{self.output[-4000:]}")

    @property
    def output(self) -> str:
        return self.log.read_text()

    def rank_process(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                return child
        raise AssertionError(f"rank {rank} not found")

    def wait_for_step(self, run_dir: Path, step: int, after: int = 0) -> None:
        """Block until metrics.jsonl holds a record of ``step`` or later, written after line ``after``."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"job ended (status {self.proc.returncode}) before step {step}:\n{self.output[-4000:]}")
            if any(r["step"] >= step for r in records(run_dir)[after:]):
                return
            time.sleep(0.05)
        pytest.fail(f"no step {step} within {TIMEOUT} s")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob(f"step_*/{MARKER}"))
