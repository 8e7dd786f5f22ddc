"""The MI heads: the InfoNCE projector and CLUB's approximation network q_theta(x | z)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Linear(d, hidden) - LayerNorm - GELU - Linear(hidden, out). No BatchNorm: it would need a
    cross-rank sync (ours, docs/METHOD.md)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim, eps=1e-6),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ApproximationNetwork(nn.Module):
    """q_theta(x | z) = N(mu(z), exp(logvar(z))): two 2-layer MLPs. With ``learned_variance=False``
    the variance is fixed at 1 and only the mean network exists (CLUB's CLUBMean).

    The log-variance is unbounded unless ``logvar_cap`` is set, then ``cap * tanh(out / cap)`` keeps
    it inside (-cap, cap). CLUB's own code uses a plain Tanh (cap 1): a variance of at most e times
    the unit one, so for a well-predicted x (residual variance far below 1) the NLL and the bound
    stop at the cap instead of q's fit (issue #25: arms sat at it). ``logvar_cap=1`` is that design.

    ``detach_params=True`` evaluates with theta detached, so a loss on the output moves only z.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, learned_variance: bool = True,
                 logvar_cap: float | None = None) -> None:
        super().__init__()
        self.logvar_cap = logvar_cap
        self.mu_hidden = nn.Linear(in_dim, hidden_dim)
        self.mu_out = nn.Linear(hidden_dim, out_dim)
        self.logvar_hidden = nn.Linear(in_dim, hidden_dim) if learned_variance else None
        self.logvar_out = nn.Linear(hidden_dim, out_dim) if learned_variance else None

    @staticmethod
    def _linear(layer: nn.Linear, x: torch.Tensor, detach: bool) -> torch.Tensor:
        if detach:
            return F.linear(x, layer.weight.detach(), layer.bias.detach())
        return layer(x)

    def forward(self, z: torch.Tensor, detach_params: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self._linear(self.mu_hidden, z, detach_params))
        mu = self._linear(self.mu_out, h, detach_params)
        if self.logvar_hidden is None:
            return mu, torch.zeros_like(mu)
        h = F.gelu(self._linear(self.logvar_hidden, z, detach_params))
        logvar = self._linear(self.logvar_out, h, detach_params)
        if self.logvar_cap is not None:
            logvar = self.logvar_cap * torch.tanh(logvar / self.logvar_cap)
        return mu, logvar
