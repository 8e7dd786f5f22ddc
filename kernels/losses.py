"""Fused row-wise loss terms: normalised-pixel MSE, CLUB's upper bound, the Gaussian NLL.

Same definitions as :mod:`mimae_scale.losses`, computed in float32 whatever the input dtype. Each
forward is one pass that reads its inputs once and writes one float32 partial sum per program;
the partials are reduced in a fixed order, so results are deterministic. Each backward recomputes
what it needs from the saved inputs (no intermediate the size of the inputs is kept) and writes
every gradient element once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc, tuning

PATCH_NORM_EPS = 1e-6  # as mimae_scale.losses (MAE's norm_pix_loss)

# --------------------------------------------------------------------------------------------
# norm_pix_mse(pred, target, mask): mean over rows of (sum_n mask * mean_p (pred - norm(target))^2) / sum_n mask


@triton.jit
def _normalised_error(pred_ptr, target_ptr, offsets, ok, P, eps):
    """Per patch: pred - normalised target (0 outside ok), target - mean, 1 / std (unbiased var)."""
    x = tl.load(pred_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    centred = tl.where(ok, t - (tl.sum(t, axis=1) / P)[:, None], 0.0)
    inv_std = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / (P - 1) + eps)
    error = tl.where(ok, x - centred * inv_std[:, None], 0.0)
    return error, centred, inv_std


@triton.jit
def _norm_pix_mse_fwd(
    pred_ptr, target_ptr, mask_ptr, error_partial_ptr, weight_partial_ptr,
    N, P, patches_per_split, eps,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    first = split * patches_per_split
    last = tl.minimum(first + patches_per_split, N)
    error_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    weight_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(first, last, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < last
        w = tl.load(mask_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
        # Visible patches (weight 0) are never read: the loss needs only the hidden ones' bytes.
        ok = (n_ok & (w != 0.0))[:, None] & (p < P)[None, :]
        error, _, _ = _normalised_error(pred_ptr, target_ptr, (row * N + n)[:, None] * P + p[None, :], ok, P, eps)
        error_acc += w * tl.sum(error * error, axis=1) / P
        weight_acc += w
    slot = row * tl.num_programs(1) + split
    tl.store(error_partial_ptr + slot, tl.sum(error_acc, axis=0))
    tl.store(weight_partial_ptr + slot, tl.sum(weight_acc, axis=0))


@triton.jit
def _norm_pix_mse_bwd(
    pred_ptr, target_ptr, mask_ptr, row_weight_ptr, grad_ptr, dpred_ptr, dtarget_ptr,
    R, N, P, patches_per_split, eps,
    WRITE_PRED: tl.constexpr, WRITE_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    first = split * patches_per_split
    last = tl.minimum(first + patches_per_split, N)
    scale = tl.load(grad_ptr) / R / tl.load(row_weight_ptr + row)
    for start in range(first, last, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < last
        w = tl.load(mask_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
        inside = n_ok[:, None] & (p < P)[None, :]
        ok = inside & (w != 0.0)[:, None]
        offsets = (row * N + n)[:, None] * P + p[None, :]
        error, centred, inv_std = _normalised_error(pred_ptr, target_ptr, offsets, ok, P, eps)
        dpred = (2.0 * scale / P * w)[:, None] * error  # 0 on visible patches: they are written too
        if WRITE_PRED:
            tl.store(dpred_ptr + offsets, dpred.to(dpred_ptr.dtype.element_ty), mask=inside)
        if WRITE_TARGET:
            # through t -> (t - mean) / sqrt(var + eps) with the unbiased variance
            g = -dpred
            g_mean = tl.sum(g, axis=1) / P
            g_dot = tl.sum(g * centred, axis=1)
            dt = inv_std[:, None] * (g - g_mean[:, None] - centred * (g_dot * inv_std * inv_std / (P - 1))[:, None])
            tl.store(dtarget_ptr + offsets, tl.where(ok, dt, 0.0).to(dtarget_ptr.dtype.element_ty), mask=inside)


@tuning.heuristic("norm_pix_mse")
def _norm_pix_mse_launch(rows: int, patches: int, pixels: int) -> tuning.Launch:
    block_p = tuning.pow2(pixels, lo=2)
    block_n = min(tuning.pow2(patches), max(1, tuning.TILE_ELEMENTS // block_p))
    # one program per row has ~R programs (512 for ViT-L); split the patches for more parallelism
    split = max(1, min(triton.cdiv(patches, block_n), tuning.TARGET_PROGRAMS // max(rows, 1)))
    meta = {"BLOCK_N": block_n, "BLOCK_P": block_p}
    return tuning.Launch(meta=meta, num_warps=8 if block_n * block_p >= 8192 else 4, split=split)


def _patch_split(cfg: tuning.Launch, patches: int) -> tuple[int, int]:
    """(patches per program, programs per row) for a launch's split."""
    per_split = triton.cdiv(patches, cfg.split)
    return per_split, triton.cdiv(patches, per_split)


