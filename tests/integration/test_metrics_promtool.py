"""promtool (Prometheus's own checker) on the exporter's exposition."""

from __future__ import annotations

import random

from mimae_scale.metrics import TrainingMetrics
from tests.helpers.metrics_inputs import log_record, timing, tiny_metrics_config
from tests.helpers.prometheus_tools import free_port_block, http_get, promtool_check_metrics, require_prometheus


def test_exporter_exposition_passes_promtool(seed):
    """Every family the exporter serves after steps, a log record, the kNN monitor and a checkpoint
    (the values themselves: tests/unit/test_metrics.py) passes ``promtool check metrics`` silently."""
    require_prometheus()
    rng = random.Random(seed)
    base = free_port_block(1)
    metrics = TrainingMetrics(tiny_metrics_config(base, "metrics.peak_tflops=0.5", "metrics.ceiling_tflops=0.4"),
                              rank=0, local_rank=0, world_size=1, node="nodeA")
    assert metrics.start(total_steps=40)
    try:
        for i in range(rng.randint(3, 9)):
            metrics.on_step(timing(64, rng.uniform(0.01, 0.2), rng.uniform(0.0, 0.005), applied=i > 0,
                                   loss_finite=i != 1))
        metrics.on_log({**log_record(rng, step=10, epoch=1.25, skipped_samples=2), "knn_top1": 0.375,
                        "val_top1": 0.5, "val_top5": 0.75, "ema_val_top1": 0.5})  # a classifier's evaluation
        metrics.on_checkpoint(1.25, 1.0e9)
        text = http_get(f"http://127.0.0.1:{base}/metrics")
    finally:
        metrics.close()
    assert "mimae_knn_top1_ratio" in text and "mimae_val_accuracy_ratio" in text and "mimae_run_info" in text
    checked = promtool_check_metrics(text)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_promtool_flags_a_bad_exposition():
    """The promtool check above can fail: a counter without `_total` and a non-base unit are reported."""
    require_prometheus()
    bad = "# HELP steps_count Steps.\n# TYPE steps_count counter\nsteps_count 3\n"
    bad += "# HELP step_milliseconds Step time.\n# TYPE step_milliseconds gauge\nstep_milliseconds 3\n"
    checked = promtool_check_metrics(bad)
    assert "_total" in checked.stdout + checked.stderr
    assert "base unit" in checked.stdout + checked.stderr
