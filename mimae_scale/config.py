"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` overrides.

One :class:`Config` describes a run. Defaults are the MI-MAE ViT-B/16 recipe of docs/METHOD.md; the YAML
files in ``mimae_scale/configs/`` state only what differs. Loading refuses bad input before any
work starts, with a :class:`ConfigError` that names the field: unknown keys, wrong types, values
out of range and combinations that cannot work.

Every field's meaning is the comment on its line (a longer reason, where one is needed, stands above
it). docs/TRAINING.md ("Configuration keys") lists every key with its default; tests/test_docs.py
checks that table against these dataclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the field."""


@dataclass
class ModelConfig:
    """The ViT encoder and the MAE decoder (timm ``Block``s, fixed 2-D sin-cos positions)."""

    img_size: int = 224  # side of the square training image, pixels
    patch_size: int = 16  # side of a patch, pixels (img_size must be a multiple)
    in_chans: int = 3  # image channels
    embed_dim: int = 768  # encoder width
    depth: int = 12  # encoder blocks
    num_heads: int = 12  # encoder attention heads (must divide embed_dim)
    decoder_embed_dim: int = 512  # decoder width
    decoder_depth: int = 8  # decoder blocks
    decoder_num_heads: int = 16  # decoder attention heads (must divide decoder_embed_dim)
    mlp_ratio: float = 4.0  # MLP hidden width over block width, encoder and decoder


@dataclass
class MaskConfig:
    """The K masks drawn per image (docs/METHOD.md, "Masks")."""

    num_masks: int = 4  # K masks per image, batched as B*K rows; 1 is plain MAE
    ratio: float = 0.75  # share of patches each mask hides
    strategy: Literal["orthogonal", "independent"] = "orthogonal"  # orthogonal: disjoint visible sets


@dataclass
class ClubConfig:
    """CLUB's approximation network q(x|z) and how it is trained (docs/METHOD.md, "L_min")."""

    # pairs: visible token & its patch; pooled view & small image; image's latent (mean of its K views) & image
    level: Literal["token", "global", "image"] = "token"
    hidden_dim: int = 512  # width of the approximation network's two MLPs (ours)
    global_size: int = 8  # `global` level: side of the down-sampled image z is paired with (ours)
    # q has its own optimiser (Adam, constant lr, no weight decay, no warm-up: CLUB's recipe) and takes
    # q_steps updates on the current step's detached pairs before the encoder's L_min is computed.
    q_lr: float = 1e-3  # learning rate of q's own Adam
    q_steps: int = 5  # q updates per training step, before L_min
    variance: Literal["learned", "fixed"] = "learned"  # fixed: unit variance, q predicts the mean (CLUBMean)
    detach_logvar: bool = False  # L_min moves the encoder through q's mean only
    target: Literal["norm", "raw"] = "norm"  # x: per-patch normalised pixels (as the reconstruction) or raw
    reduction: Literal["mean", "sum"] = "mean"  # over x's dims: mean keeps w_min's strength independent of P
    # q's log-variance: null leaves it unbounded; a number c soft-caps it to (-c, c) by c*tanh(./c) (1: CLUB's Tanh)
    logvar_cap: float | None = None
    # L_min's negatives: every row, exact (diagonal Gaussian q), or one random partner per row (CLUBSample);
    # closed_form's gradient varies less at every level (python -m mimae_scale.club_bench, docs/METHOD.md)
    negatives: Literal["sampled", "closed_form"] = "closed_form"


@dataclass
class MIConfig:
    """The mutual-information terms: InfoNCE (L_max) and CLUB (L_min, ``club``)."""

    pool: Literal["mean", "cls"] = "mean"  # view latent fed to InfoNCE's projector: patch-token mean or cls
    tau: float = 0.2  # InfoNCE temperature
    proj_hidden_dim: int = 2048  # InfoNCE projector's hidden width
    proj_dim: int = 256  # InfoNCE projector's output width
    negatives: Literal["global", "local"] = "global"  # InfoNCE negatives: all ranks' views, or this rank's
    club: ClubConfig = field(default_factory=ClubConfig)  # CLUB's approximation network q (below)


