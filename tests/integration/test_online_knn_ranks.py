"""The online kNN monitor on 2 ranks: the same number as on 1, and in the trainer's log records."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimae_scale.engine.distributed import free_port
from mimae_scale.evaluation.online import online_knn
from tests.helpers import REPO
from tests.helpers.knn_data import knn_config, model_and_data


def _rank_main(rank: int, port: int, seed: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = knn_config()
    model, images, labels = model_and_data(cfg, seed)
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
    cfg = knn_config()
    model, images, labels = model_and_data(cfg, seed)
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

    from mimae_scale.data_tools.cli import main as shards_main

    shards = tmp_path / "shards"
    assert shards_main(["demo", str(shards), "--train-per-class", "8", "--val-per-class", "3", "--size", "32"]) == 0
    port = free_port()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "mimae_scale/train.py", "--config", "tiny", f"run_dir={run_dir}", "train.epochs=2",
           "train.global_batch=32", "train.micro_batch=16", "train.log_every=1", "data.backend=dali",
           f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}", "eval.knn_every_epochs=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with_knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in with_knn] == [1.0, 2.0]
    for r in with_knn:
        assert r["knn_samples"] == 30 and 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["knn_top5"] <= 1.0
    assert "online kNN after epoch 2" in (run_dir / "train.log").read_text()
