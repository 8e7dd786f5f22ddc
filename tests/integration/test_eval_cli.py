"""The console scripts on real demo shards and a real DeepSpeed checkpoint of the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mimae_scale.data_tools.cli import main as shards_main
from PIL import Image

from mimae_scale.evaluation import cli, fewlabel
from mimae_scale.evaluation.checkpoint import load_model
from mimae_scale.evaluation.features import extract_features
from mimae_scale.evaluation.knn import knn_evaluate
from mimae_scale.evaluation.viz import grid_layout
from tests.helpers.ds_helpers import single_process_group, train_and_save

BIN = Path(sys.executable).parent


def _script(name: str) -> list[str]:
    """The installed console script (what users run); the module when the venv has no scripts."""
    path = BIN / name
    module = {"mimae-eval": "mimae_scale.evaluation.cli", "mimae-viz": "mimae_scale.evaluation.viz",
              "mimae-export": "mimae_scale.evaluation.export"}[name]
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert shards_main(["demo", str(out), "--train-per-class", "12", "--val-per-class", "6", "--size", "32"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    with single_process_group():
        return train_and_save(tmp_path_factory.mktemp("run"), "tiny", 1, seed)["folder"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_compare_runs_and_writes_json(demo, checkpoint, tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [*_script("mimae-eval"), "compare", "--model", f"tiny={checkpoint}", "--random-init",
         "--reference", "raw_pixels", "--train", str(demo / "train"), "--val", str(demo / "val"), "--epochs", "5",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny:" in proc.stdout and "random:" in proc.stdout and "kNN top-1" in proc.stdout
    report = json.loads(out.read_text())
    assert report["data"] == demo.name  # generated shards record no real source: the set's folder names it
    for name in ("tiny", "random"):
        r = report["models"][name]
        assert r["knn"]["n_train"] == 120 and r["knn"]["n_test"] == 60  # every sample once
        assert r["linear"]["n_train"] == 120 and r["linear"]["n_test"] == 60
        assert 0.0 <= r["knn"]["top1"] <= 1.0 and 0.0 <= r["linear"]["top1"] <= 1.0
        assert r["feature_dim"] == 64 and r["pool"] == "mean"
        assert report["encoders"][name] == {"linear_top1": round(100 * r["linear"]["top1"], 2),
                                            "knn_top1": round(100 * r["knn"]["top1"], 2)}


def test_compare_few_labels_fine_tunes_each_vit(demo, checkpoint, tmp_path):
    """A quarter of the labels (3 of each class's 12), and fine-tuning: the ViTs get a fine-tune score,
    the raw-pixel reference none (nothing to tune); the scores are those of fewlabel.finetune itself."""
    out = tmp_path / "few.json"
    assert cli.main(["compare", "--model", f"tiny={checkpoint}", "--random-init", "--reference", "raw_pixels",
                     "--train", str(demo / "train"), "--val", str(demo / "val"), "--epochs", "5", "--device", "cpu",
                     "--label-fraction", "0.25", "--finetune", "--ft-steps", "4", "--seed", "3",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["label_fraction"] == 0.25
    for name in ("tiny", "random", "raw_pixels"):
        r = report["models"][name]
        assert r["train_labels"] == 30 and r["knn"]["n_train"] == 30 and r["linear"]["n_test"] == 60
    assert report["encoders"]["raw_pixels"]["finetune_top1"] is None
    assert report["models"]["random"]["finetune"]["init"] == "timm's random initialisation"
    # the checkpoint's number, recomputed: the same 30 images and labels, the same seed
    model, ckpt = load_model(checkpoint)
    batches = {s: list(cli.eval_loader(ckpt.cfg, demo / s, torch.device("cpu"), 128)) for s in ("train", "val")}
    data = {s: (torch.cat([b["images"][b["valid"].bool()] if "valid" in b else b["images"] for b in bs]),
                torch.cat([b["labels"][b["valid"].bool()] if "valid" in b else b["labels"] for b in bs]).long())
            for s, bs in batches.items()}
    rows = fewlabel.label_subset(data["train"][1], 0.25, seed=3)
    want = fewlabel.finetune(model.state_dict(), ckpt.cfg, data["train"][0][rows], data["train"][1][rows],
                             {"val": data["val"]}, base_lr=3e-3, steps=4, seed=3)["val"]
    assert report["models"]["tiny"]["finetune"]["top1"] == pytest.approx(want)


def test_knn_and_linear_commands(demo, checkpoint, tmp_path):
    common = ["--checkpoint", str(checkpoint), "--train", str(demo / "train"), "--val", str(demo / "val"),
              "--device", "cpu", "--pool", "cls"]
    assert cli.main(["knn", *common, "--out", str(tmp_path / "knn.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())["models"]["checkpoint"]
    # the command's number is the kNN of the checkpoint's features on these exact shards
    model, ckpt = load_model(checkpoint)
    device = torch.device("cpu")
    train = extract_features(model, cli.eval_loader(ckpt.cfg, demo / "train", device, 32), "cls")
    val = extract_features(model, cli.eval_loader(ckpt.cfg, demo / "val", device, 32), "cls")
    assert knn["knn"]["top1"] == knn_evaluate(*train, *val)["top1"]

    assert cli.main(["linear", *common, "--epochs", "3", "--out", str(tmp_path / "lin.json")]) == 0
    lin = json.loads((tmp_path / "lin.json").read_text())["models"]["checkpoint"]
    assert "knn" not in lin and lin["linear"]["epochs"] == 3 and lin["linear"]["n_test"] == 60


def test_errors_are_reported(demo, capsys):
    assert cli.main(["knn", "--train", str(demo / "train"), "--val", str(demo / "val")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli.main(["knn", "--random-init", "--train", str(demo / "train"), "--val", str(demo / "val")]) == 2
    assert "--random-init needs --config" in capsys.readouterr().err


def test_viz_and_export_commands(demo, checkpoint, tmp_path):
    png = tmp_path / "recon.png"
    proc = subprocess.run([*_script("mimae-viz"), str(checkpoint), str(demo / "val"), str(png)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    picture = np.asarray(Image.open(png).convert("RGB"))
    layout = grid_layout(4, 4, 32)
    assert picture.shape == (layout.height, layout.width, 3) and picture.std() > 20

    out = tmp_path / "tiny.pth"
    proc = subprocess.run([*_script("mimae-export"), str(checkpoint), str(out), "--format", "mae"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "mae" and "model" in torch.load(out, weights_only=True)
