"""K masks per image, and the plain-PyTorch gather/scatter that feeds the encoder and decoder.

Rows are image-major everywhere: row ``i * K + k`` is mask ``k`` of image ``i``. These functions
are the ground truth that the Triton kernels in :mod:`mimae_scale.kernels` are tested against.
"""

from __future__ import annotations

import torch

STRATEGIES = ("orthogonal", "independent")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """L = round(N * (1 - ratio)): how many patches each mask leaves visible."""
    return round(num_patches * (1.0 - mask_ratio))


def make_masks(
    batch_size: int,
    num_patches: int,
    num_masks: int,
    mask_ratio: float,
    strategy: str = "orthogonal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw K masks for each of ``batch_size`` images.

    Returns ``ids_keep`` (B*K, L) int64, ``ids_restore`` (B*K, N) int64 and ``mask`` (B*K, N)
    float with 1 = hidden. ``ids_restore[r, p]`` is where patch ``p`` sits in row ``r``'s shuffled
    order, so ``p`` is visible exactly when ``ids_restore[r, p] < L``.

    ``orthogonal``: one random permutation per image, mask k keeps chunk k visible, so the K
    visible sets are disjoint (and partition the grid when K * L == N).
    ``independent``: K independent MAE masks per image.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"mask strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}")
    keep = num_visible(num_patches, mask_ratio)
    if not 1 <= keep <= num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} leaves {keep} of {num_patches} patches visible")
    if strategy == "orthogonal" and num_masks * keep > num_patches:
        raise ValueError(
            f"orthogonal masks need K * L <= N, got K={num_masks}, L={keep}, N={num_patches}"
        )
    if device is None and generator is not None:
        device = generator.device

    if strategy == "orthogonal":
        noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
        perm = torch.argsort(noise, dim=1)  # (B, N)
        # Mask k sees chunk k first: rolling the permutation puts that chunk at the front and keeps
        # the rest in permutation order, so ids_shuffle is still a permutation of the patch ids.
        ids_shuffle = torch.stack(
            [torch.roll(perm, shifts=-k * keep, dims=1) for k in range(num_masks)], dim=1
        ).reshape(batch_size * num_masks, num_patches)
    else:
        noise = torch.rand(batch_size * num_masks, num_patches, generator=generator, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)

    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep].contiguous()
    mask = (ids_restore >= keep).float()
    return ids_keep, ids_restore, mask


def gather_visible(
    tokens: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor, num_masks: int
) -> torch.Tensor:
    """(B, N, D) tokens -> (B*K, L, D): row r = tokens[r // K, ids_keep[r]] + pos_embed[ids_keep[r]]."""
    batch, _, _dim = tokens.shape
    image = torch.arange(batch * num_masks, device=tokens.device) // num_masks
    return tokens[image[:, None], ids_keep] + pos_embed[ids_keep].to(tokens.dtype)


def unshuffle_with_mask_tokens(
    latent: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """(R, 1+L, D) latent (cls first) -> (R, 1+N, D) full sequence for the decoder.

    Position p gets the visible latent that belongs there, or the mask token, plus pos_embed[1+p];
    the cls row gets pos_embed[0].
    """
    rows, seq, dim = latent.shape
    keep = seq - 1
    num_patches = ids_restore.shape[1]
    filler = mask_token.to(latent.dtype).expand(rows, num_patches - keep, dim)
    shuffled = torch.cat([latent[:, 1:], filler], dim=1)  # visible first, then mask tokens
    patches = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    full = torch.cat([latent[:, :1], patches], dim=1)
    return full + pos_embed.to(latent.dtype)
