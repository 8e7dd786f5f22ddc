"""Reading a DeepSpeed checkpoint folder (any ZeRO stage) back into one fp32 model state dict.

What is loaded, and how:

- the model-states file (``mp_rank_00_model_states.pt``, or ``zero_pp_rank_0_mp_rank_00_model_states.pt``
  under ZeRO-3) is read with ``torch.load(weights_only=True)``: it holds the module's tensors, the
  DeepSpeed config (to learn the ZeRO stage) and the trainer's client state (the run's config);
- ZeRO 0 keeps the whole module in that file, so it is the state dict;
- ZeRO 1-3 keep the fp32 master weights partitioned in the ``*_optim_states.pt`` files. DeepSpeed's
  own consolidation (``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``)
  merges them. It calls ``torch.load(weights_only=False)``; we run it with ``torch.load`` forced to
  ``weights_only=True`` and allow-list exactly the four plain DeepSpeed classes those files pickle
  (loss scalers, the ZeRO stage enum, fragment addresses). Any other object in a file is refused
  instead of executed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

from mimae_scale.config import Config, ConfigError, config_from_dict, load_config
from mimae_scale.engine.checkpoint import CONFIG_KEY, MARKER, problems_in
from mimae_scale.model import MIMAE, build_model

MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be read; the message names the path."""


@dataclass
class Checkpoint:
    path: Path  # the tag folder
    tag: str
    zero_stage: int
    state_dict: dict[str, torch.Tensor]  # the whole MIMAE, fp32, on the CPU
    cfg: Config
    client_state: dict[str, Any]  # everything else in the model-states file that is not DeepSpeed's


def resolve_tag_folder(path: str | Path) -> Path:
    """A tag folder itself, or a run dir / ``checkpoints`` dir whose ``latest`` names one."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        latest = candidate / "latest"
        if latest.is_file():
            path = candidate / latest.read_text().strip()
            break
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not any((path / name).is_file() for name in MODEL_STATES_FILES):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint folder (none of {', '.join(MODEL_STATES_FILES)})")
    return path


_TORCH_LOAD = torch.load  # the real one, also while DeepSpeed's consolidation runs with it patched


def _deepspeed_safe_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(file: str | Path, **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` (DeepSpeed's plain classes allowed), CPU tensors."""
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return _TORCH_LOAD(file, weights_only=True, **kwargs)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError depending on the content
        raise CheckpointError(f"{file}: cannot be read safely (weights_only=True): {exc}") from exc


@contextlib.contextmanager
def _torch_load_weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's consolidation) goes through :func:`safe_load`."""

    def load(file: Any, *args: Any, **kwargs: Any) -> Any:
        if args:  # map_location given positionally
            kwargs["map_location"] = args[0]
        return safe_load(file, **kwargs)

    with mock.patch.object(torch, "load", load):
        yield


def _model_states(folder: Path) -> dict[str, Any]:
    for name in MODEL_STATES_FILES:
        if (folder / name).is_file():
            return safe_load(folder / name)
    raise CheckpointError(f"{folder}: no model-states file")  # pragma: no cover (resolve_tag_folder checked)


def _zero_stage(states: dict[str, Any], folder: Path) -> int:
    ds_config = states.get("ds_config") or {}
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{folder}: unknown ZeRO stage {stage}")
    return stage


def _consolidate(folder: Path, stage: int, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    if stage == 0:
        module = states["module"]
        low = sorted({str(v.dtype) for v in module.values() if v.is_floating_point() and v.dtype != torch.float32})
        if low:  # ZeRO 0 under bf16 keeps its fp32 master weights in the optimizer, which we do not read
            print(f"warning: {folder}: ZeRO-0 weights are stored as {', '.join(low)}; exporting those",
                  file=sys.stderr)
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _torch_load_weights_only(), contextlib.redirect_stdout(sys.stderr):  # its progress prints
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def config_for(folder: Path, states: dict[str, Any], override: str | Path | None = None) -> Config:
    """The run's config: ``override`` if given, else the client state's, else ``<run_dir>/config.yaml``."""
    if override is not None:
        return load_config(override)
    stored = states.get(CONFIG_KEY)
    try:
        if isinstance(stored, dict):
            return config_from_dict(stored)
        if isinstance(stored, str):
            return config_from_dict(yaml.safe_load(stored))
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: stored config is not usable: {exc}") from exc
    run_config = folder.parent.parent / "config.yaml"  # run_dir/checkpoints/<tag>/
    if run_config.is_file():
        return load_config(run_config)
    raise CheckpointError(
        f"{folder}: no config in the checkpoint's client state ({CONFIG_KEY!r}) and no {run_config}; pass --config"
    )


_DEEPSPEED_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version",
}


def verify(folder: Path) -> None:
    """A trainer checkpoint's files against the sizes and sha256 sums its completion marker lists
    (folders without a marker, e.g. written by other tools, are read as they are)."""
    marker = folder / MARKER
    if not marker.is_file():
        return
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable completion marker: {exc!r}") from None
    problems = problems_in(folder, files)
    if problems:
        raise CheckpointError(f"{folder} is damaged: " + "; ".join(problems))


def load_checkpoint(path: str | Path, config: str | Path | None = None) -> Checkpoint:
    folder = resolve_tag_folder(path)
    verify(folder)
    states = _model_states(folder)
    stage = _zero_stage(states, folder)
    cfg = config_for(folder, states, config)
    state_dict = _consolidate(folder, stage, states)
    client = {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}
    return Checkpoint(path=folder, tag=folder.name, zero_stage=stage, state_dict=state_dict, cfg=cfg,
                      client_state=client)


def load_model(path: str | Path, config: str | Path | None = None) -> tuple[MIMAE, Checkpoint]:
    """The checkpoint's MIMAE (strict load, eval mode, CPU fp32); a classifier's checkpoint is refused."""
    ckpt = load_checkpoint(path, config)
    if ckpt.cfg.task != "pretrain":
        raise CheckpointError(f"{ckpt.path}: a {ckpt.cfg.task} classifier checkpoint, not a pretrained encoder; "
                              "export the classifier with `mimae-export --format timm`")
    model = build_model(ckpt.cfg.model, ckpt.cfg.mask, ckpt.cfg.mi, ckpt.cfg.loss, kernels=ckpt.cfg.kernels.enabled)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the config's model: {exc}") from exc
    return model.eval(), ckpt
