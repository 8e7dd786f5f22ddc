"""kNN and linear probe on data whose answer is known, and the kNN against a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mimae_scale.evaluation.features import extract_features, pool_tokens
from mimae_scale.evaluation.knn import knn_evaluate, knn_votes
from mimae_scale.evaluation.linear_probe import linear_probe_head, train_linear_probe


def _clusters(gen: torch.Generator, n: int, classes: int, dim: int, spread: float):
    """Gaussian clusters around orthogonal class centres (separable when spread << 1)."""
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0][:classes] * 5.0
    labels = torch.randint(0, classes, (n,), generator=gen)
    feats = centres[labels] + spread * torch.randn(n, dim, generator=gen)
    return feats, labels


def _reference_votes(train, train_y, query, classes, k, temperature, leave_one_out=False):
    train = train.double().numpy()
    query = query.double().numpy()
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    votes = np.zeros((len(query), classes))
    for q in range(len(query)):
        sims = [(float(train[j] @ query[q]), j) for j in range(len(train)) if not (leave_one_out and j == q)]
        sims.sort(reverse=True)
        for s, j in sims[:k]:
            votes[q, int(train_y[j])] += math.exp(s / temperature)
    return votes


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_knn_votes_match_float64_reference(gen, leave_one_out):
    train = torch.randn(300, 16, generator=gen)
    train_y = torch.randint(0, 7, (300,), generator=gen)
    query = train if leave_one_out else torch.randn(90, 16, generator=gen)
    votes = knn_votes(train, train_y, query, 7, k=20, temperature=0.07, leave_one_out=leave_one_out, chunk=64)
    ref = _reference_votes(train, train_y, query, 7, 20, 0.07, leave_one_out)
    np.testing.assert_allclose(votes.double().numpy(), ref, rtol=1e-4)
    assert torch.equal(votes.argmax(1), torch.from_numpy(ref.argmax(1)))


def test_knn_separable_clusters_are_perfect_and_random_labels_at_chance(gen):
    feats, labels = _clusters(gen, 3000, 10, 32, spread=0.3)
    result = knn_evaluate(feats[:2000], labels[:2000], feats[2000:], labels[2000:])
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["k"] == 20
    # labels independent of the features: 10 classes, 1000 queries -> 0.10 +- 0.0095 (1 sigma)
    random_labels = torch.randint(0, 10, (3000,), generator=gen)
    chance = knn_evaluate(feats[:2000], random_labels[:2000], feats[2000:], random_labels[2000:])
    assert abs(chance["top1"] - 0.10) < 0.045
    # leave-one-out on one set: the same two answers
    assert knn_evaluate(feats, labels, None, None)["top1"] == 1.0
    assert abs(knn_evaluate(feats, random_labels, None, None)["top1"] - 0.10) < 0.03


@pytest.fixture
def one_thread():
    """The probe's steps are tiny: on a shared 2-core box, thread hand-offs cost more than the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_linear_probe_separable_and_random(gen, one_thread):
    # linearly separable, not clustered: labels from a random linear map with a margin
    x = torch.randn(4000, 24, generator=gen) * 3.0 + 1.0  # off-centre and scaled: BatchNorm's job
    w = torch.randn(24, 5, generator=gen)
    scores = x @ w
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 3.0
    x, y = x[keep], scores[keep].argmax(1)
    n = x.shape[0] * 3 // 4
    result = train_linear_probe(x[:n], y[:n], x[n:], y[n:], epochs=40, seed=int(torch.randint(0, 10**6, (1,))))
    assert result["train_top1"] > 0.98 and result["top1"] > 0.97, result

    random_y = torch.randint(0, 5, (x.shape[0],), generator=gen)
    chance = train_linear_probe(x[:n], random_y[:n], x[n:], random_y[n:], epochs=40)
    assert abs(chance["top1"] - 0.2) < 0.06, chance  # ~800 test samples: 0.2 +- 0.014 (1 sigma)


def test_linear_probe_head_is_maes():
    head = linear_probe_head(32, 4)
    bn, linear = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.bias.abs().sum() == 0 and 0.005 < linear.weight.std() < 0.015


class _Encoder(torch.nn.Module):
    """forward_features of a fixed random linear map, to check pooling and bookkeeping."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(3 * 4, 8, generator=gen))

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        patches = imgs.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(imgs.shape[0], -1, 12)
        tokens = patches @ self.proj
        return torch.cat([tokens.sum(1, keepdim=True), tokens], dim=1)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_extract_features_pools_and_keeps_labels_in_order(gen, pool):
    enc = _Encoder(gen).train()
    imgs = torch.randn(10, 3, 4, 4, generator=gen)
    labels = torch.arange(10)
    batches = [{"images": imgs[i:i + 4], "labels": labels[i:i + 4]} for i in range(0, 10, 4)]
    feats, out_labels = extract_features(enc, batches, pool)
    assert enc.training  # restored
    assert torch.equal(out_labels, labels)
    torch.testing.assert_close(feats, pool_tokens(enc.forward_features(imgs), pool).detach())
    # padding rows (valid False) are dropped
    padded = [{"images": imgs[:4], "labels": labels[:4], "valid": torch.tensor([True, False, True, False])}]
    feats, out_labels = extract_features(enc, padded, pool)
    assert out_labels.tolist() == [0, 2] and feats.shape[0] == 2
    with pytest.raises(ValueError, match="pool"):
        pool_tokens(torch.zeros(1, 2, 3), "max")
    with pytest.raises(ValueError, match="no batches"):
        extract_features(enc, [], pool)
