"""Each loss against float64 math written independently here (loops, no shared helpers)."""

import math

import pytest
import torch

from mimae_scale import losses


def _f64(*ts):
    return [t.detach().double() for t in ts]


def ref_norm_pix_mse(pred, target, mask):
    pred, target, mask = _f64(pred, target, mask)
    rows = []
    for r in range(pred.shape[0]):
        total, count = 0.0, 0.0
        for p in range(pred.shape[1]):
            if mask[r, p] == 1:
                t = target[r, p]
                m = t.sum() / t.numel()
                v = ((t - m) ** 2).sum() / (t.numel() - 1)  # MAE's unbiased variance
                tn = (t - m) / math.sqrt(v + 1e-6)
                total += ((pred[r, p] - tn) ** 2).sum().item() / t.numel()
                count += 1
        rows.append(total / count)
    return sum(rows) / len(rows)


def ref_info_nce(z, k, tau):
    (z,) = _f64(z)
    r_count = z.shape[0]
    zn = [z[r] / z[r].norm() for r in range(r_count)]
    total = 0.0
    for r in range(r_count):
        sims = {j: (zn[r] @ zn[j]).item() / tau for j in range(r_count) if j != r}
        log_denominator = math.log(sum(math.exp(s) for s in sims.values()))
        positives = [j for j in sims if j // k == r // k]
        total += -sum(sims[j] - log_denominator for j in positives) / (k - 1)
    return total / r_count


def ref_club(mu, logvar, x, perm):
    mu, logvar, x = _f64(mu, logvar, x)
    total = 0.0
    for r in range(mu.shape[0]):
        for d in range(mu.shape[1]):
            var = math.exp(logvar[r, d].item())
            total += ((x[perm[r], d] - mu[r, d]) ** 2 - (x[r, d] - mu[r, d]) ** 2).item() / var
    return 0.5 * total / mu.shape[0]


def ref_gaussian_nll(mu, logvar, x):
    mu, logvar, x = _f64(mu, logvar, x)
    total = 0.0
    for r in range(mu.shape[0]):
        for d in range(mu.shape[1]):
            total += ((x[r, d] - mu[r, d]) ** 2 / math.exp(logvar[r, d]) + logvar[r, d]).item()
    return total / mu.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n", "p"), [(4, 16, 12), (6, 9, 48), (3, 5, 7)])
def test_norm_pix_mse(gen, dtype, rows, n, p):
    pred = torch.randn(rows, n, p, generator=gen).to(dtype)
    target = (torch.rand(rows, n, p, generator=gen) * 3 + 1).to(dtype)
    mask = (torch.rand(rows, n, generator=gen) < 0.7).float()
    mask[:, 0] = 1
    got = losses.norm_pix_mse(pred, target, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_norm_pix_mse(pred, target, mask), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "k", "d", "tau"), [(3, 4, 8, 0.2), (5, 2, 16, 0.5), (2, 3, 5, 0.1)])
def test_info_nce(gen, dtype, b, k, d, tau):
    z = (torch.randn(b * k, d, generator=gen) * 2).to(dtype)
    got = losses.info_nce(z, k, tau)
    assert got.item() == pytest.approx(ref_info_nce(z, k, tau), rel=1e-5)


def test_info_nce_prefers_aligned_views(gen):
    base = torch.randn(8, 32, generator=gen)
    aligned = base.repeat_interleave(4, dim=0) + 0.01 * torch.randn(32, 32, generator=gen)
    unrelated = torch.randn(32, 32, generator=gen)
    assert losses.info_nce(aligned, 4, 0.2) < losses.info_nce(unrelated, 4, 0.2)


def test_info_nce_rejects_single_view():
    with pytest.raises(ValueError, match="K >= 2"):
        losses.info_nce(torch.randn(8, 4), 1, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "d"), [(7, 5), (16, 48), (1, 3)])
def test_club_and_gaussian_nll(gen, dtype, rows, d):
    mu = torch.randn(rows, d, generator=gen).to(dtype)
    logvar = torch.tanh(torch.randn(rows, d, generator=gen)).to(dtype)
    x = torch.randn(rows, d, generator=gen).to(dtype)
    perm = torch.randperm(rows, generator=gen)
    # Both are sums of terms of either sign that can nearly cancel, so float32 rounding is judged
    # relative to the size of the terms (sum of |term| per row, averaged), not of the result.
    mu64, logvar64, x64 = _f64(mu, logvar, x)
    inv_var = torch.exp(-logvar64)
    club_terms = 0.5 * (((x64[perm] - mu64) ** 2 + (x64 - mu64) ** 2) * inv_var).sum(1).mean().item()
    nll_terms = ((x64 - mu64) ** 2 * inv_var + logvar64.abs()).sum(1).mean().item()
    assert losses.club_upper_bound(mu, logvar, x, perm).item() == pytest.approx(
        ref_club(mu, logvar, x, perm), abs=1e-5 * club_terms
    )
    assert losses.gaussian_nll(mu, logvar, x).item() == pytest.approx(
        ref_gaussian_nll(mu, logvar, x), abs=1e-5 * nll_terms
    )


def test_loss_gradients_match_float64(gen):
    """Autograd through the float32 references agrees with float64 autograd of the loop math."""
    z = torch.randn(12, 6, generator=gen, requires_grad=True)
    losses.info_nce(z, 4, 0.3).backward()
    z64 = z.detach().double().requires_grad_()
    zn = z64 / z64.norm(dim=1, keepdim=True)
    logits = zn @ zn.t() / 0.3
    total = 0
    for r in range(12):
        others = [j for j in range(12) if j != r]
        lse = torch.logsumexp(logits[r, others], dim=0)
        pos = [j for j in others if j // 4 == r // 4]
        total = total - sum(logits[r, j] - lse for j in pos) / 3
    (total / 12).backward()
    assert torch.allclose(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
