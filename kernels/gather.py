"""Fused masked-token gather (encoder input) and unshuffle with mask tokens (decoder input).

Same semantics as :func:`mimae_scale.masking.gather_visible` and
:func:`mimae_scale.masking.unshuffle_with_mask_tokens`. Every kernel reads and writes whole
D-contiguous rows (coalesced, vectorised), adds in float32 and rounds once to the output dtype.
The backward passes use no atomics: each output element is written by exactly one program and
cross-program sums go through a partial-sum buffer reduced in a fixed order, so gradients are
bitwise deterministic. docs/KERNELS.md has the byte floors and the design.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc, tuning

# --------------------------------------------------------------------------------------------
# gather_visible: (B, N, D) tokens -> (B*K, L, D), row r = tokens[r // K, ids_keep[r]] + pos[ids_keep[r]]


@triton.jit
def _gather_visible_fwd(
    tokens_ptr, ids_keep_ptr, pos_ptr, out_ptr,
    num_rows, L, N, D, K,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # t: flat index of an output token (row r = t // L of the B*K rows, slot t % L)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < num_rows * L
    ok = t_ok[:, None] & (d < D)[None, :]
    patch = tl.load(ids_keep_ptr + t, mask=t_ok, other=0)
    image = t // L // K
    x = tl.load(tokens_ptr + (image * N + patch)[:, None] * D + d[None, :], mask=ok, other=0.0)
    p = tl.load(pos_ptr + patch[:, None] * D + d[None, :], mask=ok, other=0.0)
    y = x.to(tl.float32) + p.to(tl.float32)
    tl.store(out_ptr + t[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_visible_bwd(
    grad_out_ptr, slot_ptr, grad_tokens_ptr,
    num_tokens, N, D, K, L,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Parallel over the token gradient's rows: a program owns BLOCK_T (image, patch) rows x BLOCK_D
    # columns, and a row's gradient is the sum of the at most K gathered rows it was copied to, so
    # each element is written by exactly one program with no atomics and no loop over images.
    # slot[r, n] = where patch n sits among row r's visible tokens, -1 when hidden.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat b*N + n; int64 offsets
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < num_tokens
    ok = t_ok[:, None] & (d < D)[None, :]
    b = t // N
    n = t % N
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        row = b * K + k
        j = tl.load(slot_ptr + row * N + n, mask=t_ok, other=-1).to(tl.int64)
        seen = ok & (j >= 0)[:, None]
        g = tl.load(grad_out_ptr + (row * L + j)[:, None] * D + d[None, :], mask=seen, other=0.0)
        acc += g.to(tl.float32)
    tl.store(grad_tokens_ptr + t[:, None] * D + d[None, :], acc.to(grad_tokens_ptr.dtype.element_ty), mask=ok)


@tuning.heuristic("gather_visible_fwd")
def _gather_fwd_launch(tokens: int, dim: int) -> tuning.Launch:
    block_d = tuning.pow2(dim, hi=1024)
    block_t = min(tuning.pow2(tokens), max(1, tuning.TILE_ELEMENTS // block_d))
    return tuning.Launch(meta={"BLOCK_T": block_t, "BLOCK_D": block_d}, num_warps=8 if block_t * block_d >= 8192 else 4)


@tuning.heuristic("gather_visible_bwd")
def _gather_bwd_launch(tokens: int, dim: int) -> tuning.Launch:
    """Same tiling as the forward, over the B*N rows of the token gradient."""
    return _gather_fwd_launch(tokens=tokens, dim=dim)


def _visible_slots(ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """slot[r, n] = j where ids_keep[r, j] == n, else -1 (int32, (R, N)): the inverse index."""
    rows, keep = ids_keep.shape
    slot = torch.full((rows, num_patches), -1, dtype=torch.int32, device=ids_keep.device)
    slot.scatter_(1, ids_keep, torch.arange(keep, dtype=torch.int32, device=ids_keep.device).expand(rows, keep))
    # Device-side check (no host sync): a repeated id would lose its gradient in the backward.
    torch._assert_async(((slot >= 0).sum(dim=1) == keep).all(), "gather_visible: ids_keep rows must be distinct")
    return slot


class _GatherVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, ids_keep, pos_embed, num_masks):
        batch, num_patches, dim = tokens.shape
        rows, keep = ids_keep.shape
        out = _alloc.empty((rows, keep, dim), tokens.dtype, tokens.device)
        cfg = tuning.launch("gather_visible_fwd", tokens=rows * keep, dim=dim)
        grid = (triton.cdiv(rows * keep, cfg.meta["BLOCK_T"]), triton.cdiv(dim, cfg.meta["BLOCK_D"]))
        _gather_visible_fwd[grid](
            tokens, ids_keep, pos_embed, out, rows, keep, num_patches, dim, num_masks,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        ctx.save_for_backward(ids_keep)
        ctx.shape = (batch, num_patches, dim, num_masks)
        ctx.dtypes = (tokens.dtype, pos_embed.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        batch, num_patches, dim, num_masks = ctx.shape
        want_tokens, _, want_pos, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        device = grad_out.device
        slot = _visible_slots(ids_keep, num_patches)
        # A learned pos_embed (the model's is a fixed buffer) sums the token gradient over images: kept
        # in float32 for that sum, so a bf16 token gradient is rounded once, after it.
        dtype = torch.float32 if want_pos else ctx.dtypes[0]
        grad = _alloc.empty((batch, num_patches, dim), dtype, device)
        cfg = tuning.launch("gather_visible_bwd", tokens=batch * num_patches, dim=dim)
        grid = (triton.cdiv(batch * num_patches, cfg.meta["BLOCK_T"]), triton.cdiv(dim, cfg.meta["BLOCK_D"]))
        _gather_visible_bwd[grid](
            grad_out, slot, grad, batch * num_patches, num_patches, dim, num_masks, ids_keep.shape[1],
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        grad_pos = grad.sum(dim=0).to(ctx.dtypes[1]) if want_pos else None
        grad_tokens = grad.to(ctx.dtypes[0]) if want_tokens else None
        return grad_tokens, None, grad_pos, None


def gather_visible(
    tokens: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor, num_masks: int
) -> torch.Tensor:
    """(B, N, D) tokens -> (B*K, L, D): row r = tokens[r // K, ids_keep[r]] + pos_embed[ids_keep[r]].

    One pass over the visible tokens; the backward sums the K rows of each image into tokens'
    gradient and all rows into pos_embed's. ids_keep rows must hold distinct ids in [0, N) (every
    mask does), checked on the device in the backward.
    """
    batch, num_patches, dim = tokens.shape
    rows = ids_keep.shape[0]
    if ids_keep.dim() != 2 or rows != batch * num_masks:
        raise ValueError(
            f"gather_visible: ids_keep must be (B*K, L) = ({batch * num_masks}, L), got {tuple(ids_keep.shape)}"
        )
    if pos_embed.shape != (num_patches, dim):
        raise ValueError(
            f"gather_visible: pos_embed must be (N, D) = ({num_patches}, {dim}), got {tuple(pos_embed.shape)}"
        )
    return _GatherVisible.apply(tokens.contiguous(), ids_keep.long().contiguous(), pos_embed.contiguous(), num_masks)


# --------------------------------------------------------------------------------------------
# unshuffle_with_mask_tokens: (R, 1+L, D) latent -> (R, 1+N, D) decoder input


@triton.jit
def _token_source(t, t_ok, ids_restore_ptr, N, L):
    """For flat output tokens t of (R, 1+N): position q in the row (0 for cls, 1+p for patch p),
    the latent token it comes from (flat index into (R, 1+L)) and whether it comes from the latent
    at all (cls and visible patches) rather than being the mask token."""
    row = t // (N + 1)
    q = t % (N + 1)
    is_patch = q > 0
    j = tl.load(ids_restore_ptr + row * N + q - 1, mask=t_ok & is_patch, other=0)
    src = row * (L + 1) + tl.where(is_patch, j + 1, 0)
    return q, src, (q == 0) | (j < L)


@triton.jit
def _unshuffle_fwd(
    latent_ptr, ids_restore_ptr, mask_token_ptr, pos_ptr, out_ptr,
    num_rows, N, L, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # t: flat output token of (R, 1+N)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < num_rows * (N + 1)
    d_ok = d < D
    ok = t_ok[:, None] & d_ok[None, :]
    q, src, from_latent = _token_source(t, t_ok, ids_restore_ptr, N, L)
    x = tl.load(latent_ptr + src[:, None] * D + d[None, :], mask=ok & from_latent[:, None], other=0.0)
    mask_token = tl.load(mask_token_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    p = tl.load(pos_ptr + q[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.where(from_latent[:, None], x.to(tl.float32), mask_token[None, :]) + p
    tl.store(out_ptr + t[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unshuffle_bwd(
    grad_out_ptr, ids_restore_ptr, grad_latent_ptr, grad_mask_partial_ptr,
    num_rows, N, L, D, tiles_per_program,
    WRITE_LATENT: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Each output token's gradient goes to exactly one place: its latent row (cls and visible
    # patches; ids_restore is a permutation, so every latent row is hit once) or the mask token,
    # whose sum is kept per program and reduced afterwards in a fixed order.
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    num_tokens = num_rows * (N + 1)
    mask_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offsets = tl.arange(0, BLOCK_T).to(tl.int64)  # int64: R*(1+N)*D can overflow int32
    first = tl.program_id(0) * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        t = tile * BLOCK_T + offsets
        t_ok = t < num_tokens
        ok = t_ok[:, None] & d_ok[None, :]
        _, src, from_latent = _token_source(t, t_ok, ids_restore_ptr, N, L)
        g = tl.load(grad_out_ptr + t[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        if WRITE_LATENT:
            tl.store(
                grad_latent_ptr + src[:, None] * D + d[None, :],
                g.to(grad_latent_ptr.dtype.element_ty),
                mask=ok & from_latent[:, None],
            )
        mask_acc += tl.sum(tl.where(from_latent[:, None], 0.0, g), axis=0)
    if WRITE_MASK:
        tl.store(grad_mask_partial_ptr + tl.program_id(0).to(tl.int64) * D + d, mask_acc, mask=d_ok)


@tuning.heuristic("unshuffle_fwd")
def _unshuffle_fwd_launch(tokens: int, dim: int) -> tuning.Launch:
    return _gather_fwd_launch(tokens=tokens, dim=dim)


@tuning.heuristic("unshuffle_bwd")
def _unshuffle_bwd_launch(tokens: int, dim: int) -> tuning.Launch:
    """split = programs along the tokens; each loops over tiles, so the mask-token partials stay few."""
    base = _gather_fwd_launch(tokens=tokens, dim=dim)
    tiles = triton.cdiv(tokens, base.meta["BLOCK_T"])
    column_blocks = triton.cdiv(dim, base.meta["BLOCK_D"])
    split = max(1, min(tiles, 2 * tuning.TARGET_PROGRAMS // column_blocks))
    return tuning.Launch(meta=base.meta, num_warps=base.num_warps, split=split)


def _check_permutations(ids_restore: torch.Tensor) -> None:
    """Device-side check (no host sync) that every row of ids_restore is a permutation of [0, N)."""
    counts = torch.zeros(ids_restore.shape, dtype=torch.int32, device=ids_restore.device)
    counts.scatter_add_(1, ids_restore, torch.ones_like(counts))
    message = "unshuffle_with_mask_tokens: ids_restore rows must be permutations of [0, N)"
    torch._assert_async((counts == 1).all(), message)


class _Unshuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latent, ids_restore, mask_token, pos_embed):
        rows, seq, dim = latent.shape
        num_patches = ids_restore.shape[1]
        _check_permutations(ids_restore)
        out = _alloc.empty((rows, num_patches + 1, dim), latent.dtype, latent.device)
        cfg = tuning.launch("unshuffle_fwd", tokens=rows * (num_patches + 1), dim=dim)
        grid = (triton.cdiv(rows * (num_patches + 1), cfg.meta["BLOCK_T"]), triton.cdiv(dim, cfg.meta["BLOCK_D"]))
        _unshuffle_fwd[grid](
            latent, ids_restore, mask_token, pos_embed, out, rows, num_patches, seq - 1, dim,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        # The mask token is not saved: under ZeRO-3 a parameter's storage is released after the
        # forward, and the backward needs only its shape and dtype.
        ctx.save_for_backward(ids_restore)
        ctx.shape = (rows, seq, dim)
        ctx.dtypes = (latent.dtype, mask_token.dtype, pos_embed.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        rows, seq, dim = ctx.shape
        num_patches = ids_restore.shape[1]
        want_latent, _, want_mask, want_pos = ctx.needs_input_grad
        device = grad_out.device
        tokens = rows * (num_patches + 1)
        cfg = tuning.launch("unshuffle_bwd", tokens=tokens, dim=dim)
        tiles = triton.cdiv(tokens, cfg.meta["BLOCK_T"])
        tiles_per_program = triton.cdiv(tiles, cfg.split)
        programs = triton.cdiv(tiles, tiles_per_program)
        grad_latent = _alloc.empty((rows, seq, dim), ctx.dtypes[0], device) if want_latent else None
        partial = _alloc.empty((programs, dim), torch.float32, device) if want_mask else None
        _unshuffle_bwd[(programs, triton.cdiv(dim, cfg.meta["BLOCK_D"]))](
            grad_out.contiguous(), ids_restore, grad_latent, partial,
            rows, num_patches, seq - 1, dim, tiles_per_program,
            WRITE_LATENT=want_latent, WRITE_MASK=want_mask,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta,
        )
        grad_mask = partial.sum(dim=0).to(ctx.dtypes[1]) if want_mask else None
        # A learned pos_embed (the model's is a fixed buffer) gets the column sum, in plain PyTorch.
        grad_pos = grad_out.float().sum(dim=0).to(ctx.dtypes[2]) if want_pos else None
        return grad_latent, None, grad_mask, grad_pos


def unshuffle_with_mask_tokens(
    latent: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """(R, 1+L, D) latent (cls first) -> (R, 1+N, D) full sequence for the decoder.

    Position p gets the visible latent that belongs there (``latent[1 + ids_restore[p]]`` when
    ``ids_restore[p] < L``) or the mask token, plus pos_embed[1+p]; the cls row gets pos_embed[0].
    The backward flows into latent and mask_token (and pos_embed, should it require a gradient).
    ids_restore rows must be permutations of [0, N), checked on the device.
    """
    rows, seq, dim = latent.shape
    if ids_restore.dim() != 2 or ids_restore.shape[0] != rows or ids_restore.shape[1] < seq - 1:
        raise ValueError(
            f"unshuffle_with_mask_tokens: ids_restore must be (R, N) with R={rows}, N >= L={seq - 1}, "
            f"got {tuple(ids_restore.shape)}"
        )
    num_patches = ids_restore.shape[1]
    if mask_token.numel() != dim or pos_embed.shape != (num_patches + 1, dim):
        raise ValueError(
            f"unshuffle_with_mask_tokens: mask_token must have D={dim} elements and pos_embed be (1+N, D) = "
            f"({num_patches + 1}, {dim}), got {tuple(mask_token.shape)} and {tuple(pos_embed.shape)}"
        )
    return _Unshuffle.apply(
        latent.contiguous(), ids_restore.long().contiguous(), mask_token.reshape(dim).contiguous(),
        pos_embed.contiguous(),
    )
