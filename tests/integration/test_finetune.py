"""Fine-tuning and linear probing through the one trainer: real DeepSpeed ranks over gloo, the DALI CPU
pipeline, real checkpoints. Layer-wise lr decay under ZeRO 1-3, exact top-1 over any number of ranks,
a SIGKILLed fine-tune that resumes bit for bit, the classifier exported as a timm model, and every
bad input refused with exit 2 and one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mimae_scale.config import load_config
from mimae_scale.data.shardset import resolve_shards
from mimae_scale.evaluation.export import export
from mimae_scale.exit_codes import EXIT_CONFIG
from tests.helpers import REPO
from tests.helpers.ds_helpers import single_process_group, train_and_save
from tests.helpers.jobs import TIMEOUT, Job, clean_environ, complete_steps, records
from tests.helpers.shard_helpers import jpeg_bytes

pytestmark = pytest.mark.slow

# 2 ranks x 16 images per step over 240 demo images: 8 optimiser steps per epoch (the last one padded)
TRAIN = ["train.global_batch=32", "train.micro_batch=16", "checkpoint.every_minutes=600"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The embedded demo dataset: 24 training images per class (240) and 37 held-out ones (not a multiple
    of 2 or 3 ranks, nor of the batch)."""
    out = tmp_path_factory.mktemp("demo_shards")
    tool = Path(sys.executable).parent / "mimae-shards"
    subprocess.run([str(tool), "demo", str(out), "--train-per-class", "24", "--val-per-class", "4"], check=True,
                   capture_output=True, timeout=TIMEOUT)
    val = out / "val"
    # cut the held-out set to 37: rewrite its one tar through the webdataset library, then index it
    samples = list(wds.WebDataset(str(next(val.glob("*.tar"))), shardshuffle=False))[:37]
    for f in val.iterdir():
        f.unlink()
    with wds.TarWriter(str(val / "val-000000.tar")) as sink:
        for s in samples:
            sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
    subprocess.run([str(tool), "index", str(val / "val-000000.tar")], check=True, capture_output=True)
    assert resolve_shards(str(val / "val-000000.tar"), "test").num_samples == 37
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A real pretraining checkpoint of the tiny MI-MAE (one DeepSpeed step, ZeRO 1)."""
    root = tmp_path_factory.mktemp("pretrained")
    with single_process_group():
        saved = train_and_save(root, "tiny", stage=1, seed=3)
    return saved["folder"]


def data(shards: Path) -> list[str]:
    return ["data.backend=dali", f"data.train_shards={shards / 'train'}",
            f"data.val_shards={shards / 'val' / 'val-000000.tar'}", *TRAIN]


def finetune(run_dir: Path, overrides: list[str], log: Path, config: str = "finetune_tiny") -> Job:
    return Job("mimae_scale/train.py", ["--config", config, f"run_dir={run_dir}", *overrides], log)


def layer_scale(name: str, depth: int, decay: float) -> float:
    """MAE's layer id (cls token, positions, patch embedding 0; block i is i + 1; the rest depth + 1)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


def test_each_group_steps_with_the_schedule_times_its_layer_scale_under_zero_1_2_3(tmp_path, shards):
    """AdamW's first step moves each tensor's elements by at most lr x lr_scale (|g| / (|g| + eps)): the
    largest move of every parameter is the lr its own layer should have, under every ZeRO stage."""
    out = tmp_path / "probe.json"
    job = Job("tests/helpers/engine_runs/finetune_lr_probe.py",
              [str(out), "1,2,3", *data(shards), "optim.warmup_epochs=0", "optim.weight_decay=0",
               "finetune.layer_decay=0.5", "finetune.reprob=0", "finetune.mixup=0", "finetune.cutmix=0"],
              tmp_path / "probe.log")
    assert job.wait() == 0, job.output[-4000:]
    result = json.loads(out.read_text())
    cfg = load_config("finetune_tiny", [f"data.val_shards={shards / 'val'}"])
    depth = cfg.model.depth
    for stage in ("1", "2", "3"):
        lr = result[stage]["lr"]
        assert lr == pytest.approx(cfg.optim.base_lr * 32 / 256)  # no warm-up: the peak at step 0
        scales = sorted({g["lr_scale"] for g in result[stage]["groups"]})
        assert scales == pytest.approx(sorted({0.5 ** k for k in range(depth + 2)}))
        for group in result[stage]["groups"]:
            assert group["lr"] == pytest.approx(lr * group["lr_scale"], rel=1e-12)
        for name, moved in result[stage]["moved"].items():
            # |g| / (|g| + 1e-8) falls a little short of 1 where a whole tensor's gradients are tiny (the cls
            # token's are ~1e-7 under average pooling); adjacent layers' lrs differ by 2x
            expected = lr * layer_scale(name, depth, 0.5)
            assert moved == pytest.approx(expected, rel=0.03), (stage, name, moved, expected)


