"""MI-MAE's loss terms in plain PyTorch (docs/METHOD.md).

These are the reference definitions: the fused Triton versions in :mod:`mimae_scale.kernels`
must agree with them. Every function computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_NORM_EPS = 1e-6


def normalize_patches(target: torch.Tensor) -> torch.Tensor:
    """Per-patch normalisation of pixel targets (..., P), as MAE's ``norm_pix_loss``.

    MAE uses the unbiased variance (``Tensor.var``'s default); we keep that so the MAE special
    case reproduces MAE exactly.
    """
    target = target.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + PATCH_NORM_EPS) ** 0.5


def norm_pix_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE against per-patch normalised targets over the hidden patches (mask == 1).

    pred, target (R, N, P); mask (R, N). Averaged over the hidden patches of each row, then over
    rows (an average, so MAE's learning-rate rule carries over to K masks).
    """
    per_patch = (pred.float() - normalize_patches(target)).pow(2).mean(dim=-1)
    mask = mask.float()
    per_row = (per_patch * mask).sum(dim=1) / mask.sum(dim=1)
    return per_row.mean()


def info_nce(z: torch.Tensor, num_masks: int, tau: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE over image-major views z (B*K, D), unnormalised.

    For anchor r the positives are the other K-1 views of its image; the softmax runs over every
    row but r. loss_r = -(1/(K-1)) * sum_p log softmax_r(p); returns the mean over rows.
    ``valid`` (R,) marks the rows that take part: others are neither anchors nor in any softmax
    (padding rows repeat a real image, so as negatives they would be false negatives).
    """
    rows = z.shape[0]
    if num_masks < 2 or rows % num_masks:
        raise ValueError(f"info_nce needs K >= 2 dividing the rows, got K={num_masks}, R={rows}")
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.t() / tau
    eye = torch.eye(rows, dtype=torch.bool, device=z.device)
    excluded = eye if valid is None else eye | ~valid.bool()[None, :]
    log_prob = logits.masked_fill(excluded, float("-inf")).log_softmax(dim=1)
    image = torch.arange(rows, device=z.device) // num_masks
    positive = (image[:, None] == image[None, :]) & ~excluded
    per_row = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (num_masks - 1)
    if valid is None:
        return per_row.mean()
    weight = valid.float()
    return (per_row * weight).sum() / weight.sum().clamp_min(1)  # no valid row at all: 0, not NaN


def club_upper_bound(
    mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, perm: torch.Tensor
) -> torch.Tensor:
    """CLUBSample estimate: 1/2 * mean_r sum_d [(x[perm[r]] - mu_r)^2 - (x_r - mu_r)^2] / exp(logvar_r).

    In nats per pair (the sum over d of log q(x_r|z_r) - log q(x_perm(r)|z_r)): an upper bound on
    I(x; z) when q fits p(x|z), so a well-fitted estimate is not below 0 on average."""
    mu, logvar, x = mu.float(), logvar.float(), x.float()
    positive = (x - mu).pow(2)
    negative = (x[perm] - mu).pow(2)
    return 0.5 * ((negative - positive) / logvar.exp()).sum(dim=1).mean()


def club_closed_form(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CLUB's estimate with every row as a negative, exactly, in O(N·D) (not O(N²·D)):
    1/2 * mean_i sum_d [mean_j (x_jd - mu_id)^2 - (x_id - mu_id)^2] / exp(logvar_id).

    For a diagonal Gaussian q, mean_j (x_jd - mu_id)^2 = (xbar_d - mu_id)^2 + s2_d with xbar, s2 the
    mean and (population) variance of x over the rows, so no permutation is drawn: this is the CLUB
    authors' ``CLUB.forward`` (j runs over all rows, i included) without its N x N tensor. Rows
    with ``weight`` 0 (padding) are neither anchors nor negatives; all padding gives 0."""
    mu, logvar, x = mu.float(), logvar.float(), x.float()
    w = weight.float()[:, None]
    count = w.sum().clamp_min(1)
    mean = (x * w).sum(0) / count
    var = ((x - mean) ** 2 * w).sum(0) / count
    per_row = (((mean - mu).pow(2) + var - (x - mu).pow(2)) / logvar.exp()).sum(dim=1)
    return 0.5 * (per_row * w[:, 0]).sum() / count


def gaussian_nll(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL of x under q(x|z), up to constants: mean_r sum_d [(x - mu)^2 / exp(logvar) + logvar].

    That is 2 x (the NLL in nats) - D log(2 pi): CLUB's training objective for q as its authors write it."""
    mu, logvar, x = mu.float(), logvar.float(), x.float()
    return ((x - mu).pow(2) / logvar.exp() + logvar).sum(dim=1).mean()


def valid_permutation(valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation that maps valid rows onto valid rows (and padding onto padding).

    CLUBSample pairs each z with the x of a random other row; a padding row's x repeats a real
    image, so it must not serve as a negative. Two independent random orders that put the valid rows
    first, matched position by position, give a uniform permutation of the valid rows without
    reading their number on the host (no device synchronisation)."""
    rows = valid.shape[0]
    last = (~valid.bool()).float() * 2.0  # after every valid row's key in [0, 1)
    first = torch.argsort(torch.rand(rows, generator=generator, device=valid.device) + last)
    second = torch.argsort(torch.rand(rows, generator=generator, device=valid.device) + last)
    perm = torch.empty_like(first)
    perm[first] = second
    return perm

