"""The ``step`` section: the real ``Trainer.train_step`` through DeepSpeed, timed against a plain
PyTorch step and a bf16 matmul ceiling measured in the same process.

For each model (MI-MAE K 4 and MAE at ViT-L/16 and ViT-B/16), each ``engine.precision`` asked for
(``bf16``: DeepSpeed's bf16 mode; ``amp``: fp32 weights + bf16 autocast) and, where asked,
``engine.compile``: a Trainer is set up as ``train.py`` would (ZeRO 1, one rank, synthetic data
made on the device, metrics not served, nothing saved) and ``train_step`` runs on one
device-resident batch. Reported: images/s, model TFLOP/s (mimae_scale.flops' count), MFU against
the measured ceiling and against the data sheet, host synchronisations per step, peak memory, and a
forward / backward / optimiser split (one more step with CUDA events between DeepSpeed's three
calls). Eager runs come first, compiled ones (inductor takes a minute or more per model) last.
The plain step is the same model (and CLUB critic) in fp32 with bf16 autocast and torch's fused
AdamW, no DeepSpeed: ``engine_over_plain`` is what the engine costs.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mimae_scale.config import load_config
from mimae_scale.flops import default_peak_tflops, measure_matmul_tflops, train_flops_per_image
from mimae_scale.gpubench import Context

# name -> (shipped config, overrides, micro-batch per GPU)
MODELS = {
    "mimae_b": ("mimae_vit_b16", [], 256),
    "mimae_l": ("mimae_vit_l16", [], 128),
    "mae_b": ("mae_vit_b16", [], 256),
    "mae_l": ("mimae_vit_l16", ["mask.num_masks=1", "loss.w_max=0", "loss.w_min=0"], 128),
    "finetune_b": ("finetune_vit_b16", [], 128),  # MAE's ViT-B fine-tuning recipe
}
SMOKE_MODELS = {
    "mimae_b": ("tiny", [], 8),
    "mae_b": ("tiny", ["mask.num_masks=1", "loss.w_max=0", "loss.w_min=0"], 8),
    "finetune_b": ("finetune_tiny", [], 8),
}


def held_out_shards(scratch: str | Path) -> str:
    """A tiny labelled held-out tar (the demo's patterns) for the classifier configs, which need one to
    start; the step timings never read it."""
    from mimae_scale.data_tools.demo import write_demo

    root = Path(scratch) / "held_out"
    if not (root / "val" / "manifest.json").exists():
        write_demo(root, train_per_class=1, val_per_class=1)
    return str(root / "val" / "val-000000.tar")


def _config(name: str, smoke: bool, run_dir: str, extra: list[str]):
    """The model's shipped config, one rank, one micro-batch per step, synthetic data, no exporter."""
    base, overrides, micro = (SMOKE_MODELS if smoke else MODELS)[name]
    if base.startswith("finetune"):
        overrides = [*overrides, f"data.val_shards={held_out_shards(run_dir)}"]
    return load_config(base, [*overrides, f"train.micro_batch={micro}", f"train.global_batch={micro}",
                              "data.backend=synthetic", "metrics.enabled=false", f"run_dir={run_dir}",
                              "engine.zero_stage=1", *extra])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, the device drained before and after ``steps`` back-to-back steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - began) / steps


def _host_syncs(step, device: torch.device) -> int | None:
    """Host synchronisations one step makes (CUDA's sync debug mode warns on each)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _split(forward, backward, optimizer_step, device: torch.device) -> dict[str, float]:
    """Milliseconds of the forward, backward and optimiser step of one more step."""
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        loss = forward()
        marks[1].record()
        backward(loss)
        marks[2].record()
        optimizer_step()
        marks[3].record()
        marks[3].synchronize()
        times = [marks[i].elapsed_time(marks[i + 1]) for i in range(3)]
    else:
        stamps = [time.perf_counter()]
        loss = forward()
        stamps.append(time.perf_counter())
        backward(loss)
        stamps.append(time.perf_counter())
        optimizer_step()
        stamps.append(time.perf_counter())
        times = [1e3 * (stamps[i + 1] - stamps[i]) for i in range(3)]
    return dict(zip(("forward_ms", "backward_ms", "optimizer_ms"), times, strict=True))


def engine_step(cfg, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Trainer.setup() + train_step() on one device-resident batch, as train.py runs it."""
    from mimae_scale.engine.distributed import detect_env
    from mimae_scale.engine.signals import StopRequest
    from mimae_scale.engine.trainer import Trainer, mask_seed
    from mimae_scale.precision import autocast

    _reset_memory(device)
    trainer = Trainer(cfg, detect_env({}), StopRequest())
    trainer.setup()
    try:
        batch = next(iter(trainer.loader))

        def step():
            trainer.train_step(iter([batch]))

        seconds = _rate(step, device, warmup, steps)
        engine = trainer.engine
        images = batch["images"].to(trainer.input_dtype)

        def forward():
            gen = torch.Generator(device).manual_seed(mask_seed(cfg.seed, 0, trainer.step + 1, 0))
            with autocast(trainer.precision, device):
                return trainer.task.forward(engine, batch, images, gen, trainer.step, trainer.steps_per_epoch).loss

        split = _split(forward, engine.backward, engine.step, device)
        out = {"step_s": seconds, "host_syncs_per_step": _host_syncs(step, device), **split, **_memory(device),
               "applied": bool(engine.was_step_applied())}
    finally:
        trainer.metrics.close()
        trainer = None  # the engine and its buffers go before the next run's are built
        _reset_memory(device)
    return out


