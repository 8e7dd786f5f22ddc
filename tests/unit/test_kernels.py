"""The Triton kernels (run by Triton's interpreter, TRITON_INTERPRET=1) against float64 math.

Every kernel runs forward and backward on fresh random inputs of several shapes (odd and
non-power-of-two sizes included; some with block sizes forced small so grids have several tiles,
partial edge tiles and split reductions), with float32 and bfloat16 inputs. Every buffer a kernel
writes is allocated as NaN first (``_alloc.poisoned``, autouse fixture below), so an element no
program wrote fails the comparison.

Expected values come from float64: the reference gather/scatter functions of
``mimae_scale.masking`` run on float64 copies, and the losses are written out again below in
float64 (``mimae_scale.losses`` casts to float32, so it cannot serve as a float64 oracle; a test
checks that these oracles agree with it). Gradients are autograd's through the float64 math.

Tolerances, as max |kernel - expected| / max |expected| over the tensor:
- float32 outputs and gradients: 2e-5 (float32 accumulation of at most a few hundred terms);
- bfloat16 outputs and gradients: 8e-3 (one bfloat16 rounding is <= 2^-9 relative; 2 ulps margin);
- losses are float32 scalars whatever the input dtype: 2e-5 relative to the float64 value of the
  same (bf16-rounded) inputs; for the CLUB bound and the Gaussian NLL, whose terms have both signs
  and can cancel, relative to the sum of the terms' absolute values.
"""

from __future__ import annotations

import pytest
import torch
from mimae_scale.kernels import _alloc, gather, tuning

from mimae_scale import kernels, losses, masking

if not kernels.INTERPRETED:  # CPU tensors need the interpreter (make test sets TRITON_INTERPRET=1)
    pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 at import", allow_module_level=True)

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
LOSS_TOL = 2e-5
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison_outputs():
    with _alloc.poisoned():
        yield


@pytest.fixture
def small_tiles():
    """Force tiny blocks (and splits) so small shapes still have several tiles and partial ones."""

    def use(kernel: str, launch: tuning.Launch) -> None:
        tuning.override(kernel, lambda **_: launch)
        installed.append(kernel)

    installed: list[str] = []
    yield use
    for kernel in installed:
        tuning.override(kernel, None)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, scale: float | None = None
) -> None:
    """``scale`` (default max |expected|) is the size that float32 rounding is relative to: a loss
    that is a sum of terms of both signs can be far smaller than its terms (cancellation)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements (unwritten outputs stay NaN)"
    err = (actual.double() - expected.double()).abs().max().item()
    if scale is None:
        scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def grads(out: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor | None = None) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, upstream))


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


# --------------------------------------------------------------------------------------------
# float64 oracles of the loss definitions (mimae_scale.losses, written out again)


def norm_pix_mse_f64(pred, target, mask):
    mean = target.mean(dim=-1, keepdim=True)
    var = ((target - mean) ** 2).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)  # unbiased, as MAE
    per_patch = ((pred - (target - mean) / torch.sqrt(var + 1e-6)) ** 2).mean(dim=-1)
    return ((per_patch * mask).sum(dim=1) / mask.sum(dim=1)).mean()


def info_nce_f64(z, k, tau, valid=None):
    """Padding rows (valid False; whole images) are neither anchors nor columns of any softmax."""
    unit = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.t() / tau
    rows = z.shape[0]
    keep = [True] * rows if valid is None else [bool(v) for v in valid]
    total = z.new_zeros(())
    for r in (r for r in range(rows) if keep[r]):
        others = [c for c in range(rows) if c != r and keep[c]]
        lse = torch.logsumexp(sim[r, others], dim=0)
        positives = [c for c in range(r - r % k, r - r % k + k) if c != r]
        total = total + (lse - sim[r, positives]).mean()
    return total / sum(keep)


def club_f64(mu, logvar, x, perm):
    return 0.5 * (((x[perm] - mu) ** 2 - (x - mu) ** 2) * torch.exp(-logvar)).sum(dim=1).mean()


def gaussian_nll_f64(mu, logvar, x):
    return ((x - mu) ** 2 * torch.exp(-logvar) + logvar).sum(dim=1).mean()


def club_terms_f64(mu, logvar, x, perm):
    """The CLUB bound's summands taken in absolute value: what its float32 rounding scales with."""
    return 0.5 * (((x[perm] - mu) ** 2 + (x - mu) ** 2) * torch.exp(-logvar)).sum(dim=1).mean().item()


