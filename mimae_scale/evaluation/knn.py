"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

Features are L2-normalised; each query takes its k most cosine-similar training features and
each neighbour votes for its label with weight ``exp(similarity / T)``; the class with the largest
summed vote wins. Defaults k = 20, T = 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    leave_one_out: bool = False,
    chunk: int = 1024,
) -> torch.Tensor:
    """(Q, num_classes) summed neighbour weights.

    ``leave_one_out``: the queries ARE the training set (same rows, same order) and a sample may
    not vote for itself (the online monitor's protocol on one held-out set).
    """
    if leave_one_out and query_features.shape[0] != train_features.shape[0]:
        raise ValueError("leave_one_out needs the queries to be the training features")
    n = train_features.shape[0] - (1 if leave_one_out else 0)
    if n < 1:
        raise ValueError("kNN needs at least one training feature")
    k = min(k, n)
    bank = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(query_features.float().to(bank.device), dim=1)
    labels = train_labels.to(bank.device).long()
    votes = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T
        if leave_one_out:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, start + rows] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        v = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.append(v.scatter_add_(1, labels[top_idx], weights))
    return torch.cat(votes)


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor | None,
    test_labels: torch.Tensor | None,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float | int]:
    """Top-1 (and top-5 with >= 5 classes) accuracy in [0, 1]. Without a test set: leave-one-out."""
    leave_one_out = test_features is None
    if leave_one_out:
        test_features, test_labels = train_features, train_labels
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_votes(train_features, train_labels, test_features, num_classes, k, temperature, leave_one_out)
    truth = test_labels.to(votes.device).long()
    result: dict[str, float | int] = {
        "top1": (votes.argmax(dim=1) == truth).float().mean().item(),
        "k": min(k, train_features.shape[0] - int(leave_one_out)), "temperature": temperature,
        "n_train": int(train_features.shape[0]), "n_test": int(test_features.shape[0]),
        "num_classes": num_classes, "leave_one_out": leave_one_out,
    }
    if num_classes >= 5:
        top5 = votes.topk(5, dim=1).indices
        result["top5"] = (top5 == truth[:, None]).any(dim=1).float().mean().item()
    return result
