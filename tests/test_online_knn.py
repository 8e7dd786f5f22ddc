"""The online kNN monitor: known answers, schedule, and the same number on 1 and 2 ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimae_scale.config import ConfigError, load_config
from mimae_scale.engine.distributed import free_port
from mimae_scale.evaluation.features import extract_features
from mimae_scale.evaluation.knn import knn_evaluate
from mimae_scale.evaluation.online import knn_due, online_knn
from mimae_scale.model import build_model


def _colour_batches(gen: torch.Generator, labels: torch.Tensor, batch: int = 16):
    """Class c = a flat image of colour c plus faint noise: any encoder separates these."""
    colours = torch.randn(int(labels.max()) + 1, 3, 1, 1, generator=gen) * 2
    images = colours[labels] + 0.01 * torch.randn(len(labels), 3, 32, 32, generator=gen)
    return [{"images": images[i:i + batch], "labels": labels[i:i + batch]} for i in range(0, len(labels), batch)]


def _cfg():
    return load_config("tiny", ["data.val_shards=/unused", "eval.knn_every_epochs=2"])


def test_known_answers(gen, seed):
    cfg = _cfg()
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    labels = torch.randint(0, 5, (160,), generator=gen)
    result = online_knn(model, cfg, batches=_colour_batches(gen, labels))
    assert result["knn_top1"] == 1.0 and result["knn_samples"] == 160
    # the same features with labels that say nothing: chance (0.2 +- 0.032, 1 sigma)
    batches = _colour_batches(gen, labels)
    shuffled = torch.randint(0, 5, (160,), generator=gen)
    for i, b in enumerate(batches):
        b["labels"] = shuffled[i * 16:(i + 1) * 16]
    assert abs(online_knn(model, cfg, batches=batches)["knn_top1"] - 0.2) < 0.15


def test_equals_offline_leave_one_out(gen, seed):
    cfg = _cfg()
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    labels = torch.randint(0, 10, (96,), generator=gen)
    batches = [{"images": torch.randn(16, 3, 32, 32, generator=gen), "labels": labels[i:i + 16]}
               for i in range(0, 96, 16)]
    feats, y = extract_features(model, batches, "mean")
    expected = knn_evaluate(feats, y, None, None, 20, 0.07)
    got = online_knn(model, cfg, batches=batches)
    assert got["knn_top1"] == expected["top1"] and got["knn_top5"] == expected["top5"]


def test_schedule_and_config():
    cfg = _cfg()
    assert [e for e in range(7) if knn_due(cfg, e)] == [2, 4, 6]
    assert not any(knn_due(load_config("tiny"), e) for e in range(5))  # 0 = off
    with pytest.raises(ConfigError, match="data.val_shards"):
        load_config("tiny", ["eval.knn_every_epochs=1"])


def _model_and_data(cfg, seed: int):
    """The same model and 100 labelled images in every process that asks with the same seed."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (100,), generator=gen)
    return model, torch.randn(100, 3, 32, 32, generator=gen), labels


def _rank_main(rank: int, port: int, seed: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = _cfg()
    model, images, labels = _model_and_data(cfg, seed)
    # rank r gets every other batch; rank 1's last batch has padding rows (valid False)
    batches = []
    for i, start in enumerate(range(0, 100, 16)):
        if i % 2 == rank:
            valid = torch.ones(len(labels[start:start + 16]), dtype=torch.bool)
            batches.append({"images": images[start:start + 16], "labels": labels[start:start + 16], "valid": valid})
    if rank == 1:
        batches.append({"images": images[:3], "labels": labels[:3], "valid": torch.zeros(3, dtype=torch.bool)})
    result = online_knn(model, cfg, rank, 2, torch.device("cpu"), batches=batches)
    torch.save(result, f"{result_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path, seed):
    port = free_port()
    mp.spawn(_rank_main, args=(port, seed, str(tmp_path / "r")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r.{r}", weights_only=True) for r in (0, 1))
    cfg = _cfg()
    model, images, labels = _model_and_data(cfg, seed)
    single = online_knn(model, cfg, batches=[{"images": images, "labels": labels}])
    assert r0["knn_samples"] == r1["knn_samples"] == 100
    assert r0["knn_top1"] == r1["knn_top1"] == pytest.approx(single["knn_top1"], abs=1e-6)
    assert r0["knn_top5"] == r1["knn_top5"] == pytest.approx(single["knn_top5"], abs=1e-6)


@pytest.mark.slow
def test_trainer_logs_the_monitor(tmp_path):
    """2 CPU ranks under the deepspeed launcher, 2 epochs, monitor every epoch: each epoch's log
    record carries the kNN of the whole held-out set (every image once over both ranks)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mimae_scale.data_tools.cli import main as shards_main

    shards = tmp_path / "shards"
    assert shards_main(["demo", str(shards), "--train-per-class", "8", "--val-per-class", "3", "--size", "32"]) == 0
    port = free_port()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "mimae_scale/train.py", "--config", "tiny", f"run_dir={run_dir}", "train.epochs=2",
           "train.global_batch=32", "train.micro_batch=16", "train.log_every=1", "data.backend=dali",
           f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}", "eval.knn_every_epochs=1"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=420,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with_knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in with_knn] == [1.0, 2.0]
    for r in with_knn:
        assert r["knn_samples"] == 30 and 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["knn_top5"] <= 1.0
    assert "online kNN after epoch 2" in (run_dir / "train.log").read_text()
