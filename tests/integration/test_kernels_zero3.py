"""The kernels inside a two-rank DeepSpeed ZeRO-3 training step (tests/helpers/zero3_kernels_step.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimae_scale import kernels
from mimae_scale.engine.distributed import free_port
from mimae_scale.ops import REFERENCE
from tests.helpers import REPO

if not kernels.INTERPRETED:  # CPU tensors need the interpreter (make test sets TRITON_INTERPRET=1)
    pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 at import", allow_module_level=True)

KERNEL_NAMES = tuple(vars(REFERENCE))  # the hot-path ops (mimae_scale.ops)


@pytest.mark.slow
def test_zero3_training_step_with_kernels_on(tmp_path):
    """Two ranks, DeepSpeed ZeRO-3 with every parameter partitioned, bf16, kernels.enabled=on."""
    world = 2
    script = REPO / "tests" / "helpers" / "zero3_kernels_step.py"
    env = {
        **os.environ, "TRITON_INTERPRET": "1", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "bf16"], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=480)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(log[-4000:] for log in logs)
    line = next(line for line in logs[0].splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["world"] == world
    expected = {**dict.fromkeys(KERNEL_NAMES, 2), "gaussian_nll": 2 * result["q_steps"]}  # 2 steps
    assert result["calls"] == expected, result["calls"]
    # the first step's loss, kernels on, equals the references' at the same weights and masks
    assert abs(result["step_losses"][0] - result["reference_loss"]) <= 1e-3 * abs(result["reference_loss"]), result
    assert all(torch.isfinite(torch.tensor(result["step_losses"])))
    assert result["params_moved"] == result["params"], result  # every parameter got a gradient and moved