def gaussian_nll_terms_f64(mu, logvar, x):
    return ((x - mu) ** 2 * torch.exp(-logvar) + logvar.abs()).sum(dim=1).mean().item()


def test_oracles_match_the_references(gen):
    pred, target = torch.randn(3, 7, 12, generator=gen), torch.randn(3, 7, 12, generator=gen)
    mask = (torch.rand(3, 7, generator=gen) < 0.6).float()
    mask[:, 0] = 1
    z = torch.randn(12, 9, generator=gen)
    mu, logvar, x = (torch.randn(10, 6, generator=gen) for _ in range(3))
    perm = torch.randperm(10, generator=gen)
    pixels64 = (pred.double(), target.double(), mask.double())
    gaussian64 = (mu.double(), logvar.double(), x.double())
    triples = [  # oracle, reference, the size its rounding is relative to
        (norm_pix_mse_f64(*pixels64), losses.norm_pix_mse(pred, target, mask), None),
        (info_nce_f64(z.double(), 3, 0.2), losses.info_nce(z, 3, 0.2), None),
        (club_f64(*gaussian64, perm), losses.club_upper_bound(mu, logvar, x, perm), club_terms_f64(*gaussian64, perm)),
        (gaussian_nll_f64(*gaussian64), losses.gaussian_nll(mu, logvar, x), gaussian_nll_terms_f64(*gaussian64)),
    ]
    for oracle, reference, scale in triples:
        assert abs(oracle.item() - reference.item()) <= 1e-5 * (scale or abs(oracle.item()))


# --------------------------------------------------------------------------------------------
# gather_visible


GATHER_SHAPES = [  # B, N, D, K, mask ratio, strategy
    (2, 16, 32, 4, 0.75, "orthogonal"),  # K*L == N: every token is read once
    (3, 10, 24, 2, 0.6, "independent"),  # masks overlap: a token's gradient sums several rows
    (5, 13, 40, 3, 0.7, "orthogonal"),  # odd sizes, some patches hidden in every mask (zero grad)
]


def _gather_case(gen, batch, patches, dim, k, ratio, strategy, dtype, pos_dtype=torch.float32):
    ids_keep, ids_restore, _ = masking.make_masks(batch, patches, k, ratio, strategy, generator=gen)
    tokens = torch.randn(batch, patches, dim, generator=gen).to(dtype).requires_grad_()
    pos = torch.randn(patches, dim, generator=gen).to(pos_dtype).requires_grad_()
    return ids_keep, ids_restore, tokens, pos