def _plain_rate(forward, opt: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int
                ) -> dict[str, Any]:
    """Seconds per plain step (``forward``, its backward, ``opt``'s step), its split and peak memory."""

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        forward().backward()
        optimizer_step()

    seconds = _rate(step, device, warmup, steps)
    return {"step_s": seconds, **_split(forward, torch.Tensor.backward, optimizer_step, device), **_memory(device)}


def plain_classifier_step(cfg, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """A fine-tuning step without DeepSpeed: the same timm classifier, layer-decay groups, erasing and
    Mixup/CutMix and soft-target cross-entropy; fp32 weights (bf16 autocast on a GPU), torch's AdamW."""
    import torch.nn.functional as F

    from mimae_scale.data.synthetic import SyntheticLoader
    from mimae_scale.engine.optim import classifier_param_groups
    from mimae_scale.engine.tasks import BatchAugment
    from mimae_scale.model.classifier import build_classifier

    _reset_memory(device)
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg).to(device)
    opt = torch.optim.AdamW(classifier_param_groups(model, cfg), lr=1e-4, betas=cfg.optim.betas,
                            fused=device.type == "cuda")
    augment = BatchAugment(cfg, device)
    batch = next(iter(SyntheticLoader(cfg, 0, 1, device)))
    images, labels = batch["images"].float(), batch["labels"]

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            mixed, soft = augment(images.clone(), labels)
            logits = model(mixed)
        return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    return _plain_rate(forward, opt, device, warmup, steps)


def plain_step(cfg, device: torch.device, warmup: int, steps: int, compile_blocks: bool) -> dict[str, Any]:
    """The same model and step without DeepSpeed: fp32 weights, bf16 autocast, torch's fused AdamW."""
    from mimae_scale.data.synthetic import SyntheticLoader
    from mimae_scale.engine.optim import param_groups
    from mimae_scale.model import build_model
    from mimae_scale.model.club import ClubCritic
    from mimae_scale.model.compile import compile_blocks as compile_model_blocks

    _reset_memory(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled).to(device)
    if compile_blocks:
        compile_model_blocks(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=1e-4, betas=cfg.optim.betas,
                            fused=device.type == "cuda")
    critic = ClubCritic(cfg, device) if cfg.loss.w_min > 0 else None  # CLUB's q, its own Adam
    images = next(iter(SyntheticLoader(cfg, 0, 1, device)))["images"].float()
    gen = torch.Generator(device).manual_seed(0)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(images, generator=gen, critic=critic).loss

    return _plain_rate(forward, opt, device, warmup, steps)


def _rates(out: dict[str, Any], cfg, ceiling: float, peak: float | None) -> None:
    images_per_s = cfg.train.micro_batch / out["step_s"]
    tflops = images_per_s * train_flops_per_image(cfg) / 1e12
    out.update(images_per_s=images_per_s, model_tflops=tflops, mfu=tflops / ceiling,
               mfu_datasheet=tflops / peak if peak else None)


def section(ctx: Context) -> None:
    import torch.distributed as dist

    from mimae_scale.engine.distributed import destroy_process_group

    created = not dist.is_initialized()  # the Trainers share one process group, made by the first
    environ = dict(os.environ)  # and set RANK, MASTER_PORT, ... for it
    try:
        _section(ctx)
    finally:
        if created:
            destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def _section(ctx: Context) -> None:
    device, smoke, args = ctx.device, ctx.smoke, ctx.args
    warmup, steps = (1, 2) if smoke else (3, 10)
    ceiling = measure_matmul_tflops(device, size=256 if smoke else 8192, iters=3 if smoke else 20)
    peak = default_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    ctx.result.update(ceiling_tflops=ceiling, datasheet_tflops=peak, runs={})
    ctx.record()
    ctx.log(f"  bf16 matmul ceiling {ceiling:.1f} TFLOP/s (data sheet {peak})")
    names = [n for n in args.step_configs.split(",") if n in (SMOKE_MODELS if smoke else MODELS)]
    # eager runs first, compiled ones (minutes of inductor) after; none in a smoke run
    compiled = [] if smoke or not args.step_compile else [n for n in args.step_compile.split(",") if n in names]
    plan = [(n, False) for n in names] + [(n, True) for n in compiled]
    with tempfile.TemporaryDirectory(dir=ctx.scratch) as run_dir:
        for name, compile_blocks in plan:
            if ctx.out_of_time():
                return
            tag = f"{name}{'+compile' if compile_blocks else ''}"
            flags = [f"engine.compile={str(compile_blocks).lower()}", f"metrics.ceiling_tflops={ceiling}"]
            base = _config(name, smoke, run_dir, flags)
            plain = (plain_step(base, device, warmup, steps, compile_blocks) if base.task == "pretrain"
                     else plain_classifier_step(base, device, warmup, steps))
            _rates(plain, base, ceiling, peak)
            ctx.result["runs"][f"{tag}/plain"] = plain
            ctx.record()
            ctx.log(f"  {tag}/plain: {plain['images_per_s']:.1f} img/s, MFU {plain['mfu']:.3f}")
            for precision in args.step_precisions.split(","):
                if ctx.out_of_time():
                    return
                cfg = _config(name, smoke, run_dir, [*flags, f"engine.precision={precision}"])
                row = engine_step(cfg, device, warmup, steps)
                _rates(row, cfg, ceiling, peak)
                row["engine_over_plain"] = row["images_per_s"] / plain["images_per_s"]
                ctx.result["runs"][f"{tag}/{precision}"] = row
                ctx.record()
                ctx.log(f"  {tag}/{precision}: {row['images_per_s']:.1f} img/s, MFU {row['mfu']:.3f}, "
                        f"{row['engine_over_plain']:.2f}x plain, syncs/step {row['host_syncs_per_step']}")
