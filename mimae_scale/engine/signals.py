"""Preemption: SIGUSR2 (Slurm's ``--signal=B:USR2@120``) or SIGTERM ask for a checkpoint and a requeue.

The handler only records the request; the trainer finishes the current step, agrees with the
other ranks at its next control point (see ``Trainer._control_point``), saves and exits with
``EXIT_REQUEUE``. SIGUSR1 belongs to NCCL and is left alone.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"