# (tokens, pos_embed): the model's float32 buffer next to bf16 tokens (autocast), or bf16 like the
# tokens (DeepSpeed's bf16 mode casts buffers too)
GATHER_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize(("dtype", "pos_dtype"), GATHER_DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_gather_visible(gen, shape, dtype, pos_dtype):
    batch, patches, dim, k, ratio, strategy = shape
    ids_keep, _, tokens, pos = _gather_case(gen, batch, patches, dim, k, ratio, strategy, dtype, pos_dtype)
    out = kernels.gather_visible(tokens, ids_keep, pos, k)
    assert out.dtype == dtype
    upstream = torch.randn(out.shape, generator=gen).to(dtype)
    d_tokens, d_pos = grads(out, [tokens, pos], upstream)

    tokens64, pos64 = f64(tokens), f64(pos)
    expected = masking.gather_visible(tokens64, ids_keep, pos64, k)
    e_tokens, e_pos = grads(expected, [tokens64, pos64], upstream.double())
    assert_close(out, expected, TOL[dtype], "output")
    assert_close(d_tokens, e_tokens, TOL[dtype], "grad tokens")
    assert d_pos.dtype == pos_dtype
    assert_close(d_pos, e_pos, TOL[pos_dtype], "grad pos_embed")


def test_gather_visible_multi_tile(gen, small_tiles):
    """Partial tiles in every dimension; tiles of the token gradient that span two images."""
    small_tiles("gather_visible_fwd", tuning.Launch(meta={"BLOCK_T": 8, "BLOCK_D": 16}))
    small_tiles("gather_visible_bwd", tuning.Launch(meta={"BLOCK_T": 8, "BLOCK_D": 16}))
    ids_keep, _, tokens, pos = _gather_case(gen, 7, 11, 40, 2, 0.6, "independent", torch.float32)
    out = kernels.gather_visible(tokens, ids_keep, pos, 2)
    upstream = torch.randn(out.shape, generator=gen)
    d_tokens, d_pos = grads(out, [tokens, pos], upstream)
    tokens64, pos64 = f64(tokens), f64(pos)
    expected = masking.gather_visible(tokens64, ids_keep, pos64, 2)
    e_tokens, e_pos = grads(expected, [tokens64, pos64], upstream.double())
    assert_close(out, expected, TOL[torch.float32], "output")
    assert_close(d_tokens, e_tokens, TOL[torch.float32], "grad tokens")
    assert_close(d_pos, e_pos, TOL[torch.float32], "grad pos_embed")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_visible_fixed_pos_embed(gen, small_tiles, dtype):
    """The model's case: pos_embed a float32 buffer without gradient, so the token gradient is written
    straight in the tokens' dtype (no float32 buffer); 8-row tiles over 5 images of 11 patches."""
    small_tiles("gather_visible_bwd", tuning.Launch(meta={"BLOCK_T": 8, "BLOCK_D": 16}))
    ids_keep, _, tokens, pos = _gather_case(gen, 5, 11, 40, 3, 0.7, "independent", dtype)
    pos.requires_grad_(False)
    out = kernels.gather_visible(tokens, ids_keep, pos, 3)
    upstream = torch.randn(out.shape, generator=gen).to(dtype)
    (d_tokens,) = grads(out, [tokens], upstream)
    tokens64 = f64(tokens)
    expected = masking.gather_visible(tokens64, ids_keep, pos.double(), 3)
    assert d_tokens.dtype == dtype
    assert_close(d_tokens, grads(expected, [tokens64], upstream.double())[0], TOL[dtype], "grad tokens")


def test_gather_visible_rejects_repeated_ids(gen):
    ids_keep, _, tokens, pos = _gather_case(gen, 2, 8, 16, 2, 0.5, "independent", torch.float32)
    ids_keep[1, 1] = ids_keep[1, 0]
    out = kernels.gather_visible(tokens, ids_keep, pos, 2)
    with pytest.raises(RuntimeError, match="ids_keep rows must be distinct"):
        out.sum().backward()


def test_poisoning_catches_unwritten_outputs(gen, small_tiles, monkeypatch):
    """A launch that misses a tile leaves NaN behind, so the comparisons above fail on such a bug."""
    small_tiles("gather_visible_fwd", tuning.Launch(meta={"BLOCK_T": 8, "BLOCK_D": 16}))
    ids_keep, _, tokens, pos = _gather_case(gen, 2, 8, 16, 2, 0.5, "independent", torch.float32)
    fine = kernels.gather_visible(tokens, ids_keep, pos, 2).reshape(-1, 16)  # 16 tokens: 2 tiles
    assert torch.isfinite(fine).all()

    class LastTileDropped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return self.kernel[(grid[0] - 1, *grid[1:])]

    monkeypatch.setattr(gather, "_gather_visible_fwd", LastTileDropped(gather._gather_visible_fwd))
    broken = kernels.gather_visible(tokens, ids_keep, pos, 2).reshape(-1, 16)
    assert torch.isnan(broken[8:]).all() and torch.equal(broken[:8], fine[:8])


# --------------------------------------------------------------------------------------------
# unshuffle_with_mask_tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_unshuffle_with_mask_tokens(gen, shape, dtype):
    batch, patches, dim, k, ratio, strategy = shape
    _, ids_restore, _ = masking.make_masks(batch, patches, k, ratio, strategy, generator=gen)
    keep = masking.num_visible(patches, ratio)
    latent = torch.randn(batch * k, 1 + keep, dim, generator=gen).to(dtype).requires_grad_()
    mask_token = torch.randn(dim, generator=gen).requires_grad_()  # a float32 parameter
    pos = torch.randn(1 + patches, dim, generator=gen)
    out = kernels.unshuffle_with_mask_tokens(latent, ids_restore, mask_token, pos)
    assert out.dtype == dtype
    upstream = torch.randn(out.shape, generator=gen).to(dtype)
    d_latent, d_mask = grads(out, [latent, mask_token], upstream)

    latent64, mask64 = f64(latent), f64(mask_token)
    expected = masking.unshuffle_with_mask_tokens(latent64, ids_restore, mask64, pos.double())
    e_latent, e_mask = grads(expected, [latent64, mask64], upstream.double())
    assert_close(out, expected, TOL[dtype], "output")
    assert_close(d_latent, e_latent, TOL[dtype], "grad latent")
    assert_close(d_mask, e_mask, TOL[torch.float32], "grad mask token")


def test_unshuffle_multi_tile_and_learned_pos(gen, small_tiles):
    small_tiles("unshuffle_fwd", tuning.Launch(meta={"BLOCK_T": 16, "BLOCK_D": 16}))
    small_tiles("unshuffle_bwd", tuning.Launch(meta={"BLOCK_T": 16, "BLOCK_D": 16}, split=4))
    _, ids_restore, _ = masking.make_masks(3, 13, 3, 0.7, "orthogonal", generator=gen)
    latent = torch.randn(9, 1 + 4, 24, generator=gen).requires_grad_()
    mask_token = torch.randn(24, generator=gen).requires_grad_()
    pos = torch.randn(14, 24, generator=gen).requires_grad_()
    out = kernels.unshuffle_with_mask_tokens(latent, ids_restore, mask_token, pos)
    upstream = torch.randn(out.shape, generator=gen)
    got = grads(out, [latent, mask_token, pos], upstream)
    inputs64 = [f64(latent), f64(mask_token), f64(pos)]
    expected = masking.unshuffle_with_mask_tokens(inputs64[0], ids_restore, inputs64[1], inputs64[2])
    want = grads(expected, inputs64, upstream.double())
    assert_close(out, expected, TOL[torch.float32], "output")
    for name, a, b in zip(("latent", "mask token", "pos_embed"), got, want, strict=True):
        assert_close(a, b, TOL[torch.float32], f"grad {name}")


def test_unshuffle_rejects_non_permutation(gen):
    _, ids_restore, _ = masking.make_masks(2, 8, 2, 0.5, "independent", generator=gen)
    ids_restore[0, 1] = ids_restore[0, 0]
    with pytest.raises(RuntimeError, match="permutations"):
        kernels.unshuffle_with_mask_tokens(torch.randn(4, 5, 16), ids_restore, torch.randn(16), torch.randn(9, 16))


# --------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 16, 48), (6, 13, 12), (3, 49, 27)])  # R, N, P
def test_norm_pix_mse(gen, shape, dtype):
    rows, patches, _ = shape
    _, _, mask = masking.make_masks(rows, patches, 1, 0.75, generator=gen)
    pred = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    target = (3 * torch.randn(shape, generator=gen) + 1).to(dtype).requires_grad_()
    loss = kernels.norm_pix_mse(pred, target, mask)
    d_pred, d_target = grads(loss, [pred, target])
    pred64, target64 = f64(pred), f64(target)
    expected = norm_pix_mse_f64(pred64, target64, mask.double())
    e_pred, e_target = grads(expected, [pred64, target64])
    assert loss.dtype == torch.float32
    assert_close(loss, expected, LOSS_TOL, "loss")
    assert_close(d_pred, e_pred, TOL[dtype], "grad pred")  # zero on visible patches, which are written too
    assert_close(d_target, e_target, TOL[dtype], "grad target")


def test_norm_pix_mse_split_rows(gen, small_tiles):
    """Patches of a row split over 3 programs (partial sums), 4-patch tiles, fractional weights."""
    small_tiles("norm_pix_mse", tuning.Launch(meta={"BLOCK_N": 4, "BLOCK_P": 64}, split=3))
    pred = torch.randn(5, 19, 48, generator=gen).requires_grad_()
    target = torch.randn(5, 19, 48, generator=gen)
    mask = torch.rand(5, 19, generator=gen) * (torch.rand(5, 19, generator=gen) < 0.7)
    mask[:, 3] = 0.5
    loss = kernels.norm_pix_mse(pred, target, mask)
    (d_pred,) = grads(loss, [pred])
    pred64 = f64(pred)
    expected = norm_pix_mse_f64(pred64, target.double(), mask.double())
    assert_close(loss, expected, LOSS_TOL, "loss")
    assert_close(d_pred, grads(expected, [pred64])[0], TOL[torch.float32], "grad pred")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(12, 20, 3), (40, 33, 4), (30, 256, 2)])  # R, D, K
