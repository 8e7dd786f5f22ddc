"""What the per-step metric updates cost, against a training step measured in the same run.

    python -m mimae_scale.metrics_bench [--config tiny] [--steps 30] [--updates 20000] [--threads 1]

The reference is one optimiser step of the configured model on this machine (forward, backward,
AdamW; plain PyTorch, random images, `train.micro_batch` images). The measured cost is one
:meth:`TrainingMetrics.on_step` plus a ``1 / train.log_every`` share of
:meth:`TrainingMetrics.on_log`, which is what the trainer adds per step. Medians of repeated
timings, so a busy shared machine moves them less.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from mimae_scale.config import Config, load_config
from mimae_scale.engine.reporting import StepTiming
from mimae_scale.metrics import TrainingMetrics
from mimae_scale.model import build_model


@dataclass
class BenchResult:
    step_s: float  # median training step
    update_s: float  # metric updates per step (on_step + on_log / log_every)

    @property
    def ratio(self) -> float:
        return self.update_s / self.step_s


def time_training_step(cfg: Config, steps: int, warmup: int = 3) -> float:
    """Median wall time of one forward + backward + AdamW step of the model on the CPU."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = cfg.model.img_size
    imgs = torch.randn(cfg.train.micro_batch, cfg.model.in_chans, size, size)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(imgs).loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_metric_updates(cfg: Config, updates: int, repeats: int = 5) -> float:
    """Median cost per training step of the metric updates the trainer makes."""
    metrics = TrainingMetrics(cfg, rank=0, local_rank=0, world_size=1, node="bench", job="bench")
    metrics.start(total_steps=updates)  # served (when metrics.enabled) as in a run
    record = {"step": 1, "epoch": 0.01, "samples": 64, "lr": 1e-4, "loss": 1.0, "loss_rec": 0.9, "loss_max": 0.5,
              "loss_min": 0.01, "loss_q": -0.2, "grad_norm": 1.5, "skipped_samples": 0}
    timing = StepTiming(step=1, images=cfg.train.micro_batch, step_s=0.05, data_wait_s=0.001, applied=True,
                        skipped_steps=0)
    log_every = cfg.train.log_every
    per_step = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(updates):
                metrics.on_step(timing)
                if i % log_every == 0:
                    metrics.on_log(record)
            per_step.append((time.perf_counter() - start) / updates)
    finally:
        metrics.close()
    return statistics.median(per_step)


def run(cfg: Config, steps: int, updates: int) -> BenchResult:
    return BenchResult(step_s=time_training_step(cfg, steps), update_s=time_metric_updates(cfg, updates))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--updates", type=int, default=20000, help="timed metric updates per repeat")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a rank's share of a small CPU box, and the fastest step there)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(args.threads)
    print(f"config {args.config}: micro_batch {cfg.train.micro_batch}, log_every {cfg.train.log_every}, "
          f"{torch.get_num_threads()} torch threads")
    result = run(cfg, args.steps, args.updates)
    print(f"training step (median of {args.steps}): {result.step_s * 1e3:.2f} ms")
    print(f"metric updates per step (median of 5 x {args.updates}): {result.update_s * 1e6:.2f} us")
    print(f"overhead: {result.ratio * 100:.4f}% of the step (budget 1%)")
    return 0 if result.ratio < 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