@pytest.mark.parametrize("ranks", [2, 3])
def test_top1_over_ranks_equals_one_process(tmp_path, shards, ranks):
    """37 held-out images on 1, 2 and 3 ranks: every image counted once, the same top-1 and top-5."""
    results = {}
    for world in (1, ranks):
        out = tmp_path / f"eval{world}.json"
        job = Job("tests/helpers/engine_runs/eval_ranks.py", [str(out), *data(shards), "seed=5"],
                  tmp_path / f"eval{world}.log", ranks=world)
        assert job.wait() == 0, job.output[-4000:]
        results[world] = json.loads(out.read_text())
    one, many = results[1], results[ranks]
    assert one["first"]["samples"] == many["first"]["samples"] == many["again"]["samples"] == 37
    assert 0.0 < one["first"]["top1"] < one["first"]["top5"] < 1.0  # the random head is not degenerate
    for key in ("top1", "top5"):
        assert many["first"][key] == one["first"][key] == many["again"][key]
    assert many["first"]["loss"] == pytest.approx(one["first"]["loss"], rel=1e-5)


def test_sigkilled_finetune_resumes_bit_for_bit_and_exports_a_timm_classifier(tmp_path, shards, pretrained):
    """From a pretraining checkpoint, with RandAugment (DALI), random erasing, Mixup/CutMix, drop path and
    the weight EMA: a run SIGKILLed mid-epoch and resumed logs every step's loss, lr and gradient norm
    exactly as one that never stopped; its top-1 is reported; the exported classifier loads strictly
    into timm and gives the engine's logits."""
    settings = [*data(shards), f"finetune.init={pretrained}", "deterministic=true", "train.max_steps=12",
                "train.log_every=1", "checkpoint.every_steps=4", "finetune.ema_decay=0.9", "train.epochs=3"]
    ref_dir, run = tmp_path / "reference", tmp_path / "run"
    job = finetune(ref_dir, settings, tmp_path / "reference.log")
    assert job.wait() == 0, job.output[-4000:]
    assert "encoder from" in job.output and "initialised here: fc_norm.weight, fc_norm.bias, head.weight" in job.output
    reference = {r["step"]: r for r in records(ref_dir)}
    assert sorted(reference) == list(range(1, 13))
    assert "val_top1" in reference[8] and "val_top1" in reference[12]  # after epoch 1, and at the end
    assert reference[12]["val_samples"] == 37 and "ema_val_top1" in reference[12]

    job = finetune(run, settings, tmp_path / "killed.log")
    job.wait_for_step(run, 7)
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.wait()
    newest = complete_steps(run)[-1]
    assert 4 <= newest < 12
    job = finetune(run, settings, tmp_path / "resumed.log")
    assert job.wait() == 0, job.output[-4000:]
    assert f"step_{newest:09d}: step {newest}" in job.output
    resumed = {r["step"]: r for r in records(run)}  # the last record of each step wins
    for step in range(1, 13):
        for key in ("loss", "lr", "grad_norm", "val_top1", "val_top5", "ema_val_top1"):
            assert resumed[step].get(key) == reference[step].get(key), (step, key)

    # the classifier as a timm model: strict load through pretrained_cfg_overlay, same logits
    import timm

    out = tmp_path / "classifier.safetensors"
    summary = export(ref_dir, out, "timm")
    assert summary["timm_args"]["num_classes"] == 10 and summary["timm_args"]["global_pool"] == "avg"
    overlay = {"file": str(out), **summary["pretrained_cfg_overlay"]}
    model = timm.create_model(summary["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay,
                              **summary["timm_args"]).eval()
    from mimae_scale.evaluation.checkpoint import load_checkpoint
    from mimae_scale.model.classifier import build_classifier

    ckpt = load_checkpoint(ref_dir)
    ours = build_classifier(ckpt.cfg)
    ours.load_state_dict(ckpt.state_dict, strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(images), ours.eval()(images), rtol=0, atol=0)


def test_linear_probe_trains_only_the_head_and_reports_top1(tmp_path, shards, pretrained):
    run = tmp_path / "probe"
    job = finetune(run, [*data(shards), f"finetune.init={pretrained}", "train.max_steps=6", "train.log_every=3",
                         "train.global_batch=64"], tmp_path / "probe.log", config="linprobe_tiny")
    assert job.wait() == 0, job.output[-4000:]
    last = records(run)[-1]
    assert last["step"] == 6 and last["val_samples"] == 37 and 0 <= last["val_top1"] <= 1
    from mimae_scale.evaluation.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run)
    start = load_checkpoint(pretrained).state_dict
    for name, value in ckpt.state_dict.items():  # the encoder is frozen: exactly the pretrained weights
        if name.startswith(("blocks.", "patch_embed.", "cls_token", "norm.")):
            assert torch.equal(value, start[name]), name
    assert not torch.equal(ckpt.state_dict["head.1.weight"], torch.zeros_like(ckpt.state_dict["head.1.weight"]))
    from mimae_scale.engine.summary import summarize

    text = summarize(run)
    assert f"linprobe of a ViT 64x2 (32 px / patch 4, 10 classes) from {pretrained}" in text
    assert f"held-out top-1 by step: 6: {last['val_top1']:.4f}" in text


