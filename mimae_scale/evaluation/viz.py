"""``mimae-viz CKPT DATA OUT.png``: what each of the K masks shows the encoder, and what the decoder makes of it.

One row per image: the original, then each mask's visible patches (hidden ones grey), then each
mask's reconstruction. As in MAE's demo, a reconstruction is the decoder's prediction of the
hidden patches, de-normalised with each target patch's own mean and variance (the model predicts
normalised pixels), with the visible patches pasted from the original.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_OK
from mimae_scale.losses import PATCH_NORM_EPS
from mimae_scale.model import MIMAE

GREY = 0.5  # display value of hidden patches
GAP = 4  # pixels between panels
HEADER = 18  # pixels of column titles
MIN_PANEL = 112  # small images are scaled up (nearest neighbour) to at least this many pixels


@dataclass
class Panels:
    original: torch.Tensor  # (B, C, H, W) display space [0, 1]
    visible: torch.Tensor  # (B, K, C, H, W)
    reconstruction: torch.Tensor  # (B, K, C, H, W)
    mask: torch.Tensor  # (B, K, N), 1 = hidden


def denormalize_prediction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Predicted normalised patches (..., P) back to pixels with the target patches' mean and
    (unbiased, as the loss) variance: the inverse of ``losses.normalize_patches``."""
    target = target.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred.float() * (var + PATCH_NORM_EPS) ** 0.5 + mean


@torch.no_grad()
def reconstruction_panels(
    model: MIMAE,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator | None = None,
) -> Panels:
    """Everything the picture shows, for normalised ``images`` (B, C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        images = images.to(param.device, param.dtype)
        pred, mask = model.reconstruct(images, generator=generator)  # the loss terms are not drawn
    finally:
        model.train(was_training)
    b, k = images.shape[0], model.num_masks
    target = model.patchify(images).repeat_interleave(k, dim=0)  # (B*K, N, P)
    recon = model.unpatchify(denormalize_prediction(pred, target))
    hidden = model.unpatchify(mask.float()[..., None].expand_as(target))  # 1 where hidden
    rows = images.float().repeat_interleave(k, dim=0)
    pasted = rows * (1 - hidden) + recon * hidden

    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)

    def display(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1)

    visible = display(rows) * (1 - hidden) + GREY * hidden
    shape = (b, k, *images.shape[1:])
    return Panels(
        original=display(images.float()).cpu(),
        visible=visible.reshape(shape).cpu(),
        reconstruction=display(pasted).reshape(shape).cpu(),
        mask=mask.reshape(b, k, -1).cpu(),
    )


@dataclass
class Layout:
    panel: int  # side of one panel in pixels
    width: int
    height: int

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of the panel in image row ``row`` and column ``col``."""
        return GAP + col * (self.panel + GAP), HEADER + GAP + row * (self.panel + GAP)


def grid_layout(num_images: int, num_masks: int, img_size: int) -> Layout:
    panel = img_size * max(1, math.ceil(MIN_PANEL / img_size))
    cols = 1 + 2 * num_masks
    return Layout(panel=panel, width=GAP + cols * (panel + GAP), height=HEADER + GAP + num_images * (panel + GAP))


def column_titles(num_masks: int) -> list[str]:
    return ["original"] + [f"mask {k + 1} visible" for k in range(num_masks)] + [
        f"mask {k + 1} recon." for k in range(num_masks)]


def _to_pil(x: torch.Tensor, side: int) -> Image.Image:
    array = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB").resize((side, side), Image.NEAREST)


def render_grid(panels: Panels) -> Image.Image:
    b, k = panels.visible.shape[:2]
    layout = grid_layout(b, k, panels.original.shape[-1])
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, title in enumerate(column_titles(k)):
        x, _ = layout.origin(0, col)
        draw.text((x + 2, 3), title, fill="black", font=font)
    for row in range(b):
        images = [panels.original[row], *panels.visible[row], *panels.reconstruction[row]]
        for col, image in enumerate(images):
            canvas.paste(_to_pil(image, layout.panel), layout.origin(row, col))
    return canvas


def first_images(batches, count: int) -> torch.Tensor:
    """The first ``count`` images of an iterable of ``{"images": ...}`` batches (padding rows skipped)."""
    taken: list[torch.Tensor] = []
    for batch in batches:
        images = batch["images"]
        if "valid" in batch:
            images = images[batch["valid"].bool()]
        taken.append(images)
        if sum(len(t) for t in taken) >= count:
            break
    if not taken:
        raise ValueError("no images")
    return torch.cat(taken)[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimae-viz", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="DeepSpeed checkpoint folder, or a run dir / checkpoints dir with `latest`")
    parser.add_argument("data", help="labelled shard set (a directory with manifest.json)")
    parser.add_argument("out", help="output PNG")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--config", help="config name or YAML path (default: the one stored with the checkpoint)")
    args = parser.parse_args(argv)

    from mimae_scale.evaluation.checkpoint import CheckpointError, load_model
    from mimae_scale.evaluation.cli import eval_loader

    try:
        model, ckpt = load_model(args.checkpoint, args.config)
        images = first_images(eval_loader(ckpt.cfg, args.data, torch.device("cpu"), args.num_images), args.num_images)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"mimae-viz: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    panels = reconstruction_panels(model, images, ckpt.cfg.data.mean, ckpt.cfg.data.std,
                                   torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(panels).save(out)
    print(f"mimae-viz: {out} ({len(images)} images, {model.num_masks} masks, {ckpt.path})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
