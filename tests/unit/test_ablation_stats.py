"""The sweep's statistics (mimae_scale/evaluation/ablation.py): the paired bootstrap interval."""

from __future__ import annotations

import math

import pytest
import torch

from mimae_scale.evaluation.ablation import bootstrap_diff


def test_bootstrap_interval_matches_the_normal_approximation(gen):
    """One seed, one label subset: the interval is the test images' sampling error, which for a mean
    of N independent differences is mean +/- 1.96 sd / sqrt(N)."""
    n = 4000
    diff = (torch.rand(n, generator=gen) < 0.6).double() - (torch.rand(n, generator=gen) < 0.5).double()
    lo, hi = bootstrap_diff(diff.numpy()[None, None], reps=3000, seed=int(torch.randint(1 << 30, (1,),
                                                                                      generator=gen)))
    mean, half = diff.mean().item(), 1.96 * diff.std().item() / n ** 0.5
    assert lo == pytest.approx(mean - half, abs=0.25 * half) and hi == pytest.approx(mean + half, abs=0.25 * half)
    # seeds that disagree widen it: the same images, one seed shifted by a whole point
    two = torch.stack([diff, diff + 0.02]).numpy()[:, None]
    lo2, hi2 = bootstrap_diff(two, reps=3000, seed=1)
    assert hi2 - lo2 > hi - lo
    assert bootstrap_diff(torch.zeros(2, 3, 50).numpy(), reps=200) == (0.0, 0.0)


def test_linear_gaussian_critic_on_a_linear_gaussian_channel(gen, monkeypatch):
    """x = A z + noise, z ~ N(0, I): per dim, R^2 = v / (v + s^2) and the CLUB of the true q is v / s^2,
    with v = Var((A z)_d); CLUB bounds the true I(x_d; z) = log(1 + v / s^2) / 2 from above."""
    from mimae_scale.evaluation import ablation

    dz, dx, n, noise = 6, 4, 40000, 0.5
    a = torch.randn(dz, dx, generator=gen, dtype=torch.float64)
    a /= a.norm(dim=0, keepdim=True)  # v = 1 in every dim

    def pairs(model, images, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, dz, generator=g, dtype=torch.float64)
        return z, z @ a + noise * torch.randn(n, dx, generator=g, dtype=torch.float64)

    monkeypatch.setattr(ablation, "token_pairs", pairs)
    result = ablation.linear_gaussian_critic(None, None, None)
    snr = 1 / noise ** 2
    assert result["decode_r2"] == pytest.approx(snr / (1 + snr), abs=0.01)
    assert result["club_linear"] == pytest.approx(snr, rel=0.03)
    assert result["club_linear"] >= 0.5 * math.log(1 + snr)
