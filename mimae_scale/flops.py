"""Model FLOPs of an MI-MAE training step, and what the model-FLOP utilisation (MFU) divides by: a
measured bf16 matmul ceiling (:func:`measure_matmul_tflops`), and the data sheet's peak beside it.

Convention (docs/METRICS.md): 6 FLOPs per matmul parameter per token through it (2 forward, 4
backward) plus attention's 12 x T^2 x width per layer and sequence (QK^T and AV: 4 T^2 d forward,
8 backward). The encoder runs on 1+L tokens per view (cls + visible patches), the decoder on 1+N,
and each image is K views. Counted: the patch embedding (on the N patches of each image, once),
every transformer block, the decoder's input and output projections and the MI heads. Not
counted: norms, biases, activations, the losses' element-wise math and InfoNCE's similarity matrix
(under 0.1% for the shipped configs). The MI heads' detached passes are counted as full passes,
as the convention does for every matmul.
"""

from __future__ import annotations

import time

import torch

from mimae_scale.config import Config
from mimae_scale.masking import num_visible
from mimae_scale.model.club import club_x_dim

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name(); the first matching entry wins, so specific names come first.
PEAK_TFLOPS_BY_GPU: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def _block_matmul_params(width: int, mlp_ratio: float) -> int:
    """qkv (3 d^2) + attention output (d^2) + MLP (2 * d * hidden) weights of one timm Block."""
    hidden = int(width * mlp_ratio)
    return 4 * width * width + 2 * width * hidden


def tokens_per_image(cfg: Config) -> int:
    """Transformer tokens one image costs per step: K views x ((1+L) encoder + (1+N) decoder); a
    classifier (fine-tuning, linear probe) runs the encoder once on all 1+N."""
    n = cfg.num_patches
    if cfg.task != "pretrain":
        return 1 + n
    visible = num_visible(n, cfg.mask.ratio)
    return cfg.mask.num_masks * ((1 + visible) + (1 + n))


def train_flops_per_image(cfg: Config) -> float:
    """FLOPs of one training step (forward + backward) per image, by the convention above."""
    if cfg.task != "pretrain":
        return classifier_flops_per_image(cfg)
    m = cfg.model
    k = cfg.mask.num_masks
    n = cfg.num_patches
    enc_tokens = 1 + num_visible(n, cfg.mask.ratio)
    dec_tokens = 1 + n
    patch_dim = m.in_chans * m.patch_size**2

    matmul = patch_dim * m.embed_dim * n  # patch embedding, once per image
    matmul += m.depth * _block_matmul_params(m.embed_dim, m.mlp_ratio) * k * enc_tokens
    matmul += m.embed_dim * m.decoder_embed_dim * k * enc_tokens  # decoder_embed
    matmul += m.decoder_depth * _block_matmul_params(m.decoder_embed_dim, m.mlp_ratio) * k * dec_tokens
    matmul += m.decoder_embed_dim * patch_dim * k * dec_tokens  # decoder_pred
    if cfg.loss.w_max > 0:  # projector on each view's pooled latent
        matmul += (m.embed_dim * cfg.mi.proj_hidden_dim + cfg.mi.proj_hidden_dim * cfg.mi.proj_dim) * k
    if cfg.loss.w_min > 0:  # CLUB's q: its MLPs (mean, and log-variance unless fixed), q_steps fits + L_min
        club = cfg.mi.club
        x_dim = club_x_dim(cfg)
        rows = {"token": k * (enc_tokens - 1), "global": k, "image": 1}[club.level]  # per image
        mlps = 2 if club.variance == "learned" else 1
        matmul += mlps * (club.q_steps + 1) * (m.embed_dim * club.hidden_dim + club.hidden_dim * x_dim) * rows

    attention = m.depth * k * enc_tokens**2 * m.embed_dim + m.decoder_depth * k * dec_tokens**2 * m.decoder_embed_dim
    return 6.0 * matmul + 12.0 * attention


def classifier_flops_per_image(cfg: Config) -> float:
    """Fine-tuning: the encoder on all 1+N tokens and the head, forward and backward (6 per parameter per
    token). A linear probe's frozen encoder runs forward only (2, and 4 T^2 d for attention); its head 6."""
    m = cfg.model
    n, tokens = cfg.num_patches, 1 + cfg.num_patches
    encoder = m.in_chans * m.patch_size**2 * m.embed_dim * n + m.depth * _block_matmul_params(m.embed_dim,
                                                                                               m.mlp_ratio) * tokens
    attention = m.depth * tokens**2 * m.embed_dim
    head = 6.0 * m.embed_dim * cfg.finetune.num_classes
    if cfg.task == "linprobe":
        return 2.0 * encoder + 4.0 * attention + head
    return 6.0 * encoder + 12.0 * attention + head


def measure_matmul_tflops(device: torch.device, size: int = 8192, iters: int = 10) -> float:
    """The bf16 matmul rate this device reaches (TFLOP/s): the mean of ``iters`` size^3 products on
    random data after three warm-ups, timed with CUDA events on a GPU. MFU divides by this ceiling
    rather than by the data sheet (an H200's measured 739-790 against 989 on paper)."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(size, size, device=device, generator=gen).to(torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        began = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        seconds = time.perf_counter() - began
    return 2.0 * size**3 * iters / seconds / 1e12


def default_peak_tflops(device_name: str | None) -> float | None:
    """The table's dense bf16 peak for a GPU name, or None (CPU, unknown GPU: MFU not exported)."""
    if not device_name:
        return None
    for key, peak in PEAK_TFLOPS_BY_GPU:
        if key in device_name:
            return peak
    return None
