"""``mimae-export CKPT OUT --format timm|mae``: the pretrained encoder in the layouts fine-tuning code loads,
or a fine-tuned / probed classifier (``task: finetune | linprobe``) as a whole timm model (``timm`` only).

- ``timm``: a plain state dict that ``timm.create_model(name, num_classes=0, **model_args)`` loads
  with ``strict=True`` (our encoder's names are timm's; ``pos_embed`` already holds the cls row).
  ``OUT`` ending in ``.safetensors`` is written with safetensors, anything else with ``torch.save``.
  ``<OUT>.json`` records the timm model name and arguments.
- ``mae``: ``{"model": state_dict}`` with the encoder and decoder under the public MAE repository's
  names (``models_mae.MaskedAutoencoderViT``); its ``main_finetune.py`` / ``main_linprobe.py`` load
  it into ``models_vit`` with ``strict=False`` and find only ``head.*`` (and ``fc_norm.*`` with
  ``--global_pool``) missing. The MI heads (projector, approximation network) are not exported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mimae_scale.config import Config
from mimae_scale.evaluation.checkpoint import CheckpointError, load_checkpoint
from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_OK
from mimae_scale.fileio import atomic_path

ENCODER_PARAMS = ("cls_token", "pos_embed")
ENCODER_MODULES = ("patch_embed.", "blocks.", "norm.")
DECODER_PARAMS = ("mask_token", "decoder_pos_embed")
DECODER_MODULES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
# (embed_dim, depth, num_heads) of timm's named ViT sizes
TIMM_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large", (1280, 32, 16): "huge"}


def _select(state_dict: dict[str, torch.Tensor], params: tuple[str, ...], modules: tuple[str, ...]) -> dict:
    # clone: consolidated tensors can be views of one flat buffer, which torch.save would write whole
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items() if k in params or k.startswith(modules)}


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors under timm's VisionTransformer names."""
    return _select(state_dict, ENCODER_PARAMS, ENCODER_MODULES)


def mae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder and decoder under MAE's ``models_mae`` names (ours are the same)."""
    return _select(state_dict, ENCODER_PARAMS + DECODER_PARAMS, ENCODER_MODULES + DECODER_MODULES)


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


def create_timm_model(cfg: Config) -> torch.nn.Module:
    """An uninitialised timm ViT of the config's encoder shape, head removed."""
    import timm

    name, args = timm_model_spec(cfg)
    return timm.create_model(name, pretrained=False, num_classes=0, **args)


def _save(tensors: dict[str, torch.Tensor] | dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # never leave a half-written file under the final name
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)


def export(checkpoint: str | Path, out: str | Path, fmt: str, config: str | Path | None = None) -> dict[str, Any]:
    """Write ``out`` in ``fmt`` and return a summary (also written next to it as ``<out>.json``)."""
    out = Path(out)
    ckpt = load_checkpoint(checkpoint, config)
    if ckpt.cfg.task != "pretrain":
        return _export_classifier(ckpt, out, fmt)
    name, args = timm_model_spec(ckpt.cfg)
    if fmt == "timm":
        tensors = encoder_state_dict(ckpt.state_dict)
        _save(tensors, out)
    elif fmt == "mae":
        if out.suffix == ".safetensors":
            raise ValueError("--format mae writes a torch checkpoint ({'model': ...}); use a .pth name")
        tensors = mae_state_dict(ckpt.state_dict)
        _save({"model": tensors}, out)
    else:
        raise ValueError(f"unknown format {fmt!r} (timm or mae)")
    summary = {
        "format": fmt, "out": str(out), "checkpoint": str(ckpt.path), "zero_stage": ckpt.zero_stage,
        "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
        "timm_model": name, "timm_args": {"num_classes": 0, **args},
    }
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _export_classifier(ckpt, out: Path, fmt: str) -> dict[str, Any]:
    """A fine-tuned or probed classifier, head included, as the timm model its summary names: load it with
    ``timm.create_model(timm_model, pretrained=True, pretrained_cfg_overlay={"file": out,
    **pretrained_cfg_overlay}, **timm_args)`` (the overlay's class count keeps timm from dropping the head)."""
    from mimae_scale.model.classifier import timm_classifier_spec, timm_state_dict

    if fmt != "timm":
        raise ValueError(f"{ckpt.path} is a {ckpt.cfg.task} classifier: --format {fmt} is for pretrained encoders; "
                         "use --format timm")
    tensors = timm_state_dict(ckpt.cfg, ckpt.state_dict)
    _save(tensors, out)
    name, args = timm_classifier_spec(ckpt.cfg)
    summary = {
        "format": fmt, "out": str(out), "checkpoint": str(ckpt.path), "zero_stage": ckpt.zero_stage,
        "task": ckpt.cfg.task, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
        "timm_model": name, "timm_args": args, "pretrained_cfg_overlay": {"num_classes": args["num_classes"]},
    }
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimae-export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="DeepSpeed checkpoint folder (run_dir/checkpoints/<tag>), or a run "
                                           "dir / checkpoints dir whose `latest` names one")
    parser.add_argument("out", help="output file (.pth, or .safetensors for --format timm)")
    parser.add_argument("--format", choices=("timm", "mae"), default="timm")
    parser.add_argument("--config", help="config name or YAML path (default: the one stored with the checkpoint)")
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; stdout is the JSON summary
            summary = export(args.checkpoint, args.out, args.format, args.config)
    except (CheckpointError, ValueError) as exc:
        print(f"mimae-export: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(summary, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