def test_info_nce(gen, shape, dtype):
    rows, dim, k = shape
    z = (2 * torch.randn(rows, dim, generator=gen)).to(dtype).requires_grad_()
    loss = kernels.info_nce(z, k, 0.2)
    (d_z,) = grads(loss, [z])
    z64 = f64(z)
    expected = info_nce_f64(z64, k, 0.2)
    assert loss.dtype == torch.float32 and d_z.dtype == dtype
    assert_close(loss, expected, LOSS_TOL, "loss")
    assert_close(d_z, grads(expected, [z64])[0], TOL[dtype], "grad z")


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_padding_rows(gen, small_tiles, dtype):
    """Padding images (every view invalid) drop out of anchors and softmaxes; their rows get no gradient."""
    meta = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32, "PRECISION": "ieee"}
    small_tiles("info_nce_fwd", tuning.Launch(meta=meta))
    small_tiles("info_nce_bwd", tuning.Launch(meta=meta))
    k, images = 3, 13
    valid = (torch.rand(images, generator=gen) < 0.6).repeat_interleave(k)
    valid[:k] = True
    z = torch.randn(images * k, 20, generator=gen).to(dtype).requires_grad_()
    loss = kernels.info_nce(z, k, 0.2, valid)
    (d_z,) = grads(2.0 * loss, [z])
    z64 = f64(z)
    expected = info_nce_f64(z64, k, 0.2, valid)
    assert_close(loss, expected, LOSS_TOL, "loss")
    assert_close(d_z, grads(2.0 * expected, [z64])[0], TOL[dtype], "grad z")
    assert (d_z[~valid] == 0).all()
    assert losses.info_nce(z, k, 0.2, valid).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_tiled(gen, small_tiles, dtype):
    """3 x 3 tiles of 16 rows/columns (the last ones partial), upstream gradient not 1."""
    meta = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 64, "PRECISION": "ieee"}
    small_tiles("info_nce_fwd", tuning.Launch(meta=meta))
    small_tiles("info_nce_bwd", tuning.Launch(meta=meta))
    z = torch.randn(45, 50, generator=gen).to(dtype).requires_grad_()
    loss = kernels.info_nce(z, 3, 0.1)
    (d_z,) = grads(3.0 * loss, [z])
    z64 = f64(z)
    expected = info_nce_f64(z64, 3, 0.1)
    assert_close(loss, expected, LOSS_TOL, "loss")
    assert_close(d_z, grads(3.0 * expected, [z64])[0], TOL[dtype], "grad z")


