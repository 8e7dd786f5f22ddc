"""The timm model an encoder config corresponds to (its name and arguments).

Its own module, below both users: mimae-export (evaluation/export.py) records it beside exported
weights and the fine-tuning classifier (model/classifier.py) builds from it; each imported the other
while it lived in export.py.
"""

from __future__ import annotations

from typing import Any

from mimae_scale.config import Config

# (embed_dim, depth, num_heads) of timm's named ViT sizes
TIMM_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large", (1280, 32, 16): "huge"}


def timm_model_spec(cfg: Config) -> tuple[str, dict[str, Any]]:
    """timm model name and the arguments it needs besides ``num_classes=0``.

    A standard shape maps to its own name (``vit_large_patch16_224``) with no arguments; any other
    shape (the tiny CPU model) is timm's VisionTransformer built with explicit arguments.
    """
    import timm

    m = cfg.model
    size = TIMM_SIZES.get((m.embed_dim, m.depth, m.num_heads))
    name = f"vit_{size}_patch{m.patch_size}_{m.img_size}"
    if size and m.mlp_ratio == 4.0 and m.in_chans == 3 and timm.is_model(name):
        return name, {}
    args = {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans, "embed_dim": m.embed_dim,
            "depth": m.depth, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio}
    return "vit_base_patch16_224", args
