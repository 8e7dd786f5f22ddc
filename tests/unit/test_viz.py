"""The reconstruction picture: layout, content, and the de-normalisation it rests on."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mimae_scale.config import load_config
from mimae_scale.evaluation.viz import (
    GREY,
    column_titles,
    denormalize_prediction,
    grid_layout,
    reconstruction_panels,
    render_grid,
)
from mimae_scale.losses import normalize_patches
from mimae_scale.model import build_model


def test_denormalize_inverts_the_loss_normalisation(gen):
    target = torch.rand(5, 16, 48, generator=gen) * 3 - 1
    torch.testing.assert_close(denormalize_prediction(normalize_patches(target), target), target,
                               rtol=1e-4, atol=1e-4)


def _cells(panel: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid, cell, cell, 3) patch cells of one panel, row-major like the model's patches."""
    cell = panel.shape[0] // grid
    return panel.reshape(grid, cell, grid, cell, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, cell, cell, 3)


def test_picture_size_content_and_masks(tmp_path, gen, seed):
    cfg = load_config("tiny")  # K = 4 orthogonal masks of 16 of the 64 patches: they partition the grid
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    panels = reconstruction_panels(model, images, cfg.data.mean, cfg.data.std, gen)
    out = tmp_path / "recon.png"
    render_grid(panels).save(out)

    picture = np.asarray(Image.open(out).convert("RGB"))
    layout = grid_layout(3, 4, 32)
    assert picture.shape == (layout.height, layout.width, 3) and layout.panel == 128
    assert len(column_titles(4)) == 9
    assert picture.std() > 30  # not blank
    header = picture[:layout.origin(0, 0)[1] - 2]
    assert (header < 128).any()  # the column titles were drawn

    grey = round(GREY * 255)
    grid = 8
    for row in range(3):
        def panel(col, row=row):
            x, y = layout.origin(row, col)
            return picture[y:y + layout.panel, x:x + layout.panel].astype(int)

        original = _cells(panel(0), grid)
        shown = np.zeros(grid * grid, dtype=int)
        for k in range(4):
            visible = _cells(panel(1 + k), grid)
            recon = _cells(panel(5 + k), grid)
            is_grey = (visible == grey).all(axis=(1, 2, 3))
            hidden = panels.mask[row, k].numpy().astype(bool)
            assert np.array_equal(is_grey, hidden)  # the picture shows exactly mask k
            assert hidden.sum() == 48
            shown += ~is_grey
            # visible patches: the original, in both the visible and the reconstruction panel
            assert np.array_equal(visible[~hidden], original[~hidden])
            assert np.array_equal(recon[~hidden], original[~hidden])
            # hidden patches: the decoder's output, not the original
            assert (recon[hidden] != original[hidden]).any(axis=(1, 2, 3)).mean() > 0.9
        assert (shown == 1).all()  # orthogonal masks: each patch is visible in exactly one panel