def test_info_nce_argument_errors():
    with pytest.raises(ValueError, match="K >= 2 dividing"):
        kernels.info_nce(torch.randn(10, 8), 3, 0.2)
    with pytest.raises(ValueError, match="D must be <= 1024"):
        kernels.info_nce(torch.randn(4, 2000), 2, 0.2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(30, 13), (7, 48), (50, 100)])  # rows, dim
def test_club_and_gaussian_nll(gen, shape, dtype):
    mu, logvar, x = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    perm = torch.randperm(shape[0], generator=gen)
    inputs64 = [f64(t) for t in (mu, logvar, x)]
    cases = (
        (kernels.club_upper_bound, club_f64, club_terms_f64, (perm,)),
        (kernels.gaussian_nll, gaussian_nll_f64, gaussian_nll_terms_f64, ()),
    )
    for kernel, oracle, terms, extra in cases:
        loss = kernel(mu, logvar, x, *extra)
        expected = oracle(*inputs64, *extra)
        assert loss.dtype == torch.float32
        # The bound is a difference of two positive sums and can nearly cancel (CI once drew a
        # value of 0.025 from terms of size ~10): rounding is relative to the terms, not the result.
        assert_close(loss, expected, LOSS_TOL, f"{kernel.__name__} loss", scale=terms(*inputs64, *extra))
        got, want = grads(loss, [mu, logvar, x]), grads(expected, inputs64)
        for name, a, b in zip(("mu", "logvar", "x"), got, want, strict=True):
            assert_close(a, b, TOL[dtype], f"{kernel.__name__} grad {name}")


