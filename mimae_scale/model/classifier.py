"""The classifier of fine-tuning and linear probing: timm's VisionTransformer of the encoder's shape.

The engine trains timm's own module, so a checkpoint's weights carry timm's names and the exported
classifier is a plain timm state dict. Built as MAE's ``models_vit`` is:

- ``finetune``: global average pooling of the patch tokens with ``fc_norm`` (the encoder's final norm
  is dropped), stochastic depth ``finetune.drop_path_rate``, head initialised with std 2e-5;
- ``linprobe``: the cls token after the final norm, a ``BatchNorm1d(affine=False, eps=1e-6)`` before the
  linear head (std 0.01), every other parameter frozen.

``load_pretrained`` fills the encoder from a pretraining checkpoint or an exported encoder file and
refuses, in one line naming the file, anything that does not fit (another width, depth or patch size;
a classifier where an encoder is expected). Position embeddings of another grid are resampled
(``timm.layers.resample_abs_pos_embed``), so a 224 px encoder fine-tunes at 384 px.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mimae_scale.config import Config, ConfigError

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def timm_classifier_spec(cfg: Config) -> tuple[str, dict]:
    """timm model name and arguments of this run's classifier (what export records beside the weights)."""
    from mimae_scale.timm_spec import timm_model_spec

    name, args = timm_model_spec(cfg)
    linprobe = cfg.task == "linprobe"
    pool = "token" if linprobe else cfg.finetune.global_pool
    return name, {**args, "num_classes": cfg.finetune.num_classes, "global_pool": pool,
                  "drop_path_rate": 0.0 if linprobe else cfg.finetune.drop_path_rate}


def build_classifier(cfg: Config) -> nn.Module:
    """timm's VisionTransformer for ``cfg.task`` (finetune or linprobe), randomly initialised."""
    import timm

    name, args = timm_classifier_spec(cfg)
    model = timm.create_model(name, pretrained=False, **args)
    head = model.head
    nn.init.trunc_normal_(head.weight, std=0.01 if cfg.task == "linprobe" else 2e-5)  # MAE's heads
    nn.init.zeros_(head.bias)
    if cfg.task == "linprobe":
        model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        for pname, param in model.named_parameters():
            param.requires_grad = pname.startswith("head.")
    return model


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An exported encoder file: safetensors, or a torch file of tensors (``{"model": ...}`` as MAE's)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: one line naming it
        raise ConfigError(f"finetune.init {path}: cannot be read as weights: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # the MAE repository's checkpoints
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError(f"finetune.init {path}: not a state dict of tensors")
    return data


def _encoder_from(path: Path) -> dict[str, torch.Tensor]:
    """The encoder tensors (timm names) stored at ``path``: a checkpoint folder or a weights file."""
    if path.is_dir():
        from mimae_scale.evaluation.checkpoint import CheckpointError, load_checkpoint

        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            raise ConfigError(f"finetune.init {exc}") from None
        if ckpt.cfg.task != "pretrain":
            raise ConfigError(f"finetune.init {ckpt.path}: a {ckpt.cfg.task} classifier checkpoint "
                              f"({ckpt.cfg.finetune.num_classes} classes), not a pretrained encoder")
        tensors = ckpt.state_dict
    elif path.is_file():
        tensors = _read_tensors(path)
        if any(k.startswith("head.") for k in tensors):
            raise ConfigError(f"finetune.init {path}: holds a classifier head (head.*), not a pretrained encoder; "
                              "export the encoder alone")
    else:
        raise ConfigError(f"finetune.init {path}: no such checkpoint folder or weights file")
    encoder = {k: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIXES)}
    if "patch_embed.proj.weight" not in encoder:
        raise ConfigError(f"finetune.init {path}: no encoder weights (patch_embed.proj.weight missing)")
    return encoder


def _check_shape(path: Path, encoder: dict[str, torch.Tensor], cfg: Config) -> None:
    """One line naming what differs between the file's encoder and ``cfg.model``."""
    m = cfg.model
    width, chans, patch, _ = encoder["patch_embed.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in encoder if k.startswith("blocks.")), default=-1)
    mlp = encoder.get("blocks.0.mlp.fc1.weight")
    found = {"embed_dim": width, "patch_size": patch, "in_chans": chans, "depth": depth}
    wanted = {"embed_dim": m.embed_dim, "patch_size": m.patch_size, "in_chans": m.in_chans, "depth": m.depth}
    if mlp is not None:
        found["mlp_ratio"], wanted["mlp_ratio"] = mlp.shape[0] / width, m.mlp_ratio
    diffs = [f"{k} {found[k]} in the file, model.{k} {wanted[k]}" for k in wanted if found[k] != wanted[k]]
    if diffs:
        raise ConfigError(f"finetune.init {path}: another encoder shape: " + "; ".join(diffs))


def load_pretrained(model: nn.Module, cfg: Config) -> dict[str, list[str]]:
    """Fill ``model``'s encoder from ``cfg.finetune.init``; returns the keys left to their initialisation
    (``missing``: the head, fc_norm) and the file's keys not used (``unused``: the final norm under
    average pooling), which the trainer logs."""
    path = Path(cfg.finetune.init)
    return load_encoder(model, _encoder_from(path), cfg, path)


def load_encoder(model: nn.Module, encoder: dict[str, torch.Tensor], cfg: Config,
                 path: Path | str) -> dict[str, list[str]]:
    """``load_pretrained``'s check and load of encoder tensors (timm names) that came from ``path``
    (a file, or words saying where they came from)."""
    from timm.layers import resample_abs_pos_embed

    encoder = {k: v for k, v in encoder.items() if k.startswith(ENCODER_PREFIXES)}
    _check_shape(path, encoder, cfg)
    own = model.state_dict()
    pos = encoder["pos_embed"]
    if pos.shape != own["pos_embed"].shape:  # another image size: resample the grid (the cls row is kept)
        side = round((own["pos_embed"].shape[1] - 1) ** 0.5)
        encoder["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=[side, side], num_prefix_tokens=1)
    unused = [k for k in encoder if k not in own]  # norm.* when fc_norm replaces it
    result = model.load_state_dict({k: v for k, v in encoder.items() if k in own}, strict=False)
    expected_missing = ("head.", "fc_norm.")
    odd = [k for k in result.missing_keys if not k.startswith(expected_missing)]
    if odd:
        raise ConfigError(f"finetune.init {path}: encoder weights missing from the file: {', '.join(odd[:5])}")
    return {"missing": list(result.missing_keys), "unused": unused}


def timm_state_dict(cfg: Config, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A classifier checkpoint's weights as the plain timm model of ``timm_classifier_spec`` takes them.
    A linear probe's ``BatchNorm1d(affine=False)`` is folded into its linear head (W' = W / sqrt(var + eps),
    b' = b - W' mean): the same function, a timm model with a plain linear head."""
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if cfg.task == "linprobe":
        mean, var = tensors.pop("head.0.running_mean").double(), tensors.pop("head.0.running_var").double()
        tensors.pop("head.0.num_batches_tracked", None)
        weight, bias = tensors.pop("head.1.weight").double(), tensors.pop("head.1.bias").double()
        folded = weight / torch.sqrt(var + 1e-6)  # the probe's BatchNorm eps (build_classifier)
        tensors["head.weight"] = folded.float()
        tensors["head.bias"] = (bias - folded @ mean).float()
    return tensors