@dataclass
class LossConfig:
    """Weights of the encoder's objective: w_rec * L_rec + w_max * L_max + w_min * L_min."""

    w_rec: float = 1.0  # weight of the reconstruction loss (MAE's normalised-pixel MSE)
    w_max: float = 0.1  # weight of InfoNCE between the masks' latents; 0 turns it off
    # On the per-dim mean CLUB estimate (mi.club.reduction). The spec's 0.05 on the sum over a ViT-B/16
    # patch's 768 dims would be 38.4 here: with a fitted q that stalls reconstruction. 0.1 was chosen on the
    # demo's validation split from {0.1, 0.5, 2.4, 10, 38.4} (docs/METHOD.md).
    w_min: float = 0.1  # weight of the CLUB upper bound; 0 turns L_min and q off
    w_min_warmup_epochs: float = 0.0  # w_min rises linearly from 0 over these epochs (ours)


@dataclass
class DataConfig:
    """The input pipeline (docs/DATA.md)."""

    backend: Literal["dali", "webdataset", "synthetic"] = "dali"  # reader: DALI, webdataset + PIL, random tensors
    train_shards: str = ""  # directory holding manifest.json, or a brace pattern of tar files; may be remote (s3://...)
    val_shards: str = ""  # held-out labelled shards (online kNN monitor, evaluation)
    num_threads: int = 4  # decode threads per rank (DALI's pipeline threads, webdataset's pool)
    shuffle_buffer: int = 4096  # DALI's `initial_fill` / webdataset's shuffle window
    hw_decoder_load: float = 0.65  # share of JPEGs DALI gives the GPU's hardware decoder (0-1)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random-resized-crop area range, share of the image
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # random-resized-crop aspect-ratio range
    hflip: bool = True  # random horizontal flip
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel normalisation mean (0-1 pixels)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # per-channel normalisation std
    # append to <run_dir>/samples/rankNNNNN.jsonl every training sample each rank hands out ("tar/key";
    # with the world size, epoch, batch, and whether the pass is the rest of an epoch begun on another
    # layout), to audit that an epoch used every sample once
    trace_samples: bool = False
    # an S3-compatible store's endpoint (http://host:port) for s3:// shards; empty: AWS_ENDPOINT_URL or AWS.
    # Exported as AWS_ENDPOINT_URL, the one setting DALI's S3 client reads (docs/DATA.md)
    s3_endpoint_url: str = ""
    # a local directory that s3:// shards are copied to, a whole tar per request, and read from (DALI reads
    # s3:// one request per sample component: latency bound); empty: read from the store (docs/DATA.md)
    remote_cache: str = ""
    remote_cache_gb: float = 0.0  # at most this many GB in remote_cache (least recently used go first); 0: no limit


@dataclass
class FinetuneConfig:
    """Fine-tuning and linear probing (``task: finetune | linprobe``, docs/FINETUNE.md): MAE's recipe.

    The classifier is timm's VisionTransformer of ``model``'s encoder shape; the decoder fields, ``mask``,
    ``mi`` and ``loss`` are not used by these tasks."""

    # a pretraining run dir, checkpoints dir or tag folder, or an encoder file from mimae-export
    # (.pth/.safetensors, timm names) or the MAE repository ({"model": ...}); "" = random initialisation
    init: str = ""  # the pretrained encoder the classifier starts from
    num_classes: int = 1000  # classes of the head; labels must lie in [0, num_classes)
    global_pool: Literal["avg", "token"] = "avg"  # avg: patch mean + fc_norm (fine-tune); token: cls + final norm
    drop_path_rate: float = 0.1  # stochastic depth of the encoder blocks (B 0.1, L 0.2, H 0.3)
    layer_decay: float = 0.65  # lr of block i scaled by layer_decay^(depth + 1 - i) (1.0: off)
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's RandAugment string ("" = off; linprobe: off)
    reprob: float = 0.25  # random-erasing probability per image (timm's RandomErasing, mode pixel)
    mixup: float = 0.8  # Mixup alpha (0 = off)
    cutmix: float = 1.0  # CutMix alpha (0 = off); with both on, each batch is one or the other (50/50)
    label_smoothing: float = 0.1  # smoothing of the (mixed) targets
    ema_decay: float | None = None  # weight EMA (timm's ModelEmaV3) with this decay, evaluated beside; null: off
    eval_every_epochs: int = 1  # top-1/top-5 on data.val_shards every N epochs (0 = only at the end)