# -- bad input: exit 2, one line naming the file and what differs, nothing written over -----------------


def _digest(folder: Path) -> dict[str, str]:
    """Every file's hash but train.log's, to which each attempt appends its own lines (the error too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "train.log"}


def train_py(config: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "mimae_scale/train.py", "--config", config, "metrics.enabled=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**clean_environ(), "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, shards, pretrained) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    with single_process_group():
        wide = train_and_save(root / "wide", "tiny", stage=1, seed=1, overrides=("model.embed_dim=32",))["folder"]
        patch8 = train_and_save(root / "patch8", "tiny", stage=1, seed=1, overrides=("model.patch_size=8",))["folder"]
    classifier = root / "classifier"
    done = train_py("finetune_tiny", *data(shards), f"finetune.init={pretrained}", f"run_dir={classifier}",
                    "train.max_steps=1", "train.micro_batch=32", "engine.zero_stage=0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pretrain_run = root / "pretrain_run"
    done = train_py("tiny", "data.backend=synthetic", f"run_dir={pretrain_run}", "train.max_steps=1",
                    "engine.zero_stage=0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    with wds.TarWriter(str(unlabelled / "u-000000.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:04d}", "jpg": jpeg_bytes(rng)})
    subprocess.run([str(Path(sys.executable).parent / "mimae-shards"), "index", str(unlabelled / "u-000000.tar")],
                   check=True, capture_output=True)
    return {"wide": wide, "patch8": patch8, "classifier": classifier, "pretrain_run": pretrain_run,
            "unlabelled": unlabelled / "u-000000.tar", "pretrained": pretrained}


BAD = {  # case -> (overrides, what the one line must say)
    "another width": (["finetune.init={wide}"], ["{wide}", "embed_dim 32 in the file, model.embed_dim 64"]),
    "another patch size": (["finetune.init={patch8}"], ["{patch8}", "patch_size 8 in the file, model.patch_size 4"]),
    "a classifier as the encoder": (["finetune.init={classifier}"],
                                    ["{classifier}", "a finetune classifier checkpoint"]),
    "a pretraining run as the classifier": (["finetune.init={pretrained}", "run_dir={pretrain_run}"],
                                            ["{pretrain_run}", "is a pretrain checkpoint and this run's task is "
                                             "finetune"]),
    "held-out shards without labels": (["finetune.init={pretrained}", "data.val_shards={unlabelled}"],
                                       ["data.val_shards", "{unlabelled}",
                                        "no usable samples (each needs .jpg and .cls)"]),
    "another class count": (["finetune.init={pretrained}", "finetune.num_classes=7"],
                            ["finetune.num_classes: 7", "has 10 classes"]),
    "no such file": (["finetune.init={root}/missing.pth"], ["{root}/missing.pth", "no such checkpoint folder"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(tmp_path, shards, bad_inputs, case):
    overrides, wanted = BAD[case]
    paths = {**{k: str(v) for k, v in bad_inputs.items()}, "root": str(tmp_path)}
    run_dir = tmp_path / "run"
    args = [*data(shards), f"run_dir={run_dir}", "engine.zero_stage=0", "train.micro_batch=32"]
    args += [o.format(**paths) for o in overrides]
    before = _digest(bad_inputs["pretrain_run"])
    done = train_py("finetune_tiny", *args)
    assert done.returncode == EXIT_CONFIG, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if " ERROR " in line or "Error:" in line]
    assert len(errors) == 1, errors
    for text in wanted:
        assert text.format(**paths) in errors[0], errors[0]
    assert _digest(bad_inputs["pretrain_run"]) == before  # nothing written over
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_classifier_checkpoint_is_refused_where_an_encoder_is_expected(bad_inputs, shards):
    """mimae-eval scores pretrained encoders: a fine-tuned classifier is one line and exit 2."""
    tool = Path(sys.executable).parent / "mimae-eval"
    cmd = [str(tool), "knn", "--checkpoint", str(bad_inputs["classifier"]), "--train", str(shards / "train"),
           "--val", str(shards / "val"), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**clean_environ(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == EXIT_CONFIG, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "classifier checkpoint" in line]
    assert len(lines) == 1 and str(bad_inputs["classifier"]) in lines[0], done.stderr[-2000:]
