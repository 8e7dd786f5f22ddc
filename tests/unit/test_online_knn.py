"""The online kNN monitor: known answers, schedule, and the same number on 1 and 2 ranks."""

from __future__ import annotations

import pytest
import torch

from mimae_scale.config import ConfigError, load_config
from mimae_scale.evaluation.features import extract_features
from mimae_scale.evaluation.knn import knn_evaluate
from mimae_scale.evaluation.online import knn_due, online_knn
from mimae_scale.model import build_model
from tests.helpers.knn_data import knn_config


def _colour_batches(gen: torch.Generator, labels: torch.Tensor, batch: int = 16):
    """Class c = a flat image of colour c plus faint noise: any encoder separates these."""
    colours = torch.randn(int(labels.max()) + 1, 3, 1, 1, generator=gen) * 2
    images = colours[labels] + 0.01 * torch.randn(len(labels), 3, 32, 32, generator=gen)
    return [{"images": images[i:i + batch], "labels": labels[i:i + batch]} for i in range(0, len(labels), batch)]


def test_known_answers(gen, seed):
    cfg = knn_config()
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
    cfg = knn_config()
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
    cfg = knn_config()
    assert [e for e in range(7) if knn_due(cfg, e)] == [2, 4, 6]
    assert not any(knn_due(load_config("tiny"), e) for e in range(5))  # 0 = off
    with pytest.raises(ConfigError, match="data.val_shards"):
        load_config("tiny", ["eval.knn_every_epochs=1"])


