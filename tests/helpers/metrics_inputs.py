"""Inputs of the exporter tests: the tiny config with an exporter port, step timings, log records."""

from __future__ import annotations

import random

from mimae_scale.config import Config, load_config
from mimae_scale.engine.reporting import StepTiming


def tiny_metrics_config(port_base: int, *extra: str) -> Config:
    return load_config("tiny", [f"metrics.port_base={port_base}", "metrics.job=unit", *extra])


def timing(images: int, step_s: float, data_wait_s: float, applied: bool = True,
           loss_finite: bool = True) -> StepTiming:
    return StepTiming(step=1, images=images, step_s=step_s, data_wait_s=data_wait_s, applied=applied,
                      skipped_steps=0, loss_finite=loss_finite)


def log_record(rng: random.Random, **fields) -> dict:
    """A metrics.jsonl record as the trainer writes it."""
    record = {"step": 1, "epoch": 0.0, "samples": 64, "lr": rng.uniform(1e-5, 1e-3), "loss": rng.random(),
              "loss_rec": rng.random(), "loss_max": rng.random(), "loss_min": -rng.random(), "loss_q": rng.random(),
              "club_q_gain": rng.uniform(-1, 1), "club_logvar_mean": rng.uniform(-1, 1),
              "club_logvar_saturated": rng.random(),
              "grad_norm": rng.uniform(0.1, 5), "images_per_s": 1.0, "step_s": 0.1, "data_wait_s": 0.0,
              "skipped_steps": 0, "skipped_samples": 0}
    return {**record, **fields}
