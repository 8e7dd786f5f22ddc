"""The ``decode`` and ``train`` sections: DALI through the project's own pipeline, and train.py fed by it.

``decode`` generates ImageNet-sized JPEGs (mimae-bench shards' generator: 350-500 x 300-400 px,
10% progressive, which ``mimae-shards build`` re-encodes to baseline), shards them with the
project's builder, then measures the DALI training loader (mixed decode, random-resized crop,
resize, flip, normalise) over a sweep of ``data.num_threads`` x ``data.hw_decoder_load``, and, in the
same run on the same files, torchvision's nvJPEG decode (``decode_jpeg(device="cuda")``) followed
by the same crop, resize, flip and normalisation in plain PyTorch.

``train`` runs ``train.py`` as a subprocess (MI-MAE ViT-B/16, DALI, 40 steps) on those shards and
reads images/s and the share of step time spent waiting for data from its metrics.jsonl. The
subprocess imports the same ``mimae_scale`` as this process (the checkout, not a wheel installed
beside it) and gets only the time left before ``--deadline-s``.

DALI (180 MB packed) cannot travel with a device call (64 MiB, docs/GPU.md): where it is not
installed, ``decode`` measures torchvision alone and ``train`` runs on the webdataset backend, and
both say so in the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import torch

from mimae_scale.bench_inputs import imagenet_like_tree, loader_batches
from mimae_scale.gpubench import Context


def shards(ctx: Context) -> Path:
    """ImageNet-like JPEGs made into shards once per run (decode and train share them)."""
    if "shards" in ctx.shared:
        return ctx.shared["shards"]
    from mimae_scale.data_tools.build import BuildSettings, build

    count = 24 if ctx.smoke else 2048
    began = time.perf_counter()
    imagenet_like_tree(ctx.scratch / "jpegs", count)
    out = ctx.scratch / "shards"
    build(ctx.scratch / "jpegs", out, BuildSettings(shard_size=max(10, count // 8)), workers=1 if ctx.smoke else 8,
          progress=False)
    ctx.log(f"  {count} JPEGs generated and sharded in {time.perf_counter() - began:.1f} s")
    ctx.shared["shards"] = out
    return out


def dali_missing() -> str | None:
    """Why DALI cannot be used here, or None when it imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return f"DALI not installed ({exc})"
    return None


def _measure(batches, device: torch.device, warmup: int, count: int) -> float:
    for _ in range(warmup):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images, began = 0, time.perf_counter()
    for _ in range(count):
        images += len(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - began)


