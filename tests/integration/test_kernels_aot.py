"""Every kernel compiles for a Hopper GPU (sm_90) at the ViT-B shapes, without a GPU.

The interpreter tests prove the kernels' semantics; Triton's GPU compiler is stricter (e.g. a
loop-carried variable must keep its type), so this compiles each recorded launch as the runtime
would on an H100/H200 and checks ptxas accepted it. Runs in a subprocess: the test session has
the interpreter on, and the compiler needs it off when the kernels are decorated.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mimae_scale.kernels.aot_check", "--shapes", "vit_b"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if " regs=" in line]
    kernels = {line.split()[0] for line in lines}
    assert kernels == {
        "_gather_visible_fwd", "_gather_visible_bwd", "_unshuffle_fwd", "_unshuffle_bwd", "_norm_pix_mse_fwd",
        "_norm_pix_mse_bwd", "_info_nce_fwd", "_info_nce_bwd", "_gaussian_fwd", "_gaussian_bwd",
    }, proc.stdout
    assert all(re.search(r"regs=\d+ ", line) for line in lines), proc.stdout  # ptxas reported each
