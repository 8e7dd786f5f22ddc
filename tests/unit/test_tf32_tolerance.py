"""The bf16 InfoNCE tolerance of `mimae-bench gpu` holds with Hopper's TF32 products.

The kernel multiplies its float32 unit rows in TF32 for 16-bit inputs (kernels/info_nce.py). The
interpreter (CI) computes those products in exact float32, so only a simulation shows what a GPU
adds: the unit rows rounded to TF32's 10 mantissa bits, then the loss in float64, against the
float64 loss of the same bf16 inputs, at every shape the bench checks, for both ways hardware may
drop the 13 bits (round to nearest even, as cvt.rn.tf32 does; truncation, what tensor cores do with
float32 registers they are handed unconverted). Products of two TF32 values are exact in float32,
so the rounding of the inputs is the error; float32 accumulation adds far less.
"""

from __future__ import annotations

import pytest
import torch

from mimae_scale.gpubench.kernels import FULL_SHAPES, LOSS_TOL, LOSS_TOL_TF32, loss_tolerance

MARGIN = 5  # the tolerance stays at least this many times the simulated error
TAU = 0.2  # the bench's (and the recipes') temperature
SAMPLED_ANCHORS = 1024  # vit_l's 16k rows: the loss's mean over this many anchors (each against all rows)


def to_tf32(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """float32 -> TF32 (1 sign, 8 exponent, 10 mantissa bits), still stored as float32."""
    bits = x.float().contiguous().view(torch.int32)
    if rounding == "nearest":  # half to even: add 0x0FFF plus the lowest kept bit, then drop 13 bits
        bits = bits + 0x0FFF + ((bits >> 13) & 1)
    elif rounding != "truncate":
        raise ValueError(rounding)
    return (bits & ~0x1FFF).view(torch.float32)


def rowwise_loss(units: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """InfoNCE's per-anchor terms (float64) from given unit rows, as the kernel defines them."""
    sim = units[anchors] @ units.t() / TAU
    cols = torch.arange(units.shape[0])
    self_pair = anchors[:, None] == cols[None, :]
    positive = (anchors[:, None] // k == cols[None, :] // k) & ~self_pair
    lse = torch.logsumexp(sim.masked_fill(self_pair, float("-inf")), dim=1)
    return lse - (sim * positive).sum(dim=1) / (k - 1)


def tf32_error(shape: dict[str, int], rounding: str) -> float:
    """Relative error of the loss with TF32 unit rows, inputs as the bench makes them (randn * 2, bf16)."""
    rows, dim, k = shape["R_mi"], shape["Dz"], shape["K"]
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(rows, dim, generator=gen) * 2.0).to(torch.bfloat16)
    anchors = torch.arange(rows) if rows <= 2048 else torch.randperm(rows, generator=gen)[:SAMPLED_ANCHORS]
    exact = rowwise_loss((z.double() / z.double().norm(dim=1, keepdim=True)), anchors, k).mean()
    z32 = z.float()
    units = to_tf32(z32 / z32.norm(dim=1, keepdim=True), rounding).double()  # the kernel normalises in float32
    return ((rowwise_loss(units, anchors, k).mean() - exact).abs() / exact.abs()).item()


def test_to_tf32_keeps_10_mantissa_bits() -> None:
    ulp = 2.0**-10
    x = torch.tensor([1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.75 * ulp, 1 + 0.25 * ulp, -(1 + 0.75 * ulp), 3.0])
    assert to_tf32(x, "nearest").tolist() == [1.0, 1 + 2 * ulp, 1 + ulp, 1.0, -(1 + ulp), 3.0]  # ties to even
    assert to_tf32(x, "truncate").tolist() == [1.0, 1 + ulp, 1.0, 1.0, -1.0, 3.0]


def test_info_nce_on_bf16_is_the_tf32_case() -> None:
    from mimae_scale.kernels import tuning

    def precision(kernel: str, dtype: torch.dtype) -> str:
        return tuning.launch(kernel, rows=2048, dim=256, dtype=dtype).meta["PRECISION"]

    assert precision("info_nce_fwd", torch.bfloat16) == precision("info_nce_bwd", torch.bfloat16) == "tf32"
    assert precision("info_nce_fwd", torch.float32) == "ieee"
    assert loss_tolerance("info_nce", torch.bfloat16) == LOSS_TOL_TF32
    assert loss_tolerance("info_nce", torch.float32) == loss_tolerance("norm_pix_mse", torch.bfloat16) == LOSS_TOL


# one shape per distinct InfoNCE problem (rows, width, K): vit_h's is vit_b's
INFO_NCE_SHAPES = sorted({(s["R_mi"], s["Dz"], s["K"]): name for name, s in sorted(FULL_SHAPES.items())}.values())


@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
@pytest.mark.parametrize("shape_name", INFO_NCE_SHAPES)
def test_the_bf16_info_nce_tolerance_holds_with_tf32(shape_name: str, rounding: str) -> None:
    err = tf32_error(FULL_SHAPES[shape_name], rounding)
    print(f"{shape_name} {rounding}: TF32 error {err:.2e}, tolerance {LOSS_TOL_TF32:.0e} ({LOSS_TOL_TF32 / err:.0f}x)")
    assert err * MARGIN <= LOSS_TOL_TF32, f"{shape_name}, {rounding}: TF32 error {err:.2e}"


def test_tf32_truncation_would_leave_the_float32_tolerance_too_little_margin() -> None:
    """Why InfoNCE on bf16 has a tolerance of its own: truncation uses up half of LOSS_TOL at the odd
    shape (999 rows), and a simulation that changed nothing would fail here."""
    assert tf32_error(FULL_SHAPES["odd"], "truncate") * 4 > LOSS_TOL
