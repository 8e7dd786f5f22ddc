"""`mimae-ablate` end to end on a small generated shard set: selection on the validation split,
seeds, the table against the 4-mask MAE, the JSON and the picture."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mimae_scale.evaluation import ablation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation_shards")
    subprocess.run([sys.executable, "-m", "mimae_scale.data_tools.cli", "demo", str(root), "--train-per-class", "12",
                    "--val-per-class", "6"], check=True, capture_output=True, timeout=120)
    return root


def test_read_split_matches_the_manifest(small_shards):
    images, labels = ablation.read_split(small_shards / "val")
    manifest = json.loads((small_shards / "val" / "manifest.json").read_text())
    assert images.shape == (60, 3, 64, 64) and images.dtype == torch.uint8
    assert sorted(set(labels.tolist())) == list(range(manifest["num_classes"]))


def test_sweep_chooses_on_validation_and_compares_to_the_control(small_shards, tmp_path, capsys):
    out = tmp_path / "ablation"
    code = ablation.main([str(small_shards), "--out", str(out), "--arms", "mae4", "mimae_no_min", "random_init",
                          "--seeds", "0", "1", "--lrs", "1e-3", "6e-3", "--epochs", "1", "--posthoc-steps", "3",
                          "--workers", "1", "--set", "train.global_batch=32", "train.micro_batch=32"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    for arm in ("mae4", "mimae_no_min"):
        first = [r for r in runs if r["arm"] == arm and r["seed"] == 0]
        assert sorted(r["lr"] for r in first) == [1e-3, 6e-3]  # both candidates trained on seed 0
        best = max(first, key=lambda r: (r["val_linear"], r["val_knn"]))
        assert result["chosen_lr"][arm] == best["lr"]  # chosen on the validation split alone
        assert [r["lr"] for r in runs if r["arm"] == arm and r["seed"] == 1] == [best["lr"]]
    assert [r["steps"] for r in runs if r["arm"] == "random_init"] == [0, 0]
    row = result["table"]["mimae_no_min"]
    assert row["seeds"] == [0, 1] and len(row["knn"]["diff_vs_control"]) == 2
    for metric in ("knn", "linear", "retrieval"):
        assert all(0.0 <= v <= 1.0 for v in row[metric]["values"])
    table = (out / "table.md").read_text()
    assert "| mimae_no_min" in table and "against the 4-mask MAE" in table
    picture = Image.open(out / "ablation.png")
    assert picture.width > 600 and picture.height > 100
    assert len(set(picture.convert("L").getdata())) > 2  # something was drawn
