"""Compile every kernel variant that ``mimae-bench gpu`` launches for a Hopper GPU (sm_90), without one.

The interpreter runs the kernels' Python semantics on the CPU; it does not prove that Triton can
compile them for a GPU. This runs, on ``meta`` tensors with the launch replaced by a recorder:

- the bench's own kernel cases (mimae_scale.gpubench.kernels: ``kernels`` and ``kernel-time``) at
  each of its shapes (ViT-B, ViT-L, ViT-H, odd), in float32 and bf16;
- the model's calls at the step section's shapes (ViT-B, ViT-L): MI-MAE and MAE (K = 1), bf16
  activations with float32 parameters (``amp``) and with bf16 parameters (``bf16``);

then compiles each distinct variant (kernel, argument specialisation, launch options) once, with
Triton's own argument specialisation and compiler for sm_90, and reports ptxas' register, spill and
shared-memory use. Exit status 1 if any variant failed.

    python -m mimae_scale.kernels.aot_check                # needs TRITON_INTERPRET unset
    make aot-triton36                                      # the same with Triton 3.6 (the GPU image's)

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

STEP_SHAPES = ("vit_b", "vit_l")  # the step section's models (ViT-B/16, ViT-L/16)


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


def bench_calls(shape: dict[str, int], dtype: torch.dtype) -> Callable[[], None]:
    """The bench's kernel cases (``kernels`` and ``kernel-time``), forward and backward, on meta tensors."""
    from mimae_scale import kernels
    from mimae_scale.gpubench.kernels import _cases

    def run() -> None:
        cases = _cases(shape, dtype, torch.device("meta"), None)
        cases.pop("_perm")
        for inputs, call, *_ in cases.values():
            call(kernels, inputs).sum().backward()

    return run


def model_calls(shape: dict[str, int], dtype: torch.dtype = torch.bfloat16, param_dtype: torch.dtype = torch.float32,
                mae: bool = False) -> Callable[[], None]:
    """Forward and backward of every kernel the model calls at one set of shapes, on meta tensors:
    activations in ``dtype``, positional embeddings, mask token and pixel targets in ``param_dtype``;
    ``mae``: one mask (K = 1) and no MI terms (no InfoNCE or CLUB)."""
    from mimae_scale import kernels

    b, k, n, keep, d, dd, p = (shape[x] for x in ("B", "K", "N", "L", "D", "Dd", "P"))
    k = 1 if mae else k
    rows = b * k
    meta = {"device": "meta"}

    def leaf(*size, dt=dtype):
        return torch.empty(*size, dtype=dt, **meta).requires_grad_()

    def fixed(*size, dt=param_dtype):
        return torch.empty(*size, dtype=dt, **meta)

    def run() -> None:
        ids_keep = torch.empty(rows, keep, dtype=torch.long, **meta)
        ids_restore = torch.empty(rows, n, dtype=torch.long, **meta)
        kernels.gather_visible(leaf(b, n, d), ids_keep, fixed(n, d), k).sum().backward()
        out = kernels.unshuffle_with_mask_tokens(leaf(rows, 1 + keep, dd), ids_restore, leaf(dd, dt=param_dtype),
                                                 fixed(1 + n, dd))
        out.sum().backward()
        kernels.norm_pix_mse(leaf(rows, n, p), fixed(rows, n, p), torch.empty(rows, n, **meta)).backward()
        if mae:
            return
        kernels.info_nce(leaf(shape["R_mi"], shape["Dz"]), k, 0.2).backward()
        mu, logvar = leaf(rows * keep, p), leaf(rows * keep, p)
        x = torch.empty(rows * keep, p, **meta)
        kernels.club_upper_bound(mu, logvar, x, torch.empty(rows * keep, dtype=torch.long, **meta)).backward()
        kernels.gaussian_nll(mu, logvar, x).backward()

    return run


def every_launch(shapes: list[str]) -> list[Launch]:
    """What ``mimae-bench gpu`` launches at ``shapes``: its kernel cases in float32 and bf16, and the
    step section's model calls (MI-MAE and MAE, amp and bf16) at those of its shapes."""
    from mimae_scale.gpubench.kernels import FULL_SHAPES

    launches = []
    for name in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            launches += record_launches(bench_calls(FULL_SHAPES[name], dtype))
        if name in STEP_SHAPES:
            for param_dtype in (torch.float32, torch.bfloat16):
                for mae in (False, True):
                    launches += record_launches(model_calls(FULL_SHAPES[name], torch.bfloat16, param_dtype, mae))
    return launches


def _bind(launch: Launch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    return triton, target, backend, bound_args, specialization, options


def variant_key(launch: Launch) -> str:
    """What Triton compiles one binary for: the kernel, its arguments' specialisation (dtypes,
    divisibility, constants) and the launch options (constexprs, warps, stages)."""
    *_, specialization, options = _bind(launch)
    options = sorted(options.items()) if isinstance(options, dict) else options
    return f"{launch.kernel.__name__} {specialization!r} {options!r}"


def compile_for_sm90(launch: Launch) -> dict[str, Any]:
    """Compile one recorded launch as the runtime would for an sm_90 device; ptxas' resource use."""
    triton, target, backend, bound_args, specialization, options = _bind(launch)
    fn = launch.kernel
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
        # the first pointer is the kernel's main input (tokens, latent, pred, z, mu): its dtype names the variant
        "input": next(v for v in signature.values() if isinstance(v, str) and v.startswith("*"))[1:],
        "grid": tuple(launch.grid),
        "meta": {k: v for k, v in launch.kwargs.items() if k.isupper()},
        "num_warps": launch.kwargs.get("num_warps"),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
        "shared_bytes": compiled.metadata.shared,
    }


def main(argv: list[str] | None = None) -> int:
    from mimae_scale.gpubench.kernels import FULL_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(FULL_SHAPES),
                        help=f"comma-separated, of {', '.join(FULL_SHAPES)} (default: all, as the bench)")
    parser.add_argument("--expect-triton", help="fail unless Triton's version starts with this (make aot-triton36)")
    args = parser.parse_args(argv)
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check compiles for the GPU: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return EXIT_CONFIG
    if args.expect_triton and not triton.__version__.startswith(args.expect_triton):
        print(f"aot_check: Triton {triton.__version__} from {triton.__file__}, not {args.expect_triton}",
              file=sys.stderr)
        return EXIT_CONFIG
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(FULL_SHAPES))
    if unknown:
        print(f"aot_check --shapes: unknown {unknown}; known: {', '.join(FULL_SHAPES)}", file=sys.stderr)
        return EXIT_CONFIG
    launches = every_launch(shapes)
    variants = {variant_key(launch): launch for launch in launches}
    print(f"{len(launches)} launches at {', '.join(shapes)}: {len(variants)} variants, compiled for sm_90 "
          f"with Triton {triton.__version__}:", flush=True)
    failed = 0
    for launch in variants.values():
        try:
            info = compile_for_sm90(launch)
        except Exception as exc:  # one variant's failure is reported; the others are still compiled
            failed += 1
            print(f"{launch.kernel.__name__:22s} FAILED {type(exc).__name__}: {str(exc)[-500:]}", flush=True)
            continue
        print(f"{info['kernel']:22s} in={info['input']:5s} grid={info['grid']!s:18s} "
              f"warps={info['num_warps']} regs={info['registers']} spill_bytes={info['spill_bytes']} "
              f"smem={info['shared_bytes']} {info['meta']}", flush=True)
    print(f"{len(variants) - failed} of {len(variants)} variants compiled for sm_90 with Triton {triton.__version__}"
          + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
