"""Few-label evaluation (mimae_scale/evaluation/fewlabel.py): the label share, the crops, fine-tuning."""

from __future__ import annotations

import pytest
import torch

from mimae_scale.config import ConfigError, load_config
from mimae_scale.evaluation import fewlabel
from mimae_scale.model import build_model


def test_label_subset_keeps_the_same_share_of_every_class(gen):
    counts = torch.randint(20, 60, (7,), generator=gen)
    labels = torch.repeat_interleave(torch.arange(7), counts)[torch.randperm(int(counts.sum()), generator=gen)]
    rows = fewlabel.label_subset(labels, 0.1, seed=5)
    assert rows.unique().numel() == rows.numel() and rows.tolist() == sorted(rows.tolist())
    for c in range(7):
        assert (labels[rows] == c).sum().item() == max(1, round(0.1 * counts[c].item()))
    assert torch.equal(rows, fewlabel.label_subset(labels, 0.1, seed=5))  # seeded
    assert not torch.equal(rows, fewlabel.label_subset(labels, 0.1, seed=6))
    assert len(fewlabel.label_subset(labels, 0.001, seed=0)) == 7  # at least one of each class
    with pytest.raises(ValueError, match="label fraction"):
        fewlabel.label_subset(labels, 0.0, seed=0)


def test_full_crop_without_flip_is_the_image_and_flips_mirror(gen):
    cfg = load_config("tiny", ["data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.0,1.0]", "data.hflip=false"])
    images = torch.randn(4, 3, 16, 16, generator=gen)
    torch.testing.assert_close(fewlabel.crop_views(images, cfg, gen), images, atol=1e-5, rtol=1e-5)
    flipped = fewlabel.crop_views(images, load_config("tiny", ["data.crop_scale=[1.0,1.0]",
                                                                "data.crop_ratio=[1.0,1.0]"]), gen)
    for got, image in zip(flipped, images, strict=True):  # each image itself or its mirror
        assert torch.allclose(got, image, atol=1e-5) or torch.allclose(got, image.flip(-1), atol=1e-5)


def _separable(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes every patch tells apart: horizontal or vertical stripes (period 2 px), in noise."""
    labels = torch.randint(0, 2, (n,), generator=gen)
    stripes = (torch.arange(32) % 2).float() * 2 - 1
    horizontal, vertical = stripes[:, None].expand(32, 32), stripes[None, :].expand(32, 32)
    images = 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    images += torch.where(labels[:, None, None, None] == 0, horizontal, vertical)
    return images, labels


def test_finetune_learns_and_starts_from_the_encoder_it_is_given(gen):
    cfg = load_config("tiny", ["data.hflip=false", "data.crop_scale=[0.9,1.0]"])
    train, test = _separable(gen, 64), _separable(gen, 64)
    scores = fewlabel.finetune(None, cfg, *train, {"test": test, "train": train}, base_lr=3e-3, steps=40, seed=1)
    assert scores["test"] >= 0.9, scores  # training works: chance is 0.5
    # zero steps: the classifier's blocks are the encoder's own (a wrong load would fail here)
    encoder = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss).state_dict()
    from mimae_scale.model.classifier import build_classifier, load_encoder

    clf = build_classifier(fewlabel.classifier_config(cfg, 2, 1e-3, 1))
    load_encoder(clf, encoder, fewlabel.classifier_config(cfg, 2, 1e-3, 1), "here")
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert torch.equal(clf.state_dict()[key], encoder[key]), key


def test_finetune_refuses_an_encoder_of_another_shape(gen):
    cfg = load_config("tiny")
    wide = load_config("tiny", ["model.embed_dim=96"])
    encoder = build_model(wide.model, wide.mask, wide.mi, wide.loss).state_dict()
    with pytest.raises(ConfigError, match="embed_dim 96 in the file, model.embed_dim 64"):
        fewlabel.finetune(encoder, cfg, *_separable(gen, 8), {}, base_lr=1e-3, steps=1, seed=0)

