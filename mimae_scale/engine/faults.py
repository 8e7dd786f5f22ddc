"""Fault injection for the tests (never set in real runs). Read from the environment, so a test can
arm a fault without touching the configuration or its fingerprint:

- ``MIMAE_FAULT_NAN="RANK:STEP[,STEP...]"``: on rank RANK, the loss of optimiser step STEP (the
  1-based step number of metrics.jsonl) becomes NaN before backward, as a numerical blow-up would.
- ``MIMAE_FAULT_CRASH_IN_SAVE="RANK:STEP"``: rank RANK SIGKILLs itself while writing the checkpoint
  of step STEP, after its DeepSpeed files are on disk and before the checkpoint is complete.
- ``MIMAE_FAULT_EDQUOT_IN_SAVE="RANK:STEP"``: at the same point, rank RANK's write fails with EDQUOT
  (disk quota exceeded), which a test cannot get from a real filesystem without quotas set up
  (ENOSPC is tested on a real, small tmpfs).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path


def _parse(name: str) -> tuple[int, set[int]] | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        rank, steps = text.split(":", 1)
        return int(rank), {int(s) for s in steps.split(",")}
    except ValueError:
        raise RuntimeError(f"{name}={text!r}: expected RANK:STEP[,STEP...]") from None


def nan_loss_steps(rank: int) -> set[int]:
    """Steps whose loss this rank must turn into NaN."""
    parsed = _parse("MIMAE_FAULT_NAN")
    return parsed[1] if parsed and parsed[0] == rank else set()


def maybe_crash_in_save(step: int, rank: int) -> None:
    parsed = _parse("MIMAE_FAULT_CRASH_IN_SAVE")
    if parsed and parsed[0] == rank and step in parsed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_edquot_in_save(step: int, rank: int, tag_dir: Path) -> None:
    parsed = _parse("MIMAE_FAULT_EDQUOT_IN_SAVE")
    if parsed and parsed[0] == rank and step in parsed[1]:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tag_dir / "mimae_fault_edquot"))
