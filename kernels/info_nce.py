"""Multi-positive InfoNCE, flash-style: the R x R similarity matrix never exists in memory.

Same definition as :func:`mimae_scale.losses.info_nce`: rows L2-normalised, logits z_r.z_c / tau,
softmax over every row but r, positives = the other K-1 views of r's image (rows image-major).

Forward: one program per block of anchor rows streams column tiles, keeps an online log-sum-exp
and the positive-logit sum, and stores lse (R floats). Backward: with
G_rc = (P_rc - Y_rc) / (R tau) (P the softmax, Y the positive indicator / (K-1)), the gradient of
the normalised rows is dzn = (G + G^T) zn. S is symmetric, so P_cr = exp(S_rc - lse_c): a program
recomputes its tiles of S, forms both terms from the saved lse, and accumulates (G + G^T) zn for
its own rows only. No atomics, no R x R buffer, each gradient row written by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc, tuning

NORM_EPS = tl.constexpr(1e-12)  # F.normalize's default
MAX_DIM = 1024  # a program keeps whole rows (normalisation and its backward need them) in registers


@triton.jit
def _unit_rows(z_ptr, rows, R, D, BLOCK_D: tl.constexpr):
    """Rows of z in float32, L2-normalised as F.normalize (x / max(|x|, eps)), and their norms."""
    d = tl.arange(0, BLOCK_D)
    ok = (rows < R)[:, None] & (d < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    return z / tl.maximum(norm, NORM_EPS)[:, None], norm


@triton.jit
def _info_nce_fwd(
    z_ptr, valid_ptr, lse_ptr, loss_ptr,
    R, D, K, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < R
    rows_valid = tl.load(valid_ptr + rows, mask=row_ok, other=0.0) != 0.0
    anchors, _anchor_norms = _unit_rows(z_ptr, rows, R, D, BLOCK_D)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    positive_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, R, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        others, _other_norms = _unit_rows(z_ptr, cols, R, D, BLOCK_D)  # own names: loop-carried types must not change
        cols_valid = tl.load(valid_ptr + cols, mask=cols < R, other=0.0) != 0.0
        s = tl.dot(anchors, tl.trans(others), input_precision=PRECISION) * inv_tau
        valid = cols_valid[None, :] & (rows[:, None] != cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a tile with no valid column
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        running_max = new_max
        positive = valid & ((rows // K)[:, None] == (cols // K)[None, :])
        positive_sum += tl.sum(tl.where(positive, s, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(rows_valid, lse - positive_sum / (K - 1), 0.0), mask=row_ok)


@triton.jit
def _info_nce_bwd(
    z_ptr, valid_ptr, lse_ptr, scale_ptr, dz_ptr,
    R, D, K, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < R
    rows_valid = tl.load(valid_ptr + rows, mask=row_ok, other=0.0) != 0.0
    anchors, norms = _unit_rows(z_ptr, rows, R, D, BLOCK_D)
    lse_rows = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, R, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        others, _other_norms = _unit_rows(z_ptr, cols, R, D, BLOCK_D)  # own names: loop-carried types must not change
        lse_cols = tl.load(lse_ptr + cols, mask=cols < R, other=0.0)
        cols_valid = tl.load(valid_ptr + cols, mask=cols < R, other=0.0) != 0.0
        s = tl.dot(anchors, tl.trans(others), input_precision=PRECISION) * inv_tau
        # only pairs of two valid rows carry gradient: a padding row is no anchor and in no softmax
        valid = rows_valid[:, None] & cols_valid[None, :] & (rows[:, None] != cols[None, :])
        positive = valid & ((rows // K)[:, None] == (cols // K)[None, :])
        # softmax of anchor r at c, plus softmax of anchor c at r (S symmetric), minus 2 Y
        both = tl.exp(s - lse_rows[:, None]) + tl.exp(s - lse_cols[None, :])
        g = tl.where(valid, both, 0.0) - tl.where(positive, 2.0 / (K - 1), 0.0)
        acc += tl.dot(g, others, input_precision=PRECISION)
    dzn = acc * (tl.load(scale_ptr) * inv_tau)  # scale: the loss's gradient / number of valid rows
    # back through x / max(|x|, eps): remove the radial part, divide by the norm
    radial = tl.where(norms > NORM_EPS, tl.sum(anchors * dzn, axis=1), 0.0)
    dz = (dzn - anchors * radial[:, None]) / tl.maximum(norms, NORM_EPS)[:, None]
    d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d < D)[None, :]
    tl.store(dz_ptr + rows[:, None] * D + d[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


@tuning.heuristic("info_nce_fwd")
def _info_nce_fwd_launch(rows: int, dim: int, dtype: torch.dtype) -> tuning.Launch:
    block_d = tuning.pow2(dim, lo=16)  # tl.dot needs every tile side >= 16
    block_m = tuning.pow2(rows, lo=16, hi=64 if block_d <= 256 else 32)
    while block_m > 16 and triton.cdiv(rows, block_m) < tuning.SMS:  # one program per row block: fill the SMs
        block_m //= 2
    block_n = tuning.pow2(rows, lo=16, hi=64 if block_d <= 128 else 32)
    # float32 inputs keep IEEE float32 products; bf16/fp16 inputs carry less precision than TF32.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "PRECISION": precision}
    return tuning.Launch(meta=meta, num_warps=8 if block_m * block_d >= 8192 else 4, num_stages=2)


@tuning.heuristic("info_nce_bwd")
def _info_nce_bwd_launch(rows: int, dim: int, dtype: torch.dtype) -> tuning.Launch:
    """The backward also holds a (BLOCK_M, D) float32 accumulator: half the forward's rows at
    D > 128 (ptxas at D = 256: 64 rows spill, 32 do not; python -m mimae_scale.kernels.aot_check)."""
    forward = _info_nce_fwd_launch(rows, dim, dtype)
    block_m = min(forward.meta["BLOCK_M"], 64 if forward.meta["BLOCK_D"] <= 128 else 32)
    meta = {**forward.meta, "BLOCK_M": block_m}
    return tuning.Launch(meta=meta, num_warps=8 if block_m * forward.meta["BLOCK_D"] >= 8192 else 4, num_stages=2)


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, valid, num_masks, tau):
        rows, dim = z.shape
        cfg = tuning.launch("info_nce_fwd", rows=rows, dim=dim, dtype=z.dtype)
        lse = _alloc.empty((rows,), torch.float32, z.device)
        per_row = _alloc.empty((rows,), torch.float32, z.device)
        grid = (triton.cdiv(rows, cfg.meta["BLOCK_M"]),)
        _info_nce_fwd[grid](
            z, valid, lse, per_row, rows, dim, num_masks, 1.0 / tau,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        count = valid.sum().clamp_min(1)  # no valid row at all: loss 0, not NaN
        ctx.save_for_backward(z, valid, lse, count)
        ctx.num_masks, ctx.tau = num_masks, tau
        return per_row.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        z, valid, lse, count = ctx.saved_tensors
        rows, dim = z.shape
        cfg = tuning.launch("info_nce_bwd", rows=rows, dim=dim, dtype=z.dtype)
        dz = _alloc.empty((rows, dim), z.dtype, z.device)
        grid = (triton.cdiv(rows, cfg.meta["BLOCK_M"]),)
        scale = (grad_loss.float() / count).reshape(1).contiguous()
        _info_nce_bwd[grid](
            z, valid, lse, scale, dz, rows, dim, ctx.num_masks, 1.0 / ctx.tau,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        return dz, None, None, None


def info_nce(z: torch.Tensor, num_masks: int, tau: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE over image-major views z (B*K, D), unnormalised; float32 scalar.

    For anchor r the positives are the other K-1 views of its image; the softmax runs over every
    row but r. loss_r = -(1/(K-1)) * sum_p log softmax_r(p); returns the mean over rows.
    ``valid`` (R,) marks the rows that take part: others are neither anchors nor in any softmax.
    """
    if z.dim() != 2:
        raise ValueError(f"info_nce: z must be (B*K, D), got {tuple(z.shape)}")
    rows, dim = z.shape
    if num_masks < 2 or rows % num_masks:
        raise ValueError(f"info_nce needs K >= 2 dividing the rows, got K={num_masks}, R={rows}")
    if dim > MAX_DIM:
        raise ValueError(f"info_nce kernel keeps whole rows in registers: D must be <= {MAX_DIM}, got {dim}")
    weight = torch.ones(rows, device=z.device) if valid is None else valid.float().contiguous()
    return _InfoNCE.apply(z.contiguous(), weight, num_masks, float(tau))
