"""Launch parameters per kernel and shape: heuristics now, GPU-tuned choices later.

Triton's multi-config autotuner does not run in the interpreter, and it re-benchmarks every new
shape at run time. Instead each kernel asks :func:`launch` for its block sizes, warps, stages and
grid split, computed from the shape by a heuristic registered next to the kernel. A tuned rule
found on a GPU replaces a heuristic with :func:`override`, without touching the kernel code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import triton


@dataclass(frozen=True)
class Launch:
    """How to launch one kernel for one shape."""

    meta: dict[str, Any] = field(default_factory=dict)  # the kernel's constexpr arguments (BLOCK_*, ...)
    num_warps: int = 4
    num_stages: int = 2
    split: int = 1  # grid split along a reduced axis, for kernels whose launch has one (partial sums)


Rule = Callable[..., Launch]
_heuristics: dict[str, Rule] = {}
_overrides: dict[str, Rule] = {}


def heuristic(kernel: str) -> Callable[[Rule], Rule]:
    """Register the default rule for ``kernel`` (a decorator, used by the kernel modules)."""

    def register(rule: Rule) -> Rule:
        _heuristics[kernel] = rule
        return rule

    return register


def override(kernel: str, rule: Rule | None) -> None:
    """Use ``rule`` instead of the heuristic for ``kernel`` (``None`` restores the heuristic).

    A rule takes the same keyword arguments as the heuristic it replaces (see :func:`kernels`).
    """
    if kernel not in _heuristics:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(_heuristics)}")
    if rule is None:
        _overrides.pop(kernel, None)
    else:
        _overrides[kernel] = rule


def launch(kernel: str, **shape: Any) -> Launch:
    return _overrides.get(kernel, _heuristics[kernel])(**shape)


def kernels() -> list[str]:
    """Names of every kernel with a launch rule."""
    return sorted(_heuristics)


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The next power of two >= n, clamped to [lo, hi] (Triton block shapes are powers of two)."""
    value = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(value, hi) if hi is not None else value


# A tile of this many elements per program keeps loads wide (16 B per lane) and the grid large
# enough for 132 SMs at the ViT-B/L shapes; the interpreter then also runs few, large programs.
TILE_ELEMENTS = 8192
SMS = 132  # streaming multiprocessors of an H100 SXM / H200
# Programs wanted for a reduction split: a few waves of the SMs.
TARGET_PROGRAMS = 4 * SMS
