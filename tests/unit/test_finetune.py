"""Fine-tuning and linear probing, one process: the classifier and its initialisation from a pretrained
encoder, the batch augmentations' targets, LARS as MAE uses it, exact top-1, and the config rules."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mimae_scale.config import ConfigError, load_config
from mimae_scale.data.dali_loader import rand_augment_args
from mimae_scale.data.wds_loader import timm_rand_augment
from mimae_scale.engine.optim import _lars, classifier_param_groups
from mimae_scale.engine.tasks import BatchAugment
from mimae_scale.evaluation.classify import evaluate_classifier
from mimae_scale.evaluation.export import encoder_state_dict
from mimae_scale.model import build_model
from mimae_scale.model.classifier import build_classifier, load_pretrained, timm_state_dict

VAL = "data.val_shards=/nonexistent/val"  # configs only: nothing is read


def config(name: str = "finetune_tiny", *overrides: str):
    return load_config(name, [VAL, *overrides])


@pytest.fixture
def encoder_file(tmp_path):
    """A tiny MI-MAE's encoder, as mimae-export writes it (timm names), with fresh random weights."""
    cfg = load_config("tiny")
    torch.manual_seed(random.randrange(2**31))
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels="off")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    tensors = encoder_state_dict(model.state_dict())
    path = tmp_path / "encoder.pth"
    torch.save(tensors, path)
    return path, tensors