@dataclass
class OptimConfig:
    """AdamW with MAE's parameter groups and schedule (docs/TRAINING.md); LARS for linear probing."""

    # lars: timm's Lars (momentum 0.9, trust ratio on weights with more than one dimension only);
    # needs engine.zero_stage 0, since ZeRO hands the optimiser flat partitions instead of layers
    name: Literal["adamw", "lars"] = "adamw"  # the optimiser
    base_lr: float = 1.5e-4  # lr = base_lr * global image batch / 256
    weight_decay: float = 0.05  # AdamW weight decay (none on biases, norms, tokens, positions)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_epochs: float = 40.0  # linear warm-up from 0 to the peak lr
    min_lr: float = 0.0  # end of the half-cycle cosine after warm-up
    clip_grad: float | None = None  # gradient-norm clipping; null: none


@dataclass
class TrainConfig:
    """Schedule, batch split and logging."""

    epochs: int = 1600  # length of the schedule (lr and progress follow it)
    global_batch: int = 4096  # images per optimiser step, over all ranks and accumulation
    micro_batch: int = 64  # images per rank per forward
    max_steps: int | None = None  # stop early (tests, benchmarks); the schedule still uses epochs
    steps_per_epoch: int | None = None  # synthetic backend's micro-batches per epoch (null: 100); shards: from the data
    log_every: int = 20  # log, sync the ranks and act on stop signals every N steps
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops with exit 3


@dataclass
class EngineConfig:
    """The DeepSpeed engine: ZeRO stage, precision, compilation, communication tuning."""

    zero_stage: int = 1  # DeepSpeed ZeRO stage, 0-3
    # auto: bf16 on GPU, fp32 on CPU. bf16: DeepSpeed's bf16 mode (the whole module in bf16, fp32 master
    # copy in the optimiser); amp: fp32 weights and buffers, the forward under bf16 autocast (docs/PERFORMANCE.md)
    precision: Literal["auto", "bf16", "amp", "fp32"] = "auto"  # training precision (mimae_scale/precision.py)
    compile: bool = False  # torch.compile each transformer block (model.compile_blocks); not fingerprinted
    # Communication tuning (docs/SCALING.md), passed to DeepSpeed's zero_optimization; null keeps
    # DeepSpeed's own default. Sizes are elements, not bytes.
    overlap_comm: bool | None = None  # reduce gradient buckets during the backward
    reduce_bucket_size: int | None = None  # gradient bucket (DeepSpeed default 5e8: one bucket, no overlap)
    allgather_bucket_size: int | None = None  # ZeRO 1/2 parameter all-gather bucket
    prefetch_bucket_size: int | None = None  # ZeRO 3 parameters fetched ahead of the forward


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept (docs/CHECKPOINTS.md)."""

    every_steps: int = 1000  # save every N optimiser steps
    every_minutes: float = 30.0  # also save when this long has passed (rank 0's clock, at a log step)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted


@dataclass
class KernelsConfig:
    """The Triton kernels (docs/KERNELS.md)."""

    enabled: Literal["auto", "on", "off"] = "auto"  # auto: kernels on CUDA tensors; on: always; off: references


@dataclass
class MetricsConfig:
    """Each rank's Prometheus exporter (docs/MONITORING.md, docs/METRICS.md)."""

    enabled: bool = True  # serve the exporter
    port_base: int = 9410  # exporter of local rank r on port_base + r; 9400 is the DCGM exporter's default
    bind_address: str = "127.0.0.1"  # address the exporters listen on (0.0.0.0 for a central Prometheus)
    peak_tflops: float | None = None  # the data sheet's dense bf16 peak (second MFU); a per-GPU default when unset
    # MFU denominator: a bf16 matmul rate this GPU reaches. null: measured at start (flops.measure_matmul_tflops)
    ceiling_tflops: float | None = None  # MFU's denominator, TFLOP/s
    job: str = ""  # Prometheus `job` label; empty: $SLURM_JOB_NAME, else the run directory's name


@dataclass
class EvalConfig:
    """The online kNN monitor during training (docs/EVALUATION.md)."""

    knn_every_epochs: int = 0  # online kNN monitor on data.val_shards; 0 = off
    knn_k: int = 20  # neighbours that vote
    knn_temperature: float = 0.07  # votes weighted exp(similarity / temperature)
    pool: Literal["cls", "mean"] = "mean"  # the monitor's features: cls token or patch mean (mimae-eval: --pool)


@dataclass
class TrackingConfig:
    """Run tracking for comparing runs, rank 0 only: TensorBoard and Weights & Biases (docs/MONITORING.md)."""

    tensorboard: bool = True  # TensorBoard event files in <run_dir>/tensorboard (the `tracking` extra)
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline: no network, sync later)
    wandb_project: str = "mimae_scale"  # the W&B project the run goes to
    image_every_steps: int = 1000  # reconstruction grid of a fixed batch every N steps; 0 = none


