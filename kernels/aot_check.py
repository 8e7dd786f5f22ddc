"""Compile every kernel for a Hopper GPU (sm_90) without one, at the model's real shapes.

The interpreter runs the kernels' Python semantics on the CPU; it does not prove that Triton can
compile them for a GPU. This runs each public function forward and backward on ``meta`` tensors
of the ViT-B or ViT-L shapes (docs/KERNELS.md) with the launch replaced by a recorder, then feeds
every recorded launch through Triton's own argument specialisation and compiler for sm_90 and
reports ptxas' register, spill and shared-memory use.

    python -m mimae_scale.kernels.aot_check --shapes vit_l      # needs TRITON_INTERPRET unset

No GPU, CUDA driver or ptxas install is needed: Triton ships ptxas.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_OK

# Per-GPU shapes of the MI-MAE recipes (K = 4 masks, 75% hidden): see docs/KERNELS.md.
SHAPES: dict[str, dict[str, int]] = {
    # B images per GPU, N patches, L visible, D encoder width, Dd decoder width, P pixels per patch,
    # R_mi rows of the gathered InfoNCE, Dz projector width, X CLUB's x width (token level)
    "vit_b": {"B": 256, "K": 4, "N": 196, "L": 49, "D": 768, "Dd": 512, "P": 768, "R_mi": 2048, "Dz": 256},
    "vit_l": {"B": 128, "K": 4, "N": 196, "L": 49, "D": 1024, "Dd": 512, "P": 768, "R_mi": 16384, "Dz": 256},
}


@dataclass
class Launch:
    kernel: Any  # triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


def record_launches(calls: Callable[[], None]) -> list[Launch]:
    """Run ``calls`` with every Triton launch recorded instead of executed."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, grid, args, kwargs))

    JITFunction.run = record
    try:
        calls()
    finally:
        JITFunction.run = original
    return launches


def model_calls(shape: dict[str, int], dtype: torch.dtype = torch.bfloat16) -> Callable[[], None]:
    """Forward and backward of every kernel at one set of shapes, on meta tensors."""
    from mimae_scale import kernels

    b, k, n, keep, d, dd, p = (shape[x] for x in ("B", "K", "N", "L", "D", "Dd", "P"))
    rows = b * k
    meta = {"device": "meta"}

    def leaf(*size, dt=dtype):
        return torch.empty(*size, dtype=dt, **meta).requires_grad_()

    def run() -> None:
        ids_keep = torch.empty(rows, keep, dtype=torch.long, **meta)
        ids_restore = torch.empty(rows, n, dtype=torch.long, **meta)
        kernels.gather_visible(leaf(b, n, d), ids_keep, torch.empty(n, d, **meta), k).sum().backward()
        out = kernels.unshuffle_with_mask_tokens(leaf(rows, 1 + keep, dd), ids_restore, leaf(dd, dt=torch.float32),
                                                 torch.empty(1 + n, dd, **meta))
        out.sum().backward()
        kernels.norm_pix_mse(leaf(rows, n, p), torch.empty(rows, n, p, **meta), torch.empty(rows, n, **meta)).backward()
        kernels.info_nce(leaf(shape["R_mi"], shape["Dz"]), k, 0.2).backward()
        mu, logvar = leaf(rows * keep, p), leaf(rows * keep, p)
        x = torch.empty(rows * keep, p, **meta)
        kernels.club_upper_bound(mu, logvar, x, torch.empty(rows * keep, dtype=torch.long, **meta)).backward()
        kernels.gaussian_nll(mu, logvar, x).backward()

    return run


def compile_for_sm90(launch: Launch) -> dict[str, Any]:
    """Compile one recorded launch as the runtime would for an sm_90 device; ptxas' resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {
        "kernel": fn.__name__,
        "grid": tuple(launch.grid),
        "meta": {k: v for k, v in launch.kwargs.items() if k.isupper()},
        "num_warps": launch.kwargs.get("num_warps"),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
        "shared_bytes": compiled.metadata.shared,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="vit_l")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check compiles for the GPU: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return EXIT_CONFIG
    launches = record_launches(model_calls(SHAPES[args.shapes]))
    print(f"{len(launches)} launches at {args.shapes} shapes {SHAPES[args.shapes]}, compiled for sm_90:")
    for launch in launches:
        info = compile_for_sm90(launch)
        print(f"{info['kernel']:22s} grid={info['grid']!s:18s} warps={info['num_warps']} "
              f"regs={info['registers']} spill_bytes={info['spill_bytes']} smem={info['shared_bytes']} "
              f"{info['meta']}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
