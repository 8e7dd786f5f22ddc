"""Export: real DeepSpeed checkpoints (ZeRO 0-3) of trained models into timm's ViT and MAE's layout.

The ViT-B/16 checkpoints are the shipped ``mimae_vit_b16`` model (K 4, full decoder, MI heads),
trained one optimiser step by a DeepSpeed engine on CPU and saved by ``engine.save_checkpoint``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import deepspeed
import pytest
import torch

from mimae_scale.config import load_config
from mimae_scale.evaluation import export as export_mod
from mimae_scale.evaluation.checkpoint import CheckpointError, load_checkpoint, load_model
from mimae_scale.model import MIMAE, build_model
from tests.helpers.ds_helpers import single_process_group, train_and_save


@pytest.fixture(scope="module")
def process_group():
    with single_process_group():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, process_group):
    """stage -> (tag folder, weights after the step, weights before). ViT-B/16 for ZeRO 1 and 3."""
    root = tmp_path_factory.mktemp("ds")
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    plans = {0: "tiny", 1: "mimae_vit_b16", 2: "tiny", 3: "mimae_vit_b16"}
    out = {}
    for stage, config in plans.items():
        out[stage] = train_and_save(root / f"zero{stage}", config, stage, seed + stage)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidated_weights_are_the_trained_ones(checkpoints, stage):
    c = checkpoints[stage]
    ckpt = load_checkpoint(c["folder"])
    assert ckpt.zero_stage == stage
    assert ckpt.cfg.model == c["cfg"].model
    assert set(ckpt.state_dict) == set(c["trained"])
    for k, v in c["trained"].items():
        torch.testing.assert_close(ckpt.state_dict[k], v.float(), rtol=0, atol=0, msg=k)
    # the step moved the weights: we export what was trained, not the initialisation
    moved = [k for k in c["trained"] if not torch.equal(c["trained"][k], c["initial"][k])]
    assert "blocks.0.attn.qkv.weight" in moved and "patch_embed.proj.weight" in moved


@pytest.mark.parametrize("stage", [1, 3])
def test_vit_b16_export_loads_strictly_into_timm_and_matches(checkpoints, stage, tmp_path, gen):
    import timm

    c = checkpoints[stage]
    out = tmp_path / "vit_b16.pth"
    rc = export_mod.main([str(c["folder"]), str(out), "--format", "timm"])
    assert rc == 0
    summary = json.loads((tmp_path / "vit_b16.pth.json").read_text())
    assert summary["timm_model"] == "vit_base_patch16_224" and summary["timm_args"] == {"num_classes": 0}
    assert summary["zero_stage"] == stage

    state = torch.load(out, weights_only=True)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vit.load_state_dict(state, strict=True)
    vit.eval()
    cfg = c["cfg"]
    ours = MIMAE(cfg.model, cfg.mask, cfg.mi, cfg.loss)
    ours.load_state_dict(c["trained"], strict=True)  # the engine's own weights, not the export's
    ours.eval()
    x = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        theirs_tokens = vit.forward_features(x)
        ours_tokens = ours.forward_features(x)
        pooled = vit(x)
    torch.testing.assert_close(theirs_tokens, ours_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, ours_tokens[:, 0], rtol=1e-4, atol=1e-4)

    # timm's own pretrained-weights path reads the file too
    via_timm = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": str(out)})
    for k, v in via_timm.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_tiny_export_uses_explicit_timm_args_and_safetensors(checkpoints, tmp_path, gen):
    import timm

    c = checkpoints[2]
    out = tmp_path / "tiny.safetensors"
    summary = export_mod.export(c["folder"].parent.parent, out, "timm")  # the run dir resolves via `latest`
    args = dict(summary["timm_args"])
    assert args["patch_size"] == 4 and args["embed_dim"] == 64 and args["img_size"] == 32
    from safetensors.torch import load_file

    vit = timm.create_model(summary["timm_model"], **args).eval()
    vit.load_state_dict(load_file(str(out)), strict=True)
    model, _ = load_model(c["folder"])
    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)


def test_mae_format_is_what_mae_finetuning_loads(checkpoints, tmp_path):
    """MAE's main_finetune.py: ``checkpoint['model']`` into models_vit (timm's ViT with a head, and
    fc_norm instead of norm under --global_pool), strict=False, and it asserts the missing keys."""
    import timm

    c = checkpoints[1]
    out = tmp_path / "mae.pth"
    export_mod.export(c["folder"], out, "mae")
    ckpt = torch.load(out, weights_only=True)
    sd = ckpt["model"]
    assert "decoder_pred.weight" in sd and "mask_token" in sd and "decoder_pos_embed" in sd
    assert not [k for k in sd if k.startswith(("projector.", "approx."))]
    assert sd["pos_embed"].shape == (1, 197, 768)

    token_vit = timm.create_model("vit_base_patch16_224", num_classes=1000)
    msg = token_vit.load_state_dict(dict(sd), strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"}
    pooled_vit = timm.create_model("vit_base_patch16_224", num_classes=1000, global_pool="avg", fc_norm=True)
    msg = pooled_vit.load_state_dict(dict(sd), strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    for k, v in token_vit.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(v, c["trained"][k], rtol=0, atol=0, msg=k)


class _Payload:
    """Unpickling this would create a file: a stand-in for code a hostile checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_unsafe_pickle_is_refused_not_run(tmp_path):
    folder = tmp_path / "checkpoints" / "bad"
    folder.mkdir(parents=True)
    marker = tmp_path / "executed"
    torch.save({"module": {}, "ds_config": {}, "evil": _Payload(marker)}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint folder"):
        load_checkpoint(tmp_path / "empty")
    folder = tmp_path / "run" / "checkpoints" / "t"
    folder.mkdir(parents=True)
    torch.save({"module": {}, "ds_config": {}}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="pass --config"):
        load_checkpoint(folder)
    assert export_mod.main([str(folder), str(tmp_path / "x.pth")]) == 2


def test_online_knn_reads_a_zero3_engine(process_group, gen, seed):
    """forward_features on a ZeRO-3 partitioned module (cls_token gathered by online_knn) gives the
    same monitor value as the plain model with the same weights."""
    from mimae_scale.evaluation.online import online_knn

    cfg = load_config("tiny", ["engine.zero_stage=3", "data.val_shards=/unused", "eval.knn_every_epochs=1"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    plain = MIMAE(cfg.model, cfg.mask, cfg.mi, cfg.loss)
    plain.load_state_dict(model.state_dict())
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    assert engine.module.cls_token.numel() == 0  # partitioned: forward_features needs the gather
    labels = torch.randint(0, 10, (64,), generator=gen)
    batches = [{"images": torch.randn(16, 3, 32, 32, generator=gen), "labels": labels[i:i + 16]}
               for i in range(0, 64, 16)]
    got = online_knn(engine.module, cfg, batches=batches)
    want = online_knn(plain, cfg, batches=batches)
    assert got["knn_top1"] == want["knn_top1"] and got["knn_top5"] == want["knn_top5"]
