"""Where the trainer's numbers go: per step (host timings only) and per log step (one record).

Every consumer is a :class:`MetricsSink`. The trainer calls ``on_step`` after every optimiser step
with numbers measured on the host (no device synchronisation), and ``on_log`` on log steps with
the record that also becomes a line of ``<run_dir>/metrics.jsonl``. A Prometheus exporter is one
more sink appended to ``Trainer.sinks`` (every rank has its own; the JSONL file and the console
line are rank 0's).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("mimae_scale.engine")


@dataclass(frozen=True)
class StepTiming:
    step: int  # 1-based number of the optimiser step just taken
    images: int  # images this step consumed over all ranks (= train.global_batch)
    step_s: float  # host wall time of the step, data wait included
    data_wait_s: float  # host time blocked waiting for this rank's micro-batches
    applied: bool  # False when the step was skipped (non-finite loss or gradients)
    skipped_steps: int  # DeepSpeed's engine.skipped_steps after this step
    loss_finite: bool = True  # this rank's loss was finite (read on skipped steps only, so no sync otherwise)


class MetricsSink(Protocol):
    def on_step(self, timing: StepTiming) -> None: ...

    def on_log(self, record: dict[str, Any]) -> None: ...


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null means "not finite"
    return value


class JsonlSink:
    """``metrics.jsonl``: one object per log step, appended (a resumed run repeats the steps
    after its checkpoint: the last record of a step is the one that counts)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step(self, timing: StepTiming) -> None:
        pass

    def on_log(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


class ConsoleSink:
    """The progress line of a log step."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_step(self, timing: StepTiming) -> None:
        pass

    def on_log(self, record: dict[str, Any]) -> None:
        terms = " ".join(f"{k[5:]} {record[k]:.4f}" for k in sorted(record) if k.startswith("loss_"))
        terms = f" ({terms})" if terms else ""  # a classifier's loss has no terms
        gnorm = record["grad_norm"]
        left = (self.total_steps - record["step"]) * record["step_s"]
        log.info(
            "step %d/%d  epoch %.2f  loss %.4f%s  lr %.3e  grad_norm %s  |  %.1f img/s  step %.3f s  "
            "data %.3f s  skipped %d  eta %s",
            record["step"], self.total_steps, record["epoch"], record["loss"], terms, record["lr"],
            "n/a" if gnorm is None else f"{gnorm:.3f}", record["images_per_s"], record["step_s"],
            record["data_wait_s"], record["skipped_steps"], _duration(left),
        )


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