def test_club_with_repeated_partners(gen, small_tiles):
    """perm need not be a permutation when x takes no gradient (here: 3-row tiles, 8-wide chunks)."""
    small_tiles("gaussian_terms", tuning.Launch(meta={"BLOCK_M": 4, "BLOCK_X": 8}))
    mu, logvar = (torch.randn(11, 21, generator=gen).requires_grad_() for _ in range(2))
    x = torch.randn(11, 21, generator=gen)
    perm = torch.randint(0, 11, (11,), generator=gen)
    loss = kernels.club_upper_bound(mu, logvar, x, perm)
    inputs64 = [f64(mu), f64(logvar)]
    expected = club_f64(*inputs64, x.double(), perm)
    assert_close(loss, expected, LOSS_TOL, "loss", scale=club_terms_f64(*inputs64, x.double(), perm))
    for a, b in zip(grads(loss, [mu, logvar]), grads(expected, inputs64), strict=True):
        assert_close(a, b, TOL[torch.float32], "grad")
    perm[1] = perm[0] = 2
    with pytest.raises(RuntimeError, match="perm must be a permutation"):
        kernels.club_upper_bound(mu, logvar, x.requires_grad_(), perm).backward()


# --------------------------------------------------------------------------------------------
# launch rules


def test_override_hook_and_restore():
    default = tuning.launch("info_nce_fwd", rows=2048, dim=256, dtype=torch.bfloat16)
    assert default.meta["BLOCK_D"] == 256 and default.meta["PRECISION"] == "tf32"
    tuned = tuning.Launch(meta={**default.meta, "BLOCK_M": 128}, num_warps=8, num_stages=3)
    tuning.override("info_nce_fwd", lambda rows, dim, dtype: tuned)
    try:
        assert tuning.launch("info_nce_fwd", rows=2048, dim=256, dtype=torch.bfloat16) is tuned
    finally:
        tuning.override("info_nce_fwd", None)
    assert tuning.launch("info_nce_fwd", rows=2048, dim=256, dtype=torch.bfloat16) == default
    with pytest.raises(KeyError, match="unknown kernel"):
        tuning.override("nope", None)
    assert set(tuning.kernels()) == {
        "gather_visible_fwd", "gather_visible_bwd", "unshuffle_fwd", "unshuffle_bwd",
        "norm_pix_mse", "info_nce_fwd", "info_nce_bwd", "gaussian_terms",
    }