class _NormPixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask):
        rows, patches, pixels = pred.shape
        cfg = tuning.launch("norm_pix_mse", rows=rows, patches=patches, pixels=pixels)
        per_split, splits = _patch_split(cfg, patches)
        error_partial = _alloc.empty((rows, splits), torch.float32, pred.device)
        weight_partial = _alloc.empty((rows, splits), torch.float32, pred.device)
        _norm_pix_mse_fwd[(rows, splits)](
            pred, target, mask, error_partial, weight_partial, patches, pixels, per_split, PATCH_NORM_EPS,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        row_weight = weight_partial.sum(dim=1)
        ctx.save_for_backward(pred, target, mask, row_weight)
        return (error_partial.sum(dim=1) / row_weight).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        pred, target, mask, row_weight = ctx.saved_tensors
        want_pred, want_target, _ = ctx.needs_input_grad
        rows, patches, pixels = pred.shape
        cfg = tuning.launch("norm_pix_mse", rows=rows, patches=patches, pixels=pixels)
        per_split, splits = _patch_split(cfg, patches)
        dpred = _alloc.empty(pred.shape, pred.dtype, pred.device) if want_pred else None
        dtarget = _alloc.empty(target.shape, target.dtype, target.device) if want_target else None
        _norm_pix_mse_bwd[(rows, splits)](
            pred, target, mask, row_weight, grad_loss.float().contiguous(), dpred, dtarget,
            rows, patches, pixels, per_split, PATCH_NORM_EPS,
            WRITE_PRED=want_pred, WRITE_TARGET=want_target,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        return dpred, dtarget, None


def norm_pix_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE against per-patch normalised targets over the hidden patches (mask == 1).

    pred, target (R, N, P); mask (R, N) weights (0 = visible). Averaged over the hidden patches of
    each row, then over rows. Patches with weight 0 are not read (a NaN there does not propagate,
    unlike the reference's ``0 * NaN``). The mask gets no gradient.
    """
    if pred.dim() != 3 or target.shape != pred.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"norm_pix_mse: pred and target must be (R, N, P) and mask (R, N), got "
            f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}"
        )
    if pred.shape[2] < 2:
        raise ValueError(f"norm_pix_mse: patches need P >= 2 pixels for an unbiased variance, got {pred.shape[2]}")
    return _NormPixMSE.apply(pred.contiguous(), target.contiguous(), mask.detach().float().contiguous())


# --------------------------------------------------------------------------------------------
# club_upper_bound and gaussian_nll: row-wise terms of q(x | z) = N(mu, exp(logvar))


@triton.jit
def _gaussian_tile(mu_ptr, logvar_ptr, x_ptr, offsets, ok):
    """One (rows x columns) tile of mu, logvar, x in float32 (0 outside ok), and 1 / var."""
    mu = tl.load(mu_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    return mu, logvar, x, tl.exp(-logvar)


@triton.jit
def _gaussian_fwd(
    mu_ptr, logvar_ptr, x_ptr, perm_ptr, partial_ptr,
    M, X,
    CLUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """CLUB: sum (x[perm] - mu)^2 / var - (x - mu)^2 / var; else: sum (x - mu)^2 / var + logvar."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    if CLUB:
        partner = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_X], dtype=tl.float32)
    for start in range(0, X, BLOCK_X):
        c = start + tl.arange(0, BLOCK_X)
        ok = row_ok[:, None] & (c < X)[None, :]
        offsets = rows[:, None] * X + c[None, :]
        mu, logvar, x, precision = _gaussian_tile(mu_ptr, logvar_ptr, x_ptr, offsets, ok)
        if CLUB:
            x_other = tl.load(x_ptr + partner[:, None] * X + c[None, :], mask=ok, other=0.0).to(tl.float32)
            term = ((x_other - mu) * (x_other - mu) - (x - mu) * (x - mu)) * precision
        else:
            term = (x - mu) * (x - mu) * precision + logvar
        acc += tl.where(ok, term, 0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _gaussian_bwd(
    mu_ptr, logvar_ptr, x_ptr, perm_ptr, perm_inv_ptr, grad_ptr, dmu_ptr, dlogvar_ptr, dx_ptr,
    M, X,
    CLUB: tl.constexpr, WRITE_MU: tl.constexpr, WRITE_LOGVAR: tl.constexpr, WRITE_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    scale = tl.load(grad_ptr) / M
    if CLUB:
        partner = tl.load(perm_ptr + rows, mask=row_ok, other=0)
        if WRITE_X:
            # x_r is also the negative of row perm_inv[r]
            source = tl.load(perm_inv_ptr + rows, mask=row_ok, other=0)
    for start in range(0, X, BLOCK_X):
        c = start + tl.arange(0, BLOCK_X)
        ok = row_ok[:, None] & (c < X)[None, :]
        offsets = rows[:, None] * X + c[None, :]
        mu, _, x, precision = _gaussian_tile(mu_ptr, logvar_ptr, x_ptr, offsets, ok)
        if CLUB:  # loss = 1/2 mean_r sum [(x[perm] - mu)^2 - (x - mu)^2] * precision
            x_other = tl.load(x_ptr + partner[:, None] * X + c[None, :], mask=ok, other=0.0).to(tl.float32)
            dmu = scale * precision * (x - x_other)
            dlogvar = -0.5 * scale * precision * ((x_other - mu) * (x_other - mu) - (x - mu) * (x - mu))
            if WRITE_X:
                src = source[:, None] * X + c[None, :]
                mu_src = tl.load(mu_ptr + src, mask=ok, other=0.0).to(tl.float32)
                logvar_src = tl.load(logvar_ptr + src, mask=ok, other=0.0).to(tl.float32)
                dx = scale * (tl.exp(-logvar_src) * (x - mu_src) - precision * (x - mu))
        else:  # loss = mean_r sum (x - mu)^2 * precision + logvar
            dmu = -2.0 * scale * precision * (x - mu)
            dlogvar = scale * (1.0 - (x - mu) * (x - mu) * precision)
            dx = -dmu
        if WRITE_MU:
            tl.store(dmu_ptr + offsets, dmu.to(dmu_ptr.dtype.element_ty), mask=ok)
        if WRITE_LOGVAR:
            tl.store(dlogvar_ptr + offsets, dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=ok)
        if WRITE_X:
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@tuning.heuristic("gaussian_terms")
def _gaussian_launch(rows: int, dim: int) -> tuning.Launch:
    block_x = tuning.pow2(dim, hi=1024)
    block_m = min(tuning.pow2(rows), max(1, 4096 // block_x))
    return tuning.Launch(meta={"BLOCK_M": block_m, "BLOCK_X": block_x}, num_warps=4)


def _check_gaussian_inputs(name: str, mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor) -> None:
    if mu.dim() != 2 or logvar.shape != mu.shape or x.shape != mu.shape:
        raise ValueError(
            f"{name}: mu, logvar and x must all be (M, X), got "
            f"{tuple(mu.shape)}, {tuple(logvar.shape)}, {tuple(x.shape)}"
        )


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    counts = torch.zeros_like(perm).scatter_add_(0, perm, torch.ones_like(perm))
    # Device-side check (no host sync): x's gradient assumes perm pairs every row with exactly one.
    torch._assert_async((counts == 1).all(), "club_upper_bound: perm must be a permutation to differentiate x")
    return inverse


class _GaussianTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, x, perm):
        rows, dim = mu.shape
        club = perm is not None
        cfg = tuning.launch("gaussian_terms", rows=rows, dim=dim)
        programs = triton.cdiv(rows, cfg.meta["BLOCK_M"])
        partial = _alloc.empty((programs,), torch.float32, mu.device)
        _gaussian_fwd[(programs,)](
            mu, logvar, x, perm, partial, rows, dim, CLUB=club,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        ctx.save_for_backward(mu, logvar, x, perm)
        return partial.sum() / rows * (0.5 if club else 1.0)

    @staticmethod
    def backward(ctx, grad_loss):
        mu, logvar, x, perm = ctx.saved_tensors
        want_mu, want_logvar, want_x, _ = ctx.needs_input_grad
        rows, dim = mu.shape
        club = perm is not None
        perm_inv = _inverse_permutation(perm) if club and want_x else None
        cfg = tuning.launch("gaussian_terms", rows=rows, dim=dim)
        programs = triton.cdiv(rows, cfg.meta["BLOCK_M"])
        dmu = _alloc.empty(mu.shape, mu.dtype, mu.device) if want_mu else None
        dlogvar = _alloc.empty(logvar.shape, logvar.dtype, logvar.device) if want_logvar else None
        dx = _alloc.empty(x.shape, x.dtype, x.device) if want_x else None
        _gaussian_bwd[(programs,)](
            mu, logvar, x, perm, perm_inv, grad_loss.float().contiguous(), dmu, dlogvar, dx, rows, dim,
            CLUB=club, WRITE_MU=want_mu, WRITE_LOGVAR=want_logvar, WRITE_X=want_x,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        return dmu, dlogvar, dx, None


def club_upper_bound(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """CLUBSample bound: 1/2 * mean_r sum_d [(x[perm[r]] - mu_r)^2 - (x_r - mu_r)^2] / exp(logvar_r).

    perm (M,) indexes rows of x; to differentiate x it must be a permutation (checked on device).
    """
    _check_gaussian_inputs("club_upper_bound", mu, logvar, x)
    if perm.shape != (mu.shape[0],):
        raise ValueError(f"club_upper_bound: perm must be ({mu.shape[0]},), got {tuple(perm.shape)}")
    return _GaussianTerm.apply(mu.contiguous(), logvar.contiguous(), x.contiguous(), perm.long().contiguous())


def gaussian_nll(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL of x under q(x|z), up to constants: mean_r sum_d [(x - mu)^2 / exp(logvar) + logvar]."""
    _check_gaussian_inputs("gaussian_nll", mu, logvar, x)
    return _GaussianTerm.apply(mu.contiguous(), logvar.contiguous(), x.contiguous(), None)