# The sections a resumed run must share with its checkpoint (everything else may change on resume);
# the fingerprint hashes them, and the model is built from them alone (mimae_scale.model.build_model).
METHOD_SECTIONS = ("model", "mask", "mi", "loss")


# What a classifier's modules depend on: with the task, part of the method of a fine-tuning or probing run
# (a pretraining run's method, and so its fingerprint, leaves them out)
CLASSIFIER_KEYS = ("num_classes", "global_pool")


def method_sections(config: dict[str, Any]) -> dict[str, Any]:
    """The method sections of a config as plain data (a run's ``Config.to_dict()``, or a checkpoint's)."""
    sections = {k: config.get(k) for k in METHOD_SECTIONS}
    task = config.get("task", "pretrain")
    if task != "pretrain":
        sections["task"] = task
        sections["finetune"] = {k: (config.get("finetune") or {}).get(k) for k in CLASSIFIER_KEYS}
    return sections


@dataclass
class Config:
    """One run: the top-level keys and one section per concern."""

    # pretrain: MI-MAE (or MAE); finetune: end-to-end classification from a pretrained encoder;
    # linprobe: a BatchNorm + linear head on the frozen encoder (docs/FINETUNE.md)
    task: Literal["pretrain", "finetune", "linprobe"] = "pretrain"  # what the one trainer trains
    run_dir: str = "runs/default"  # where config.yaml, logs, metrics.jsonl and checkpoints/ go; keep it to resume
    seed: int = 0  # initial weights, masks, augmentation and loader order
    deterministic: bool = False  # torch's deterministic algorithms: a resumed run repeats its losses (CPU: bit for bit)
    model: ModelConfig = field(default_factory=ModelConfig)  # encoder and decoder shapes
    mask: MaskConfig = field(default_factory=MaskConfig)  # the K masks
    mi: MIConfig = field(default_factory=MIConfig)  # InfoNCE and CLUB
    loss: LossConfig = field(default_factory=LossConfig)  # weights of the loss terms
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # classifier tasks (task != pretrain)
    data: DataConfig = field(default_factory=DataConfig)  # input pipeline
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the lr schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # schedule, batches, logging
    engine: EngineConfig = field(default_factory=EngineConfig)  # DeepSpeed settings
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoint cadence
    kernels: KernelsConfig = field(default_factory=KernelsConfig)  # Triton kernels or references
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus exporters
    eval: EvalConfig = field(default_factory=EvalConfig)  # online kNN monitor
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # TensorBoard and W&B

    @property
    def num_patches(self) -> int:
        return (self.model.img_size // self.model.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method(self) -> dict[str, Any]:
        """The sections that define the model and the method: a checkpoint resumes only under equal ones."""
        return method_sections(self.to_dict())

    def fingerprint(self) -> str:
        """Hash of :meth:`method` (not paths, batch sizes, layout or logging)."""
        return hashlib.sha256(json.dumps(self.method(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks that name the field


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (kernels.enabled=on) as a boolean
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string: accept numbers written that way.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    obj = cls()
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        # a nested section starts from its own defaults, so a file can set one key of it
        setattr(obj, name, _coerce(value, hints[name], where))
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value read as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {exc}") from None
    return parts, value


def resolve_path(name: str | Path) -> Path:
    """A config given as a path, or as the name of a shipped config (``mimae_vit_b16``)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name}: no such file and no shipped config of that name ({known})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or a shipped config's name), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_path(path)
        try:
            loaded = yaml.safe_load(resolved.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{resolved}: the top level must be a mapping")
        data = loaded or {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts)}: {part} is not a section")
        node[parts[-1]] = value
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation of values and combinations


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Refuse settings that cannot work. With ``world_size`` the batch split is checked too."""
    m = cfg.model
    for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                 "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        _check(getattr(m, name) > 0, f"model.{name}", "must be positive")
    _check(m.img_size % m.patch_size == 0, "model.img_size",
           f"{m.img_size} is not a multiple of patch_size {m.patch_size}")
    _check(m.embed_dim % m.num_heads == 0, "model.num_heads", f"must divide embed_dim {m.embed_dim}")
    _check(m.decoder_embed_dim % m.decoder_num_heads == 0, "model.decoder_num_heads",
           f"must divide decoder_embed_dim {m.decoder_embed_dim}")
    _check(m.embed_dim % 4 == 0 and m.decoder_embed_dim % 4 == 0, "model.embed_dim",
           "2-D sin-cos position embeddings need widths divisible by 4")

    k, ratio = cfg.mask.num_masks, cfg.mask.ratio
    _check(k >= 1, "mask.num_masks", "must be at least 1")
    _check(0.0 < ratio < 1.0, "mask.ratio", f"must lie in (0, 1), got {ratio}")
    keep = round(cfg.num_patches * (1.0 - ratio))
    _check(keep >= 1, "mask.ratio", f"leaves no visible patch of {cfg.num_patches}")
    if cfg.mask.strategy == "orthogonal":
        _check(k * (1.0 - ratio) <= 1.0 + 1e-9, "mask.strategy",
               f"orthogonal masks need K*(1-ratio) <= 1, got K={k}, ratio={ratio}")
        _check(k * keep <= cfg.num_patches, "mask.num_masks",
               f"{k} disjoint masks of {keep} visible patches do not fit in {cfg.num_patches}")

    for name in ("w_rec", "w_max", "w_min"):
        _check(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be >= 0")
    _check(cfg.loss.w_max == 0 or k >= 2, "loss.w_max", "the InfoNCE term needs mask.num_masks >= 2")
    _check(cfg.mi.tau > 0, "mi.tau", "must be positive")
    _check(cfg.mi.proj_dim > 0 and cfg.mi.proj_hidden_dim > 0, "mi.proj_dim", "must be positive")
    _check(cfg.mi.club.hidden_dim > 0, "mi.club.hidden_dim", "must be positive")
    _check(cfg.mi.club.global_size > 0, "mi.club.global_size", "must be positive")
    _check(cfg.mi.club.q_lr > 0, "mi.club.q_lr", "must be positive")
    _check(cfg.mi.club.q_steps >= 1, "mi.club.q_steps", "must be at least 1 (q must be fitted before L_min)")
    cap = cfg.mi.club.logvar_cap
    _check(cap is None or cap > 0, "mi.club.logvar_cap", f"must be positive or null, got {cap}")
    _check(cfg.loss.w_min_warmup_epochs >= 0, "loss.w_min_warmup_epochs", "must be >= 0")

    d = cfg.data
    _check(d.num_threads >= 1, "data.num_threads", "must be at least 1")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be at least 1")
    _check(0.0 <= d.hw_decoder_load <= 1.0, "data.hw_decoder_load", "must lie in [0, 1]")
    _check(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "must be 0 < lo <= hi <= 1")
    _check(0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", "must be 0 < lo <= hi")
    _check(all(s > 0 for s in d.std), "data.std", "must be positive")

    f = cfg.finetune
    _check(f.num_classes >= 1, "finetune.num_classes", "must be at least 1")
    _check(0 <= f.drop_path_rate < 1, "finetune.drop_path_rate", "must lie in [0, 1)")
    _check(0 < f.layer_decay <= 1, "finetune.layer_decay", "must lie in (0, 1]")
    _check(0 <= f.reprob <= 1, "finetune.reprob", "must lie in [0, 1]")
    _check(f.mixup >= 0 and f.cutmix >= 0, "finetune.mixup", "Mixup and CutMix alphas must be >= 0")
    _check(0 <= f.label_smoothing < 1, "finetune.label_smoothing", "must lie in [0, 1)")
    _check(f.ema_decay is None or 0 < f.ema_decay < 1, "finetune.ema_decay", "must lie in (0, 1) or be null")
    _check(f.eval_every_epochs >= 0, "finetune.eval_every_epochs", "must be >= 0")
    if f.rand_augment:
        _check(re.fullmatch(r"rand(-[a-z]+[0-9.]+)*", f.rand_augment) is not None, "finetune.rand_augment",
               f"{f.rand_augment!r}: expected timm's form, e.g. rand-m9-mstd0.5-inc1")
    if cfg.task != "pretrain":
        _check(bool(cfg.data.val_shards), "data.val_shards",
               f"task {cfg.task} reports top-1 on labelled held-out shards")
        _check((f.mixup == 0 and f.cutmix == 0) or cfg.train.micro_batch % 2 == 0, "train.micro_batch",
               "Mixup/CutMix pair each image with another of its micro-batch: use an even micro-batch")
        _check(f.ema_decay is None or cfg.engine.zero_stage < 3, "finetune.ema_decay",
               "the weight EMA needs whole parameters on every rank: use engine.zero_stage 0-2")
    _check(cfg.optim.name != "lars" or (cfg.engine.zero_stage == 0 and cfg.engine.precision != "bf16"),
           "optim.name", "LARS's per-layer trust ratio needs whole parameters; ZeRO 1-3 and DeepSpeed's bf16 mode "
           "hand the optimiser flat partitions: set engine.zero_stage=0 and engine.precision to auto, amp or fp32")
    _check(cfg.task == "pretrain" or cfg.eval.knn_every_epochs == 0, "eval.knn_every_epochs",
           f"the online kNN monitor is for pretraining; task {cfg.task} reports top-1 (finetune.eval_every_epochs)")

    o = cfg.optim
    _check(o.base_lr > 0, "optim.base_lr", "must be positive")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", "must lie in [0, 1)")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(o.min_lr >= 0, "optim.min_lr", "must be >= 0")
    _check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", "must be positive or null")

    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", "must be at least 1")
    _check(t.global_batch >= 1, "train.global_batch", "must be at least 1")
    _check(t.micro_batch >= 1, "train.micro_batch", "must be at least 1")
    _check(t.global_batch % t.micro_batch == 0, "train.global_batch",
           f"{t.global_batch} is not a multiple of train.micro_batch {t.micro_batch}")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1 or null")
    _check(t.steps_per_epoch is None or t.steps_per_epoch >= 1, "train.steps_per_epoch", "must be at least 1 or null")
    _check(t.log_every >= 1, "train.log_every", "must be at least 1")
    _check(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be at least 1")
    if world_size is not None:
        grad_accumulation(cfg, world_size)

    _check(cfg.engine.zero_stage in (0, 1, 2, 3), "engine.zero_stage", "must be 0, 1, 2 or 3")
    for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
        size = getattr(cfg.engine, name)
        _check(size is None or size >= 1, f"engine.{name}", "must be a positive number of elements or null")
    c = cfg.checkpoint
    _check(c.every_steps >= 1, "checkpoint.every_steps", "must be at least 1")
    _check(c.every_minutes > 0, "checkpoint.every_minutes", "must be positive")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    _check(0 < cfg.metrics.port_base < 65536, "metrics.port_base", "must be a TCP port")
    for name in ("peak_tflops", "ceiling_tflops"):
        value = getattr(cfg.metrics, name)
        _check(value is None or value > 0, f"metrics.{name}", "must be positive or null")
    _check(re.fullmatch(r"[A-Za-z0-9_.:-]*", cfg.metrics.job) is not None, "metrics.job",
           f"{cfg.metrics.job!r}: use letters, digits and _ . : - only (it becomes a label value and a file name)")
    _check(cfg.eval.knn_every_epochs >= 0, "eval.knn_every_epochs", "must be >= 0")
    _check(cfg.eval.knn_k >= 1, "eval.knn_k", "must be at least 1")
    _check(cfg.eval.knn_temperature > 0, "eval.knn_temperature", "must be positive")
    _check(cfg.eval.knn_every_epochs == 0 or bool(cfg.data.val_shards), "data.val_shards",
           "the online kNN monitor (eval.knn_every_epochs > 0) needs a held-out shard set")
    tr = cfg.tracking
    _check(tr.image_every_steps >= 0, "tracking.image_every_steps", "must be >= 0 (0: no images)")
    _check(not tr.wandb or bool(tr.wandb_project.strip()), "tracking.wandb_project", "must name a project")
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        _check(not getattr(tr, name) or importlib.util.find_spec(module) is not None, f"tracking.{name}",
               f"the {module} package is not installed: pip install 'mimae-scale[tracking]', or set "
               f"tracking.{name}=false")


def grad_accumulation(cfg: Config, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimiser step (global = micro * world * accum): the one
    place this is computed; the trainer hands the value to DeepSpeed's config. ConfigError when the
    global batch does not split."""
    t = cfg.train
    per_step = t.micro_batch * world_size
    _check(per_step >= 1 and t.global_batch % per_step == 0, "train.global_batch",
           f"{t.global_batch} images do not split into micro-batches of {t.micro_batch} on {world_size} ranks")
    return t.global_batch // per_step


def dump_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML (tuples written as lists), for the run directory."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from plain data (``cfg.to_dict()``, a checkpoint's stored config)."""
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg
