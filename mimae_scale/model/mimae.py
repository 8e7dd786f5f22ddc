"""The MI-MAE model: MAE's encoder and decoder run on K masks per image, plus the MI heads.

The K masks are batched as B*K sequences (row i*K + k is mask k of image i) so one pass of the
encoder and decoder serves them all (SPEC.md section 1).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mimae_scale import losses, masking, ops
from mimae_scale.config import Config
from mimae_scale.model.heads import ApproximationNetwork, Projector
from mimae_scale.model.pos_embed import sincos_2d


class MIMAEOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the tensors of a module's output only inside
    tuples and dicts, and hooks them to re-gather the module's own parameters (mask_token,
    cls_token) for the backward; with a dataclass the backward met released, empty parameters."""

    loss: torch.Tensor  # what the optimiser minimises: w_rec*rec + w_max*max + w_min*min + q
    terms: dict[str, torch.Tensor]  # every term separately: rec, and max, min, q where enabled
    pred: torch.Tensor  # (B*K, N, P) predicted (normalised) patches
    mask: torch.Tensor  # (B*K, N), 1 = hidden


def _gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order, with gradients flowing back to each rank.

    Every rank then computes the same global InfoNCE; the gather's backward sums the world's
    gradients into each rank's slice and the engine's gradient averaging divides by the world
    size again, so the parameters receive exactly the gradient of the global loss.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0)


class MIMAE(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.patch_size = m.patch_size
        self.num_masks = cfg.mask.num_masks
        self.mask_ratio = cfg.mask.ratio
        self.mask_strategy = cfg.mask.strategy
        self.weights = cfg.loss
        self.kernels_enabled = cfg.kernels.enabled  # Triton kernels or references (mimae_scale.ops)
        norm = partial(nn.LayerNorm, eps=1e-6)

        # encoder (names follow timm's VisionTransformer, so export is a rename-free copy)
        self.patch_embed = PatchEmbed(m.img_size, m.patch_size, m.in_chans, m.embed_dim)
        self.num_patches = self.patch_embed.num_patches
        grid = m.img_size // m.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, m.embed_dim))
        self.register_buffer("pos_embed", sincos_2d(m.embed_dim, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(
            Block(m.embed_dim, m.num_heads, m.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(m.depth)
        )
        self.norm = norm(m.embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(m.embed_dim, m.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(m.decoder_embed_dim, grid).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(
            Block(m.decoder_embed_dim, m.decoder_num_heads, m.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(m.decoder_depth)
        )
        self.decoder_norm = norm(m.decoder_embed_dim)
        self.decoder_pred = nn.Linear(m.decoder_embed_dim, m.patch_size**2 * m.in_chans)

        # MI heads, built only when their term is on (an unused parameter would have no gradient)
        self.projector = (
            Projector(m.embed_dim, cfg.mi.proj_hidden_dim, cfg.mi.proj_dim) if self.weights.w_max > 0 else None
        )
        club = cfg.mi.club
        x_dim = m.patch_size**2 * m.in_chans if club.level == "token" else m.in_chans * club.global_size**2
        self.approx = ApproximationNetwork(m.embed_dim, club.hidden_dim, x_dim) if self.weights.w_min > 0 else None
        self._init_weights()

    # -- initialisation (MAE's) ----------------------------------------------------------------

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch embedding viewed as a Linear
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- patches ---------------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (p, p, C) as MAE."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p = self.patch_size
        b, n, _ = x.shape
        side = int(n**0.5)
        c = x.shape[-1] // (p * p)
        x = x.reshape(b, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, side * p, side * p)

    def _ops(self, x: torch.Tensor) -> ops.Implementation:
        """The hot-path ops for x's device. Called inside forward, where ZeRO-3 has gathered this
        module's parameters (mask_token), so the kernels receive plain tensors."""
        return ops.implementation(self.kernels_enabled, x.device)

    # -- encoder and decoder ---------------------------------------------------------------------

    def encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder on each mask's visible patches: (B*K, 1+L, D) after the final norm."""
        tokens = self.patch_embed(imgs)
        x = self._ops(tokens).gather_visible(tokens, ids_keep, self.pos_embed[0, 1:], self.num_masks)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder over the full grid: (B*K, N, p*p*C) predictions (cls row dropped)."""
        x = self.decoder_embed(latent)
        x = self._ops(x).unshuffle_with_mask_tokens(x, ids_restore, self.mask_token[0, 0], self.decoder_pos_embed[0])
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder features (B, 1+N, D), cls first: what evaluation and export use."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    # -- the training forward ----------------------------------------------------------------------

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> MIMAEOutput:
        k = self.num_masks
        impl = self._ops(imgs)
        ids_keep, ids_restore, mask = masking.make_masks(
            imgs.shape[0], self.num_patches, k, self.mask_ratio, self.mask_strategy,
            generator=generator, device=imgs.device,
        )
        latent = self.encode(imgs, ids_keep)
        pred = self.decode(latent, ids_restore)
        target = self.patchify(imgs)
        rows_target = target.repeat_interleave(k, dim=0)
        terms = {"rec": impl.norm_pix_mse(pred, rows_target, mask)}
        loss = self.weights.w_rec * terms["rec"]

        if self.projector is not None:
            pooled = latent[:, 1:].mean(dim=1) if self.cfg.mi.pool == "mean" else latent[:, 0]
            z = self.projector(pooled)
            if self.cfg.mi.negatives == "global":
                z = _gather_with_grad(z)
            terms["max"] = impl.info_nce(z, k, self.cfg.mi.tau)
            loss = loss + self.weights.w_max * terms["max"]

        if self.approx is not None:
            z, x = self._club_pairs(imgs, latent, target, ids_keep)
            perm = torch.randperm(z.shape[0], generator=generator, device=z.device)
            mu, logvar = self.approx(z.detach())  # L_q trains theta only
            terms["q"] = impl.gaussian_nll(mu, logvar, x)
            mu, logvar = self.approx(z, detach_params=True)  # L_min moves the encoder only
            terms["min"] = impl.club_upper_bound(mu, logvar, x, perm)
            loss = loss + self.weights.w_min * terms["min"] + terms["q"]

        return MIMAEOutput(loss=loss, terms=terms, pred=pred, mask=mask)

    def _club_pairs(
        self, imgs: torch.Tensor, latent: torch.Tensor, target: torch.Tensor, ids_keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, x) pairs for CLUB: per visible token and its normalised patch (`token`), or per
        view's pooled latent and the down-sampled image (`global`)."""
        k = self.num_masks
        if self.cfg.mi.club.level == "token":
            image = torch.arange(latent.shape[0], device=latent.device) // k
            x = losses.normalize_patches(target)[image[:, None], ids_keep]
            return latent[:, 1:].reshape(-1, latent.shape[-1]), x.reshape(-1, x.shape[-1])
        size = self.cfg.mi.club.global_size
        small = F.adaptive_avg_pool2d(imgs.float(), size).flatten(1)
        return latent[:, 1:].mean(dim=1), small.repeat_interleave(k, dim=0)


def build_model(cfg: Config) -> MIMAE:
    return MIMAE(cfg)
