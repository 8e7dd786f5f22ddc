"""Reference rows: encoders with nothing learnt, scored by the same kNN and linear code (issue #25).

A pretrained encoder is worth something only above what needs no training: its random
initialisation (``--random-init``), the pixels themselves, and a hand-made feature. These modules
expose ``image_features(images) -> (B, D)``, which :func:`extract_features` takes instead of pooled
tokens, so they meet exactly the loader, probes and split that the encoders meet.

- ``raw_pixels``: the (normalised, resized) input image, flattened.
- ``hog``: Dalal & Triggs' histogram of oriented gradients, computed as scikit-image's
  ``hog(orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2), block_norm="L2-Hys")`` on
  the channel-mean image (tested against scikit-image; written here in torch, batched, so the
  evaluation needs no scikit-image). 4-pixel cells suit 28-32 px images: 8x8 cells, 1,764 dims at 32 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HYS_CLIP = 0.2  # L2-Hys: clip after the first L2 normalisation (Dalal & Triggs)
HOG_EPS = 1e-5  # scikit-image's eps in the block normalisations


def hog(image: torch.Tensor, orientations: int = 9, cell: int = 4, block: int = 2) -> torch.Tensor:
    """HOG of (B, H, W) single-channel images -> (B, n_blocks_r * n_blocks_c * block^2 * orientations).

    Step by step as scikit-image: central differences without the 1/2 and 0 on the border rows and
    columns; unsigned orientation in [0, 180) degrees; hard binning (no interpolation between bins
    or cells) of the magnitude, averaged over each whole cell (a partial cell at the edge is dropped);
    overlapping blocks of block x block cells, stride one cell, each L2-Hys normalised."""
    b, h, w = image.shape
    n_r, n_c = h // cell, w // cell
    if n_r < block or n_c < block:
        raise ValueError(f"hog: a {h}x{w} image has fewer than {block}x{block} cells of {cell} px")
    g_row = torch.zeros_like(image)
    g_col = torch.zeros_like(image)
    g_row[:, 1:-1] = image[:, 2:] - image[:, :-2]
    g_col[:, :, 1:-1] = image[:, :, 2:] - image[:, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180
    # the bin as scikit-image decides it: bin i holds width*i <= angle < width*(i+1), the bounds
    # computed as it computes them; an angle that rounds to 180.0 is in no bin there, nor here
    bounds = (180.0 / orientations) * torch.arange(1, orientations + 1, dtype=image.dtype, device=image.device)
    bins = (angle[..., None] >= bounds).sum(-1)
    votes = F.one_hot(bins, orientations + 1)[..., :orientations].to(image.dtype) * magnitude[..., None]
    cells = votes[:, : n_r * cell, : n_c * cell].reshape(b, n_r, cell, n_c, cell, orientations)
    cells = cells.sum(dim=(2, 4)) / (cell * cell)  # (B, n_r, n_c, orientations)
    blocks = cells.unfold(1, block, 1).unfold(2, block, 1)  # (B, n_br, n_bc, orientations, block, block)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3).reshape(b, n_r - block + 1, n_c - block + 1, -1)
    blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + HOG_EPS**2)
    blocks = blocks.clamp(max=HYS_CLIP)
    blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + HOG_EPS**2)
    return blocks.reshape(b, -1)


class RawPixels(nn.Module):
    """The image itself, flattened: what the evaluation's pixels alone allow."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1)


class Hog(nn.Module):
    """:func:`hog` of the channel-mean image (the real benchmarks are grey, replicated to RGB)."""

    def __init__(self, orientations: int = 9, cell: int = 4, block: int = 2) -> None:
        super().__init__()
        self.orientations, self.cell, self.block = orientations, cell, block

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return hog(images.float().mean(dim=1), self.orientations, self.cell, self.block)


REFERENCES: dict[str, type[nn.Module]] = {"raw_pixels": RawPixels, "hog": Hog}


def reference_encoder(name: str) -> nn.Module:
    if name not in REFERENCES:
        raise ValueError(f"--reference: {name!r} is not one of {sorted(REFERENCES)}")
    return REFERENCES[name]().eval()


def describe(name: str) -> str:
    return {"raw_pixels": "reference: raw pixels",
            "hog": "reference: HOG, 9 orientations, 4 px cells, 2x2-cell L2-Hys blocks"}[name]

