"""The MI-MAE model: MAE's encoder and decoder run on K masks per image, plus the MI heads.

The K masks are batched as B*K sequences (row i*K + k is mask k of image i) so one pass of the
encoder and decoder serves them all (docs/METHOD.md).
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mimae_scale import losses, masking, ops
from mimae_scale.config import LossConfig, MaskConfig, MIConfig, ModelConfig
from mimae_scale.model.club import ClubCritic, over_valid_rows
from mimae_scale.model.heads import Projector
from mimae_scale.model.pos_embed import sincos_2d


class MIMAEOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the tensors of a module's output only inside
    tuples and dicts, and hooks them to re-gather the module's own parameters (mask_token,
    cls_token) for the backward; with a dataclass the backward met released, empty parameters."""

    loss: torch.Tensor  # the encoder's objective: w_rec*rec + w_max*max + w_min*min
    terms: dict[str, torch.Tensor]  # rec, max, min where enabled, and the critic's q and club_* health
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


def info_nce_over_ranks(z: torch.Tensor, rows_valid: torch.Tensor, num_masks: int, tau: float,
                        impl: ops.Implementation, gather: bool = True) -> torch.Tensor:
    """InfoNCE over this rank's views (``gather=False``) or every rank's (the validity flags travel
    with the rows, in the same all-gather): padding rows are then no negative on any rank."""
    if not gather:
        return impl.info_nce(z, num_masks, tau, rows_valid)
    both = _gather_with_grad(torch.cat([z, rows_valid[:, None].to(z.dtype)], dim=1))
    return impl.info_nce(both[:, :-1], num_masks, tau, both[:, -1] > 0.5)


Kernels = Literal["auto", "on", "off"]  # kernels.enabled: Triton kernels or references (mimae_scale.ops)