# -- the classifier and its initialisation --------------------------------------------------------


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_pretrained_encoder_fills_the_classifier(encoder_file, task):
    path, tensors = encoder_file
    cfg = config(f"{task}_tiny", f"finetune.init={path}")
    model = build_classifier(cfg)
    keys = load_pretrained(model, cfg)
    own = model.state_dict()
    for name, value in tensors.items():
        if name in own:
            assert torch.equal(own[name], value), name
    if task == "finetune":  # MAE's global pool: fc_norm replaces the final norm
        assert keys["unused"] == ["norm.weight", "norm.bias"]
        assert sorted(keys["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    else:  # the probe: cls token after the final norm, BatchNorm + linear head, only the head trains
        assert keys["unused"] == []
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}


def test_position_embeddings_are_resampled_for_another_image_size(encoder_file):
    from timm.layers import resample_abs_pos_embed

    path, tensors = encoder_file
    cfg = config("finetune_tiny", f"finetune.init={path}", "model.img_size=48")  # 8x8 -> 12x12 patches
    model = build_classifier(cfg)
    load_pretrained(model, cfg)
    pos = model.state_dict()["pos_embed"]
    assert pos.shape == (1, 1 + 144, 64)
    assert torch.equal(pos[:, :1], tensors["pos_embed"][:, :1])  # the cls row is kept as it is
    # a bicubic resample of the 8x8 grid: a constant grid stays constant (independent of timm's code path)
    flat = torch.zeros_like(tensors["pos_embed"])
    flat[:, 1:] = 0.25
    torch.testing.assert_close(resample_abs_pos_embed(flat, [12, 12], num_prefix_tokens=1)[:, 1:],
                               torch.full((1, 144, 64), 0.25), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("change", "message"), [
    ("model.embed_dim=128", "embed_dim 64 in the file, model.embed_dim 128"),
    ("model.patch_size=8", "patch_size 4 in the file, model.patch_size 8"),
    ("model.depth=3", "depth 2 in the file, model.depth 3"),
])
def test_another_encoder_shape_is_one_line_naming_the_file(encoder_file, change, message):
    path, _ = encoder_file
    cfg = config("finetune_tiny", f"finetune.init={path}", change, "model.num_heads=4")
    with pytest.raises(ConfigError) as err:
        load_pretrained(build_classifier(cfg), cfg)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_a_classifier_file_or_a_missing_one_is_refused(tmp_path, encoder_file):
    _, tensors = encoder_file
    head = tmp_path / "classifier.pth"
    torch.save({**tensors, "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}, head)
    for init, message in ((head, "holds a classifier head"), (tmp_path / "none.pth", "no such checkpoint folder")):
        cfg = config("finetune_tiny", f"finetune.init={init}")
        with pytest.raises(ConfigError, match="no such|holds a classifier") as err:
            load_pretrained(build_classifier(cfg), cfg)
        assert str(init) in str(err.value) and message in str(err.value)


def test_an_mae_repository_checkpoint_is_read(tmp_path, encoder_file):
    _, tensors = encoder_file
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": {**tensors, "mask_token": torch.zeros(1, 1, 32)}, "epoch": 799}, path)
    cfg = config("finetune_tiny", f"finetune.init={path}")
    model = build_classifier(cfg)
    load_pretrained(model, cfg)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], tensors["blocks.1.mlp.fc2.weight"])


def test_linear_probe_folds_its_batchnorm_into_the_exported_head():
    cfg = config("linprobe_tiny")
    model = build_classifier(cfg).eval()
    bn = model.head[0]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(model.head[1].weight)
    import timm

    from mimae_scale.model.classifier import timm_classifier_spec

    name, args = timm_classifier_spec(cfg)
    plain = timm.create_model(name, pretrained=False, **args).eval()
    plain.load_state_dict(timm_state_dict(cfg, model.state_dict()), strict=True)
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(plain(images), model(images), rtol=1e-5, atol=1e-5)


# -- batch augmentations and targets ---------------------------------------------------------------


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_soft_targets_sum_to_one(mixup, cutmix):
    cfg = config("finetune_tiny", f"finetune.mixup={mixup}", f"finetune.cutmix={cutmix}", "finetune.reprob=0.25")
    augment = BatchAugment(cfg, torch.device("cpu"))
    rng = np.random.default_rng()
    labels = torch.from_numpy(rng.integers(0, 10, size=16))
    images = torch.from_numpy(rng.standard_normal((16, 3, 32, 32))).float()
    out, soft = augment(images.clone(), labels)
    assert soft.shape == (16, 10) and out.shape == images.shape
    torch.testing.assert_close(soft.double().sum(dim=1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (soft >= 0).all()
    if mixup == cutmix == 0:  # label smoothing alone: 1 - 0.1 + 0.1 / 10 on the label, 0.01 elsewhere
        expected = np.full((16, 10), 0.01)
        expected[np.arange(16), labels.numpy()] = 0.91
        np.testing.assert_allclose(soft.double().numpy(), expected, rtol=0, atol=1e-7)


def test_linear_probe_targets_are_one_hot_and_images_untouched():
    augment = BatchAugment(config("linprobe_tiny"), torch.device("cpu"))
    labels = torch.randint(0, 10, (8,))
    images = torch.randn(8, 3, 32, 32)
    out, soft = augment(images.clone(), labels)
    assert torch.equal(out, images) and torch.equal(soft, torch.nn.functional.one_hot(labels, 10).float())


def test_rand_augment_string_as_dali_arguments():
    assert rand_augment_args("rand-m9-mstd0.5-inc1") == {"n": 2, "m": 9, "num_magnitude_bins": 11,
                                                         "monotonic_mag": True}
    assert rand_augment_args("rand-n3-m7") == {"n": 3, "m": 7, "num_magnitude_bins": 11, "monotonic_mag": False}
    assert rand_augment_args("") is None


def test_webdataset_rand_augment_is_a_function_of_the_seed_and_leaves_global_generators_alone():
    augment = timm_rand_augment(config("finetune_tiny"))
    rng = np.random.default_rng()
    img = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    state = random.getstate(), np.random.get_state()[1].copy()
    outs = [np.asarray(augment(img, seed)) for seed in (7, 7, 8, 9, 10)]
    assert np.array_equal(outs[0], outs[1])
    assert any(not np.array_equal(outs[0], o) for o in outs[2:])
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])


# -- LARS, as MAE's linear probe uses it ---------------------------------------------------------------


def mae_lars_reference(params, grads_per_step, lr, momentum=0.9, trust=0.001):
    """MAE's util/lars.py in float64: weights (ndim > 1) get the trust ratio, biases do not."""
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, buf in zip(params, grads, bufs, strict=True):
            dp = g.double()
            if p.ndim > 1:
                p_norm, d_norm = p.norm(), dp.norm()
                q = trust * p_norm / d_norm if p_norm > 0 and d_norm > 0 else torch.tensor(1.0, dtype=torch.float64)
                dp = dp * q
            buf.mul_(momentum).add_(dp)
            p.add_(buf, alpha=-lr)
    return params


def test_lars_adapts_only_weights_with_more_than_one_dimension():
    cfg = config("linprobe_tiny")
    model = build_classifier(cfg)
    torch.nn.init.normal_(model.head[1].bias)
    groups = classifier_param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    assert [p.ndim for p in params] == [2, 1]  # the head's weight, then its bias
    start = [p.detach().clone() for p in params]
    opt = _lars()(groups, lr=0.3, momentum=0.9, trust_coeff=0.001)
    steps = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    expected = mae_lars_reference(start, steps, lr=0.3)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7)
    # the bias moved by lr x its plain momentum sum; the weight by far less (trust ratio ~1e-3 x |w| / |g|)
    bias_move = (params[1].detach() - start[1]).abs().max()
    assert bias_move > 0.1


