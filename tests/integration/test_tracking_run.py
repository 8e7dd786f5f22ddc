"""Run tracking through the real entry point: ``train.py`` with TensorBoard and W&B (offline) on,
read back and compared with ``metrics.jsonl``, the record both are fed from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mimae_scale.engine.tracking import scalars_of
from tests.helpers import REPO, wandb_offline

pytestmark = pytest.mark.slow

TIMEOUT = 300
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
BASE = ["--config", "tiny", "data.backend=synthetic", "train.steps_per_epoch=8", "train.global_batch=32",
        "train.micro_batch=16", "train.log_every=2", "checkpoint.every_minutes=600", "metrics.enabled=false"]


def _train(run_dir, *extra: str) -> str:
    # a rendezvous another test of this process left in the environment would be this run's too
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS and k != "WANDB_API_KEY"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    done = subprocess.run([sys.executable, "mimae_scale/train.py", *BASE, f"run_dir={run_dir}", *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_tensorboard_and_wandb_hold_what_metrics_jsonl_holds(tmp_path):
    run = tmp_path / "run"
    # a ceiling makes the exporter derive an MFU on a CPU too
    _train(run, "train.max_steps=6", "tracking.wandb=true", "tracking.image_every_steps=4",
           "metrics.ceiling_tflops=0.01")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    for record in records:
        for tag, value in scalars_of(record).items():
            (event,) = [e for e in acc.Scalars(tag) if e.step == record["step"]]
            assert event.value == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, record["step"])
    mfu = [e.value for e in acc.Scalars("speed/mfu")]
    assert len(mfu) == 3 and all(v > 0 for v in mfu)
    assert {"loss/rec", "loss/max", "loss/min", "loss/q", "club/q_gain", "optim/lr", "speed/data_wait_s",
            "speed/images_per_s"} <= set(acc.Tags()["scalars"])
    images = acc.Images("reconstruction")
    assert [e.step for e in images] == [2, 4] and images[0].width > images[0].height > 0
    (text,) = acc.Tensors("config/text_summary")
    config_yaml = (run / "config.yaml").read_text()
    assert text.tensor_proto.string_val[0].decode() == "\n".join("    " + ln for ln in config_yaml.splitlines())

    run_id = (run / "wandb_run_id").read_text().strip()
    (log,) = run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    wandb_offline.wait_for_exit(log)
    rows = wandb_offline.history(log)
    for record in records:
        expected = scalars_of(record)
        assert {k: rows[record["step"]][k] for k in expected} == expected
    assert wandb_offline.config(log)["tracking"]["wandb"] is True


def test_zero3_logs_scalars_but_no_images_and_says_so(tmp_path):
    run = tmp_path / "run"
    out = _train(run, "train.max_steps=2", "engine.zero_stage=3", "tracking.image_every_steps=1")
    assert "tracking: no reconstruction images under ZeRO 3" in out
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["images"] == [] and [e.step for e in acc.Scalars("loss/total")] == [2]