def _torchvision_batches(files: list[Path], cfg, batch: int, device: torch.device):
    """torchvision's decode (nvJPEG on a GPU) + RandomResizedCrop + flip + normalise, batch by batch."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    size = cfg.model.img_size
    crop = v2.RandomResizedCrop(size, scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio,
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    mean = torch.tensor(cfg.data.mean, device=device).view(3, 1, 1) * 255
    std = torch.tensor(cfg.data.std, device=device).view(3, 1, 1) * 255
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    while True:
        for first in range(0, len(data) - batch + 1, batch):
            decoded = decode_jpeg(data[first:first + batch], device=device)
            # float before the crop: antialiased bicubic resizing of uint8 is not supported everywhere
            out = [crop(img.float()) for img in decoded]
            out = torch.stack([v2.functional.horizontal_flip(img) if torch.rand(()) < 0.5 else img for img in out])
            yield ((out - mean) / std).to(torch.bfloat16 if device.type == "cuda" else torch.float32)


def decode(ctx: Context) -> None:
    from mimae_scale.config import load_config
    from mimae_scale.data import build_train_loader

    device, smoke = ctx.device, ctx.smoke
    root = shards(ctx)
    batch, img, (warmup, count) = (8, 32, (1, 2)) if smoke else (256, 224, (3, 20))
    threads = (1,) if smoke else (2, 4, 8)
    loads = (0.0, 0.65) if smoke else (0.0, 0.5, 0.65, 0.9)
    base = [f"data.train_shards={root}", f"model.img_size={img}", f"train.micro_batch={batch}",
            f"data.shuffle_buffer={batch}", "data.backend=dali"]
    cfg = load_config("mimae_vit_b16", base)
    files = sorted((ctx.scratch / "jpegs").rglob("*.JPEG"))
    reference = _measure(_torchvision_batches(files, cfg, batch, device), device, warmup, count)
    ctx.result.update(batch=batch, img_size=img, torchvision_images_per_s=reference, dali={})
    ctx.record()
    ctx.log(f"  torchvision decode ({device.type}): {reference:.0f} img/s")
    if missing := dali_missing():
        ctx.result["dali_skipped"] = missing
        ctx.log(f"  {missing}: torchvision only")
        return
    for num_threads, load in product(threads, loads):
        if ctx.out_of_time():
            break
        cfg = load_config("mimae_vit_b16", [*base, f"data.num_threads={num_threads}", f"data.hw_decoder_load={load}"])
        loader = build_train_loader(cfg, 0, 1, device)
        rate = _measure(loader_batches(loader), device, warmup, count)
        ctx.result["dali"][f"threads={num_threads},hw_decoder_load={load}"] = rate
        ctx.record()
        ctx.log(f"  DALI threads {num_threads}, hw_decoder_load {load}: {rate:.0f} img/s ({rate / reference:.2f}x)")
        del loader
    best = max(ctx.result["dali"].items(), key=lambda kv: kv[1])
    ctx.result.update(best=best[0], best_over_torchvision=best[1] / reference)


TRAIN_TIMEOUT_S = 420  # without --deadline-s (the limit before there was one)
TRAIN_MARGIN_S = 15  # left after train.py for reading its metrics and writing the JSON


def train_timeout(ctx: Context) -> float:
    """train.py's subprocess timeout: what is left of the run before --deadline-s, less a margin."""
    left = ctx.seconds_left()
    if left is None:
        return 240 if ctx.smoke else TRAIN_TIMEOUT_S
    if left - TRAIN_MARGIN_S < 30:
        raise TimeoutError(f"train: {left:.0f} s left before --deadline-s, too little to start train.py")
    return left - TRAIN_MARGIN_S


def checkout_env() -> dict[str, str]:
    """This environment, with the folder holding the imported ``mimae_scale`` first on PYTHONPATH (a
    subprocess must run this code, not a wheel of the project installed beside it) and none of
    this process's rendezvous (the step section's): train.py starts a fresh single-process run."""
    import mimae_scale

    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                  "CROSS_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    home = str(Path(mimae_scale.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([home, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def train(ctx: Context) -> None:
    root = shards(ctx)
    run_dir = ctx.scratch / "train_run"
    if ctx.smoke:
        config, steps, batch, extra = "tiny", 4, 8, ["train.log_every=2", "data.num_threads=1"]
    else:
        config, steps, batch, extra = "mimae_vit_b16", 40, 256, ["train.log_every=5", "data.num_threads=8"]
    timeout = train_timeout(ctx)
    backend = "webdataset" if dali_missing() else "dali"
    ctx.result["backend"] = backend
    cmd = [sys.executable, "-m", "mimae_scale.train", "--config", config, f"data.backend={backend}",
           f"data.train_shards={root}",
           f"train.max_steps={steps}", f"train.micro_batch={batch}", f"train.global_batch={batch}",
           f"data.shuffle_buffer={batch}", "metrics.enabled=false", f"run_dir={run_dir}",
           "checkpoint.every_steps=100000", *extra]
    env = checkout_env()
    ctx.result.update(command=" ".join(cmd), pythonpath=env["PYTHONPATH"], timeout_s=round(timeout, 1))
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    ctx.result["wall_s"] = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records  # the first interval holds start-up (and any compilation)
    step_s = sum(r["step_s"] for r in timed)
    ctx.result.update(
        steps=records[-1]["step"],
        images_per_s=sum(r["images_per_s"] for r in timed) / len(timed),
        data_wait_share=sum(r["data_wait_s"] for r in timed) / step_s if step_s else None,
        final_loss=records[-1]["loss"],
        records=records,
    )
    ctx.log(f"  train.py: {ctx.result['images_per_s']:.1f} img/s, data wait {ctx.result['data_wait_share']:.1%}")

