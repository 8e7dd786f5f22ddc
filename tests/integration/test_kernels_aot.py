"""Every kernel variant that `mimae-bench gpu` launches compiles for a Hopper GPU (sm_90), without a GPU.

The interpreter tests prove the kernels' semantics; Triton's GPU compiler is stricter (e.g. a
loop-carried variable must keep its type), so this compiles each distinct variant the bench
launches (its kernel cases at every shape in float32 and bf16, and the step section's model calls)
as the runtime would on an H100/H200, with the installed Triton and its own ptxas, and checks that
ptxas accepted each. Runs in a subprocess: the test session has the interpreter on, and the
compiler needs it off when the kernels are decorated. Triton's cache is a fresh folder, so every
variant is really compiled. `make aot-triton36` does the same with Triton 3.6 (the GPU image's).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict

import pytest

KERNELS = {
    "_gather_visible_fwd", "_gather_visible_bwd", "_unshuffle_fwd", "_unshuffle_bwd", "_norm_pix_mse_fwd",
    "_norm_pix_mse_bwd", "_info_nce_fwd", "_info_nce_bwd", "_gaussian_fwd", "_gaussian_bwd",
}


@pytest.mark.slow
def test_every_variant_the_bench_launches_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-m", "mimae_scale.kernels.aot_check"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = re.search(r"(\d+) launches at vit_b, vit_l, vit_h, odd: (\d+) variants", proc.stdout)
    assert header, proc.stdout[:2000]
    lines = [line for line in proc.stdout.splitlines() if " regs=" in line]
    assert len(lines) == int(header.group(2)) > 50, proc.stdout[-3000:]  # each variant compiled, none skipped
    assert all(re.search(r"regs=\d+ ", line) for line in lines), proc.stdout  # ptxas reported each
    inputs = defaultdict(set)
    for line in lines:
        name, given = line.split()[:2]
        inputs[name].add(given)
    assert set(inputs) == KERNELS, proc.stdout
    for name, seen in inputs.items():  # every kernel on both of the bench's dtypes
        assert {"in=fp32", "in=bf16"} <= seen, (name, seen)
    assert f"{header.group(2)} of {header.group(2)} variants compiled for sm_90" in proc.stdout