class MIMAE(nn.Module):
    """Built from the method's own config sections (the ones a run's fingerprint covers), not the
    whole run config: data, engine, metrics and the rest never reach the model."""

    def __init__(self, model: ModelConfig, mask: MaskConfig, mi: MIConfig, loss: LossConfig,
                 kernels: Kernels = "auto") -> None:
        super().__init__()
        m = model
        self.mi = mi
        self.patch_size = m.patch_size
        self.num_masks = mask.num_masks
        self.mask_ratio = mask.ratio
        self.mask_strategy = mask.strategy
        self.weights = loss
        self.kernels_enabled = kernels  # may be switched on a built model (tests compare both paths)
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

        # The InfoNCE projector, built only when its term is on (an unused parameter would have no
        # gradient). CLUB's q is not part of the model: it is a critic with its own optimiser
        # (mimae_scale.model.club), passed to forward.
        self.projector = (
            Projector(m.embed_dim, mi.proj_hidden_dim, mi.proj_dim) if self.weights.w_max > 0 else None
        )
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

    def encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor, num_masks: int | None = None) -> torch.Tensor:
        """Encoder on each mask's visible patches: (B*K, 1+L, D) after the final norm. ``num_masks``
        (default mask.num_masks) lets evaluation encode any number of views per image."""
        tokens = self.patch_embed(imgs)
        k = self.num_masks if num_masks is None else num_masks
        x = self._ops(tokens).gather_visible(tokens, ids_keep, self.pos_embed[0, 1:], k)
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

    def forward(
        self,
        imgs: torch.Tensor,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,
        critic: ClubCritic | None = None,
        w_min: float | None = None,
    ) -> MIMAEOutput:
        """The training objective on a batch. ``valid`` (B,) marks real images (False: an epoch's
        padding rows, which enter no loss term); ``critic`` is CLUB's q, fitted here on this step's
        pairs before L_min (without one, as in evaluation and pictures, the CLUB terms are not
        computed); ``w_min`` overrides loss.w_min (its warm-up)."""
        k = self.num_masks
        impl = self._ops(imgs)
        if valid is None:
            valid = torch.ones(imgs.shape[0], dtype=torch.bool, device=imgs.device)
        rows_valid = valid.repeat_interleave(k)
        ids_keep, mask, latent, pred = self._masked_prediction(imgs, generator)
        target = self.patchify(imgs)
        rows_target = target.repeat_interleave(k, dim=0)
        terms = {"rec": over_valid_rows(impl.norm_pix_mse, rows_valid, pred, rows_target, mask=mask)}
        loss = self.weights.w_rec * terms["rec"]

        if self.projector is not None:
            pooled = latent[:, 1:].mean(dim=1) if self.mi.pool == "mean" else latent[:, 0]
            z = self.projector(pooled)
            gather = self.mi.negatives == "global"
            terms["max"] = info_nce_over_ranks(z, rows_valid, k, self.mi.tau, impl, gather)
            loss = loss + self.weights.w_max * terms["max"]

        if self.weights.w_min > 0 and critic is not None:
            z, x, pair_valid = self._club_pairs(imgs, latent, target, ids_keep, rows_valid)
            terms.update(critic.fit(z, x, pair_valid, impl))  # q first, on this step's detached pairs
            sampled = self.mi.club.negatives == "sampled"  # closed_form needs no partner rows
            perm = losses.valid_permutation(pair_valid, generator) if sampled else None
            terms["min"] = critic.upper_bound(z, x, pair_valid, perm, impl)
            loss = loss + (self.weights.w_min if w_min is None else w_min) * terms["min"]

        return MIMAEOutput(loss=loss, terms=terms, pred=pred, mask=mask)

    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's prediction (B*K, N, P) and the masks (B*K, N) that :meth:`forward` draws
        from ``generator``, without the loss terms: what a picture needs, on this rank alone (the
        forward's InfoNCE gathers rows from every rank, so one rank must not run it by itself)."""
        _, mask, _, pred = self._masked_prediction(imgs, generator)
        return pred, mask

    def _masked_prediction(self, imgs: torch.Tensor, generator: torch.Generator | None):
        """(ids_keep, mask, encoder latent, decoder prediction) of the K masks drawn from ``generator``."""
        ids_keep, ids_restore, mask = masking.make_masks(
            imgs.shape[0], self.num_patches, self.num_masks, self.mask_ratio, self.mask_strategy,
            generator=generator, device=imgs.device,
        )
        latent = self.encode(imgs, ids_keep)
        return ids_keep, mask, latent, self.decode(latent, ids_restore)

    def _club_pairs(
        self, imgs: torch.Tensor, latent: torch.Tensor, target: torch.Tensor, ids_keep: torch.Tensor,
        rows_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, x, valid) pairs for CLUB: per visible token and its patch (`token`), per view's
        pooled latent and the down-sampled image (`global`), or per image its latent and the image
        itself (`image`, the paper's I(x; z)); x normalised per patch / per image, or raw
        (mi.club.target)."""
        k = self.num_masks
        club = self.mi.club
        if club.level == "token":
            patches = losses.normalize_patches(target) if club.target == "norm" else target.float()
            image = torch.arange(latent.shape[0], device=latent.device) // k
            x = patches[image[:, None], ids_keep]
            tokens = ids_keep.shape[1]
            return (latent[:, 1:].reshape(-1, latent.shape[-1]), x.reshape(-1, x.shape[-1]),
                    rows_valid.repeat_interleave(tokens))
        if club.level == "image":
            # The image's latent: the mean over its K views' visible tokens. With orthogonal masks that
            # cover the grid, that is every patch's token once; one pair per image, not per view.
            pooled = latent[:, 1:].mean(dim=1).view(-1, k, latent.shape[-1]).mean(dim=1)
            x = imgs.float().flatten(1)
            return pooled, losses.normalize_patches(x) if club.target == "norm" else x, rows_valid[::k]
        small = F.adaptive_avg_pool2d(imgs.float(), club.global_size).flatten(1)
        if club.target == "norm":
            small = losses.normalize_patches(small)
        return latent[:, 1:].mean(dim=1), small.repeat_interleave(k, dim=0), rows_valid


def build_model(model: ModelConfig, mask: MaskConfig, mi: MIConfig, loss: LossConfig, *,
                kernels: Kernels = "auto") -> MIMAE:
    """The MI-MAE of these sections; ``kernels`` is the run's ``kernels.enabled``. A caller holding a
    whole Config writes ``build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)``."""
    return MIMAE(model, mask, mi, loss, kernels)
