"""Run tracking (mimae_scale/engine/tracking.py): what the sink writes, read back with TensorBoard's
own EventAccumulator and from the W&B offline run's transaction log (WANDB_MODE=offline: no network).
The whole training path is tests/integration/test_tracking_run.py."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mimae_scale.config import ConfigError, dump_yaml, load_config, validate
from mimae_scale.engine.tracking import TrackerSink, scalars_of
from tests.helpers import wandb_offline


def _record(step: int, loss: float) -> dict:
    """A metrics.jsonl record as the trainer makes it (a kNN result on step 4 only)."""
    record = {"step": step, "epoch": step / 4, "samples": step * 64, "lr": 1e-3 * step, "loss": loss,
              "loss_rec": loss - 0.5, "loss_q": 0.9, "club_q_gain": 0.01 * step, "club_logvar_saturated": 0.0,
              "grad_norm": None if step == 2 else 2.5, "images_per_s": 100.0 + step, "step_s": 0.3,
              "data_wait_s": 0.01, "skipped_steps": 0, "skipped_samples": 1}
    if step == 4:
        record.update(knn_top1=0.25, knn_top5=0.75, knn_samples=60, knn_seconds=1.5)
    return record


def _events(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tags_group_every_record_key_and_drop_what_is_not_a_finite_number():
    scalars = scalars_of({**_record(2, 2.0), "loss_min": math.nan, "club_logvar_mean": math.inf, "flag": True})
    assert scalars["loss/total"] == 2.0 and scalars["loss/rec"] == 1.5 and scalars["club/q_gain"] == 0.02
    assert scalars["optim/lr"] == 0.002 and scalars["speed/images_per_s"] == 102.0
    assert scalars["progress/skipped_samples"] == 1.0
    assert not {"loss/min", "club/logvar_mean", "optim/grad_norm", "other/flag", "other/step"} & set(scalars)
    classifier = scalars_of({"step": 9, "val_top1": 0.5, "ema_val_top1": 0.25, "loss_ce": 1.0})
    assert classifier == {"eval/val_top1": 0.5, "eval/ema_val_top1": 0.25, "loss/ce": 1.0}


def test_tensorboard_gets_the_records_numbers_images_and_config_and_a_resume_replaces_repeated_steps(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "tracking.image_every_steps=4"])
    drawn = []

    def grid():
        drawn.append(len(drawn))
        return Image.new("RGB", (24, 16), (10 * len(drawn), 0, 0))

    sink = TrackerSink(cfg, tmp_path, 0, derived=lambda: {"mfu": 0.4}, grid=grid)
    records = [_record(step, 3.0 - step / 10) for step in (2, 4, 6, 8)]
    for record in records:
        sink.on_log(record)
    acc = _events(tmp_path)
    for record in records:
        for tag, value in scalars_of(record).items():
            (event,) = [e for e in acc.Scalars(tag) if e.step == record["step"]]
            assert event.value == pytest.approx(value, rel=1e-6), (tag, record["step"])  # stored as float32
    assert [e.step for e in acc.Scalars("optim/grad_norm")] == [4, 6, 8]  # step 2's was null
    assert [e.step for e in acc.Scalars("eval/knn_top1")] == [4]
    assert [e.value for e in acc.Scalars("speed/mfu")] == pytest.approx([0.4] * 4)
    # the first log step, then the first of each 4-step period
    assert [(e.step, e.width, e.height) for e in acc.Images("reconstruction")] == [(2, 24, 16), (4, 24, 16),
                                                                                     (8, 24, 16)]
    (text,) = acc.Tensors("config/text_summary")
    assert text.tensor_proto.string_val[0].decode() == "\n".join("    " + ln for ln in dump_yaml(cfg).splitlines())
    sink.close()

    # resumed from a checkpoint at step 4: steps 6 and 8 come again, and replace the first run's
    again = TrackerSink(cfg, tmp_path, 4)
    for step in (6, 8):
        again.on_log(_record(step, 9.0))
    again.close()
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("loss/total")] == [
        (2, pytest.approx(2.8)), (4, pytest.approx(2.6)), (6, 9.0), (8, 9.0)]


def test_wandb_offline_run_holds_the_same_numbers_images_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "tracking.tensorboard=false", "tracking.wandb=true",
                               "tracking.image_every_steps=4"])
    sink = TrackerSink(cfg, tmp_path, 0, derived=lambda: {"mfu": 0.4}, grid=lambda: Image.new("RGB", (8, 8)))
    assert sink.tb is None and not (tmp_path / "tensorboard").exists()
    records = [_record(step, 3.0 - step / 10) for step in (2, 4, 6)]
    for record in records:
        sink.on_log(record)
    run_id = sink.wandb_run.id
    sink.close()
    (log,) = tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    wandb_offline.wait_for_exit(log)
    rows = wandb_offline.history(log)
    assert sorted(rows) == [2, 4, 6]
    for record in records:
        row = rows[record["step"]]
        assert {k: row[k] for k in scalars_of(record)} == scalars_of(record)  # JSON: exact
        assert row["speed/mfu"] == 0.4
    assert [s for s in rows if "reconstruction/path" in rows[s]] == [2, 4]
    assert wandb_offline.config(log) == json.loads(json.dumps(cfg.to_dict()))  # tuples become lists
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id  # a resumed run goes on in this W&B run


def test_tracking_settings_are_validated_naming_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking\.image_every_steps: must be >= 0"):
        validate(load_config("tiny", ["tracking.image_every_steps=-1"]))
    with pytest.raises(ConfigError, match=r"tracking\.wandb_project: must name a project"):
        validate(load_config("tiny", ["tracking.wandb=true", "tracking.wandb_project= "]))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    validate(load_config("tiny"))  # W&B is off by default: not needed
    with pytest.raises(ConfigError, match=r"tracking\.wandb: the wandb package is not installed: pip install "
                                          r"'mimae-scale\[tracking\]', or set tracking\.wandb=false"):
        validate(load_config("tiny", ["tracking.wandb=true"]))


def test_the_grid_leaves_the_training_random_streams_where_they_were():
    """Training and an exact resume must not notice the picture (its loader and forward draw masks)."""
    import random

    import numpy as np
    import torch

    from mimae_scale.engine.tracking import ReconstructionGrid, _rng_untouched, fixed_batch
    from mimae_scale.model import build_model

    cfg = load_config("tiny", ["data.backend=synthetic"])
    cpu = torch.device("cpu")
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels="off")

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    for seed in (1, 2):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        untouched = draws()
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        grid = ReconstructionGrid(model, fixed_batch(cfg, cpu), cfg, cpu)()
        with _rng_untouched(cpu):  # what guards it (today's loaders and masks happen to use own generators)
            draws()
        assert draws() == untouched
    assert grid.size[0] > grid.size[1] > 0 and model.training  # and the model is back in training mode


def test_the_grid_runs_on_rank_0_alone_without_a_collective_call(monkeypatch):
    """Rank 0 draws the grid while the other ranks train on: a collective there (the training
    forward's InfoNCE all-gather) would pair with another rank's and break both. Here the world
    says 2 ranks and any all-gather fails the test; the training forward shows that it would."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    from mimae_scale.engine.tracking import ReconstructionGrid, fixed_batch
    from mimae_scale.model import build_model

    cfg = load_config("tiny", ["data.backend=synthetic", "mi.negatives=global"])
    cpu = torch.device("cpu")
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels="off")
    images = fixed_batch(cfg, cpu)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)

        def no_collective(*args, **kwargs):
            raise AssertionError("a collective call on one rank")

        monkeypatch.setattr(dist_fn, "all_gather", no_collective)
        ReconstructionGrid(model, images, cfg, cpu)()
        with pytest.raises(AssertionError, match="collective"):
            model(images, generator=torch.Generator().manual_seed(0))
    finally:
        dist.destroy_process_group()


def test_reconstruct_is_the_forwards_prediction_and_masks():
    import torch

    from mimae_scale.model import build_model

    cfg = load_config("tiny")
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels="off")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pred, mask = model.reconstruct(images, generator=torch.Generator().manual_seed(5))
    out = model(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pred, out.pred) and torch.equal(mask, out.mask)
