"""A real full disk: a small tmpfs mounted for the test (root only), filled by a training run's
checkpoint and by ``mimae-shards build``; each ends with one line and EXIT_DISK_FULL, nothing is
lost, and once the tmpfs is grown (remount) the same command resumes and finishes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mimae_scale.engine.checkpoint import MARKER
from mimae_scale.exit_codes import EXIT_DISK_FULL, EXIT_OK
from tests.helpers import REPO
from tests.helpers.shard_helpers import jpeg_bytes

pytestmark = pytest.mark.slow

TIMEOUT = 300
# without a rendezvous another test of this process may have left in the environment
ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                       "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_training_checkpoint_onto_a_full_disk_then_resume(tmp_path):
    """The tiny model's checkpoint is ~2.4 MB: a 6 MB tmpfs holds two (steps 2 and 4, keep_last 2),
    the third (step 6) fills it before the oldest can be pruned."""
    disk = tmp_path / "disk"
    run = disk / "run"
    cmd = [sys.executable, "mimae_scale/train.py", "--config", "tiny", f"run_dir={run}", "data.backend=synthetic",
           "train.steps_per_epoch=8", "train.global_batch=32", "train.micro_batch=16", "train.log_every=1",
           "checkpoint.every_steps=2", "checkpoint.every_minutes=600", "checkpoint.keep_last=2", "train.max_steps=8"]
    with tmpfs(disk, "6m") as resize:
        done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        out = done.stdout + done.stderr
        assert done.returncode == EXIT_DISK_FULL, out[-4000:]
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "Traceback" not in out, errors
        tag6 = run / "checkpoints" / "step_000000006"
        line = errors[0]
        assert f"DiskFull: disk full (ENOSPC: No space left on device) writing checkpoint {tag6}: " in line
        size4 = sum(e["size"] for e in json.loads((run / "checkpoints" / "step_000000004" / MARKER).read_text())
                    ["files"].values())
        assert f"needs {size4 / 1e6:.1f} MB ({size4} bytes) as step_000000004 did" in line
        free = int(re.search(r"\((\d+) bytes\) free there", line).group(1))
        assert free == _free(disk)  # measured after the partial tag was removed (and its files closed)
        assert "partial checkpoint removed, step_000000004 kept as the latest" in line
        # warned a save ahead: before step 4 (room for it, not for step 6), again before step 6
        warnings = [line for line in out.splitlines() if "DISK SPACE" in line]
        assert len(warnings) == 2 and "not for the next one" in warnings[0], warnings
        assert "this save will probably fail" in warnings[1]
        assert not tag6.exists()
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000000002", "step_000000004"]
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000004"

        resize("20m")
        done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        out = done.stdout + done.stderr
        assert done.returncode == EXIT_OK, out[-4000:]
        # step 4 verified (sizes and sha256) and loaded: nothing set aside
        assert "resumed from " + str(run / "checkpoints" / "step_000000004") + ": step 4" in out
        assert "CHECKPOINT DAMAGED" not in out and "DISK SPACE" not in out
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000000006", "step_000000008"]


def _source(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 96, 128))
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_build_onto_a_full_disk_then_finish(tmp_path, workers):
    src = _source(tmp_path / "src", 90)
    disk = tmp_path / "disk"
    out = disk / "shards"
    shards = Path(sys.executable).parent / "mimae-shards"
    cmd = [str(shards), "build", str(src), str(out), "--shard-size", "10", "--workers", str(workers), "--quiet"]
    source_bytes = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    assert source_bytes > 2 * 100_000  # and the tars add 1.5 kB of headers per sample
    with tmpfs(disk, "100k") as resize:
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == EXIT_DISK_FULL, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith(f"mimae-shards build: disk full (ENOSPC: No space left on device) writing shards "
                                   f"into {out}: needs about "), lines[0]
        kept = int(re.search(r"; (\d+) of 9 shards done and kept", lines[0]).group(1))
        assert 0 < kept < 9
        free = int(re.search(r"\((\d+) bytes\) free there", lines[0]).group(1))
        assert free == _free(disk)
        assert not list(out.rglob(".*.tmp-*"))  # no half-written file is left taking space
        assert len(list((out / ".parts").glob("train-*.json"))) == kept

        resize("4m")
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == EXIT_OK, done.stdout + done.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["total_inputs"] == 90 and manifest["total_samples"] + manifest["total_rejected"] == 90
        verify = subprocess.run([str(shards), "verify", str(out), "--quiet"], env=ENV, capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert verify.returncode == EXIT_OK, verify.stdout + verify.stderr
        ids = []
        for tar in sorted(out.glob("*.tar")):
            with tarfile.open(tar) as fh:
                ids += [name.split(".")[0] for name in fh.getnames() if name.endswith(".jpg")]
        assert len(ids) == len(set(ids)) == manifest["total_samples"]  # every sample once


def test_two_ranks_under_the_deepspeed_launcher(tmp_path):
    """The rank whose write fails exits 74 first; the other loses its peer and stops (its own error
    names gloo's closed connection), and the launcher passes the first failure's status on."""
    disk = tmp_path / "disk"
    run = disk / "run"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "mimae_scale/train.py", "--config", "tiny", f"run_dir={run}",
           "data.backend=synthetic", "train.steps_per_epoch=8", "train.global_batch=32", "train.micro_batch=16",
           "train.log_every=1", "checkpoint.every_steps=2", "checkpoint.every_minutes=600", "train.max_steps=8",
           "metrics.enabled=false"]
    with tmpfs(disk, "6m") as resize:
        done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        out = done.stdout + done.stderr
        assert done.returncode == EXIT_DISK_FULL, out[-4000:]
        full = [line for line in out.splitlines() if "ERROR DiskFull: disk full (ENOSPC" in line]
        assert len(full) == 1 and "step_000000006" in full[0] and "step_000000004 kept as the latest" in full[0]
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000000002", "step_000000004"]
        resize("20m")
        done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        out = done.stdout + done.stderr
        assert done.returncode == EXIT_OK, out[-4000:]
        assert "resumed from " + str(run / "checkpoints" / "step_000000004") + ": step 4" in out