# -- top-1 in one process against a hand count -------------------------------------------------------------


def test_top1_top5_count_valid_rows_only():
    rng = np.random.default_rng()
    logits = torch.from_numpy(rng.standard_normal((23, 7)))
    labels = torch.from_numpy(rng.integers(0, 7, size=23))
    valid = torch.from_numpy(rng.random(23) < 0.7)
    valid[0] = True

    class Table(torch.nn.Module):  # row i of the batch -> logits[i]
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()] + self.weight

    batches = [{"images": torch.arange(i, min(i + 5, 23)).double().view(-1, 1, 1, 1),
                "labels": labels[i:i + 5], "valid": valid[i:i + 5]} for i in range(0, 23, 5)]
    got = evaluate_classifier(Table(), batches, torch.device("cpu"))
    order = np.argsort(-logits.numpy(), axis=1)
    rows = valid.numpy()
    top1 = (order[:, 0] == labels.numpy())[rows].mean()
    top5 = np.array([labels[i].item() in order[i, :5] for i in range(23)])[rows].mean()
    assert got["samples"] == rows.sum()
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "overrides", "field"), [
    ("linprobe_tiny", ["engine.zero_stage=1"], "optim.name"),
    ("linprobe_tiny", ["engine.precision=bf16"], "optim.name"),
    ("finetune_tiny", ["train.micro_batch=31", "train.global_batch=62"], "train.micro_batch"),
    ("finetune_tiny", ["finetune.ema_decay=0.99", "engine.zero_stage=3"], "finetune.ema_decay"),
    ("finetune_tiny", ["eval.knn_every_epochs=1"], "eval.knn_every_epochs"),
    ("finetune_tiny", ["finetune.layer_decay=0"], "finetune.layer_decay"),
    ("finetune_tiny", ["finetune.rand_augment=autoaug"], "finetune.rand_augment"),
])
def test_settings_that_cannot_work_are_refused_naming_the_field(name, overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        config(name, *overrides)


def test_a_classifier_task_needs_held_out_shards():
    with pytest.raises(ConfigError, match="^data.val_shards:"):
        load_config("finetune_tiny")


def test_the_pretraining_fingerprint_ignores_the_finetune_section():
    base = load_config("tiny")
    assert load_config("tiny", ["finetune.num_classes=3"]).fingerprint() == base.fingerprint()
    tuned = config("finetune_tiny")
    assert config("finetune_tiny", "finetune.num_classes=3").fingerprint() != tuned.fingerprint()
    assert config("finetune_tiny", "finetune.mixup=0.5").fingerprint() == tuned.fingerprint()


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_classifier_flops_match_torch_flop_counter(task):
    """torch's FlopCounterMode on the classifier's forward + backward, with the convention's over-counts
    (gradients autograd never computes) added back, to the FLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    from mimae_scale.flops import train_flops_per_image

    cfg = config(f"{task}_tiny")
    model = build_classifier(cfg)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit matmuls: FlopCounterMode does not count CPU SDPA
    batch, m = 3, cfg.model
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(batch, 3, 32, 32)).sum().backward()
    if task == "finetune":  # no gradient for the input images
        over = 2 * 3 * 4 * 4 * m.embed_dim * cfg.num_patches * batch
    else:  # the frozen encoder's features need no gradient: the head's input gradient is not computed
        over = 2 * m.embed_dim * cfg.finetune.num_classes * batch
    assert counter.get_total_flops() == train_flops_per_image(cfg) * batch - over
