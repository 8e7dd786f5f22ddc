"""Every buffer a kernel writes is allocated here, so tests can poison them all.

Outputs, gradients and the per-program partial sums that a second pass reduces are all created by
:func:`empty`. Inside :func:`poisoned` those buffers start as NaN instead of whatever memory held:
an element a kernel forgot to write then shows up as NaN in the result instead of passing by luck.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

_poison = False


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _poison:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Allocate every kernel output as NaN while the block runs (a test hook; costs a fill)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
