"""``mimae-bench``: throughput benchmarks that always measure their reference in the same run.

``mimae-bench gpu``: every part of the system proved and timed on one device (mimae_scale.gpubench).

``mimae-bench shards``: ``mimae-shards build`` images/s (one worker, so per core) on generated
ImageNet-sized JPEGs (10% progressive, which are re-encoded), beside the floor of any validating
builder: reading and fully decoding the same files with PIL.

``mimae-bench data``: training images/s of each input backend (decode, random-resized crop,
resize, flip, normalise, batch) beside a plain webdataset + PIL + torchvision pipeline (one
process, the library's documented usage) on the same shards. "per core" is images per second of
process CPU time (all threads counted), the number to multiply by cores when sizing a machine.
``--remote`` adds each backend reading the same shards from an S3-compatible server that the
bench starts on loopback (moto, mimae_scale.data.loopback_s3) and prints remote / local.

``mimae-bench checkpoint``: seconds to checksum (save) and verify (resume) a checkpoint of a
shipped config's size in one process: the model-states file (bf16 module, 2 bytes per parameter)
and ZeRO's fp32 master weights and Adam moments (12 bytes per parameter) split over ``--ranks``
files, written to ``--dir`` (random bytes; removed afterwards).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mimae_scale.bench_inputs import imagenet_like_tree, loader_batches
from mimae_scale.config import load_config
from mimae_scale.exit_codes import EXIT_OK


def _reference_batches(tars: list[str], size: int, batch: int, cfg) -> Iterator[torch.Tensor]:
    """The plain baseline: wds.WebDataset(...).decode("pil") with torchvision transforms."""
    import webdataset as wds
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(
                size, scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio, interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg.data.mean, cfg.data.std),
        ]
    )
    ds = (
        wds.WebDataset(tars, shardshuffle=False, empty_check=False, nodesplitter=None)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(tf, int)
        .batched(batch)
    )
    while True:
        yield from (imgs for imgs, _ in ds)


def _measure(batches: Iterator[torch.Tensor], warmup: int, count: int) -> tuple[float, float, int]:
    for _ in range(warmup):
        next(batches)
    images = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        images += len(next(batches))
    return images / (time.perf_counter() - wall), images / max(time.process_time() - cpu, 1e-9), images


def cmd_data(args: argparse.Namespace) -> int:
    from mimae_scale.data import build_train_loader
    from mimae_scale.data.shardset import resolve_shards

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            from mimae_scale.data_tools.demo import write_demo

            per_class = max(1, args.images // 10)
            write_demo(Path(tmp), train_per_class=per_class, val_per_class=1, size=args.image_side, seed=0)
            shards = str(Path(tmp) / "train")
            print(f"shards: {per_class * 10} generated {args.image_side}x{args.image_side} JPEGs in {tmp}")
        tars = resolve_shards(shards).tars
        server = _serve_on_loopback_s3(shards, Path(tmp) / "moto.log") if args.remote else None
        overrides = [
            f"data.train_shards={shards}",
            f"model.img_size={args.img_size}",
            f"train.micro_batch={args.batch}",
            f"data.num_threads={args.threads}",
            f"data.shuffle_buffer={args.shuffle_buffer}",
            "engine.precision=fp32",
        ]
        runs: dict[str, Callable[[], Iterator[torch.Tensor]]] = {
            "reference (webdataset+PIL+torchvision, 1 thread)": lambda: _reference_batches(
                tars, args.img_size, args.batch, load_config("tiny", overrides)
            ),
        }
        for backend in args.backends.split(","):
            cfg = load_config("tiny", [*overrides, f"data.backend={backend}"])
            runs[f"{backend} ({device.type}, {args.threads} threads)"] = lambda cfg=cfg: loader_batches(
                build_train_loader(cfg, 0, 1, device)
            )
            for label, extra in REMOTE_RUNS if server else ():
                remote_cfg = load_config("tiny", [*overrides, f"data.backend={backend}", f"data.train_shards={REMOTE}",
                                                  *[e.format(tmp=tmp) for e in extra]])
                runs[f"{backend} {label}"] = lambda cfg=remote_cfg: loader_batches(
                    build_train_loader(cfg, 0, 1, device)
                )
        # One torch thread: the reference's per-image tensor ops must not fight the pipelines' threads.
        torch.set_num_threads(1)
        print(
            f"device: {device}, img_size {args.img_size}, batch {args.batch}, {args.batches} timed batches, "
            f"best of {args.rounds} interleaved rounds"
        )
        print(f"{'pipeline':<52} {'images/s':>10} {'per core':>10}")
        pipelines = {name: make() for name, make in runs.items()}
        results: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits every pipeline alike
            for name, batches in pipelines.items():
                rate, per_cpu_s, _ = _measure(batches, args.warmup, args.batches)
                best = results.get(name, (0.0, 0.0))
                results[name] = (max(best[0], rate), max(best[1], per_cpu_s))
        for name, (rate, per_cpu_s) in results.items():
            print(f"{name:<52} {rate:>10.0f} {per_cpu_s:>10.0f}", flush=True)
        results = {name: rate for name, (rate, _) in results.items()}
        ref = next(iter(results.values()))
        for name, rate in list(results.items())[1:]:
            print(f"{name}: {rate / ref:.2f}x the reference")
        if server:
            for backend in args.backends.split(","):
                local = results[f"{backend} ({device.type}, {args.threads} threads)"]
                for label, _ in REMOTE_RUNS:
                    print(f"{backend} {label}: {results[f'{backend} {label}'] / local:.2f}x local")
            server.stop()
    return EXIT_OK


REMOTE = "s3://bench/shards"
# the remote runs: straight from the store, and through data.remote_cache (filled before the timing)
REMOTE_RUNS = [("from s3", []), ("from s3 via remote_cache", ["data.remote_cache={tmp}/cache"])]


def _serve_on_loopback_s3(shards: str, log: Path):
    """A moto S3 server on 127.0.0.1 holding a copy of ``shards`` at :data:`REMOTE`; this process's
    AWS variables point at it (DALI reads them)."""
    import os

    from mimae_scale.data.loopback_s3 import S3Server
    from mimae_scale.data.shardset import resolve_shards

    server = S3Server(log)
    os.environ.update(server.env())
    client = server.client()
    client.create_bucket(Bucket="bench")
    local = resolve_shards(shards)
    files = [Path(f) for f in [*local.tars, *local.indexes]]
    if Path(shards).is_dir() and (Path(shards) / "manifest.json").exists():
        files.append(Path(shards) / "manifest.json")
    for f in files:
        client.upload_file(str(f), "bench", f"shards/{f.name}")
    print(f"s3: {len(files)} objects at {REMOTE} on {server.url} (moto)")
    from mimae_scale.data.cache import cached

    start = time.perf_counter()
    cached(resolve_shards(REMOTE), str(log.parent / "cache"), 0, "mimae-bench")
    size = sum(f.stat().st_size for f in files if f.name != "manifest.json")
    took = time.perf_counter() - start
    print(f"s3 -> data.remote_cache: {size / 1e6:.1f} MB in {took:.2f} s (once; not timed below)")
    return server



def cmd_shards(args: argparse.Namespace) -> int:
    import os

    from PIL import Image

    from mimae_scale.data_tools.build import BuildSettings, build

    with tempfile.TemporaryDirectory() as tmp:
        paths = imagenet_like_tree(Path(tmp) / "src", args.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} generated JPEGs, {mb:.1f} MB, 10% progressive")

        def timed(fn) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), os.times()
            fn()
            c1 = os.times()
            cpu = (c1.user + c1.system + c1.children_user + c1.children_system) - (
                c0.user + c0.system + c0.children_user + c0.children_system
            )
            return len(paths) / (time.perf_counter() - t0), len(paths) / max(cpu, 1e-9)

        def decode_all() -> None:
            for p in paths:
                with Image.open(p) as img:
                    img.load()

        results = {}
        for r in range(args.rounds):
            for name, fn in (
                ("reference: read + PIL full decode", decode_all),
                (
                    "mimae-shards build (1 worker)",
                    lambda r=r: build(
                        Path(tmp) / "src", Path(tmp) / f"out{r}", BuildSettings(shard_size=100), progress=False
                    ),
                ),
            ):
                rate, per_cpu = timed(fn)
                best = results.get(name, (0.0, 0.0))
                results[name] = (max(best[0], rate), max(best[1], per_cpu))
        print(f"{'step':<40} {'images/s':>10} {'per core':>10}")
        for name, (rate, per_cpu) in results.items():
            print(f"{name:<40} {rate:>10.0f} {per_cpu:>10.0f}")
        (ref, _), (ours, _) = results.values()
        shard_mb = sum(p.stat().st_size for p in (Path(tmp) / "out0").glob("*.tar")) / 1e6
        print(f"shards: {shard_mb:.1f} MB for {mb:.1f} MB of source JPEGs")
        print(f"build: {ours / ref:.2f}x the decode-only reference")
    return EXIT_OK


def cmd_checkpoint(args) -> int:
    import os
    import shutil

    from mimae_scale.engine.checkpoint import describe, problems_in
    from mimae_scale.model import build_model

    cfg = load_config(args.config)
    with torch.device("meta"):  # parameter count only, no memory
        model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
        params = sum(p.numel() for p in model.parameters())
    sizes = {"mp_rank_00_model_states.pt": 2 * params}
    sizes |= {f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 12 * params // args.ranks for r in range(args.ranks)}
    tag = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        block = os.urandom(64 << 20)
        for name, size in sizes.items():
            with open(tag / name, "wb") as fh:
                for start in range(0, size, len(block)):
                    fh.write(block[: min(len(block), size - start)])
        total = sum(sizes.values())
        t0 = time.perf_counter()
        files = describe(tag, sorted(sizes))
        t1 = time.perf_counter()
        problems = problems_in(tag, files)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(tag)
    assert not problems, problems
    print(f"{args.config}: {params / 1e6:.1f} M parameters, {total / 1e9:.2f} GB in {len(sizes)} files")
    print(f"checksums at save: {t1 - t0:.1f} s; verification at resume: {t2 - t1:.1f} s "
          f"({total / (t2 - t1) / 1e6:.0f} MB/s, one process; W ranks share the files)")
    return EXIT_OK


def cmd_relayout(args) -> int:
    """What resuming on another number of ranks costs on the data side, at ImageNet-1k's size: the
    index files read into sample ids (every start does this, re-layout or not), the union of the old
    ranks' used-sample bitmaps, index files for the rest of the epoch, and the per-sample lookup the
    DALI loader does for every image."""
    import shutil

    import numpy as np

    from mimae_scale.data.samples import SampleIds, pack, unpack, write_remainder_indexes
    from mimae_scale.data.shardset import ShardSet, read_offsets

    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        counts = [min(args.per_tar, args.samples - s) for s in range(0, args.samples, args.per_tar)]
        tars, indexes = [], []
        for t, n in enumerate(counts):  # index files as `mimae-shards index` writes them (the tars are not read)
            lines = [f"jpg {512 + 4096 * i} 3000 {t:06d}{i:04d}.jpg cls {3584 + 4096 * i} 3 {t:06d}{i:04d}.cls"
                     for i in range(n)]
            indexes.append(str(root / f"train-{t:06d}.idx"))
            Path(indexes[-1]).write_text(f"v1.2 {n}\n" + "\n".join(lines) + "\n")
            tars.append(str(root / f"train-{t:06d}.tar"))
        t0 = time.perf_counter()
        offsets, skipped = read_offsets(indexes, "mimae-bench relayout")  # as resolve_shards reads them
        ids = SampleIds(ShardSet(tars, indexes, offsets, skipped, None))
        t1 = time.perf_counter()
        rng = np.random.default_rng(0)
        owner = rng.integers(0, args.ranks, args.samples)  # each old rank used its share of half the epoch
        used = rng.random(args.samples) < 0.5
        states = [pack(used & (owner == r)) for r in range(args.ranks)]
        t2 = time.perf_counter()
        seen = np.zeros(args.samples, dtype=bool)
        for state in states:
            seen |= unpack(state, args.samples)
        t3 = time.perf_counter()
        _, written = write_remainder_indexes(ids, list(range(len(counts))), ~seen, root / "rest")
        t4 = time.perf_counter()
        probes = rng.integers(0, args.samples, args.lookups)
        infos = [f"{tars[g // args.per_tar]}:{512 + 4096 * (g % args.per_tar)}:x.jpg" for g in probes]
        t5 = time.perf_counter()
        found = [ids.from_source_info(i) for i in infos]
        t6 = time.perf_counter()
        rest = sum(int(Path(f).read_text().split("\n", 1)[0].split()[1]) for f in written)
    finally:
        shutil.rmtree(root)
    assert found == probes.tolist() and rest == int((~seen).sum()), "relayout bench: wrong ids"
    print(f"{args.samples} samples in {len(counts)} index files; {args.ranks} old ranks, half the epoch used")
    print(f"index files read into sample ids (every start): {t1 - t0:.2f} s; bitmap per rank "
          f"{states[0].numel() / 1e3:.0f} kB")
    print(f"union of {args.ranks} ranks' bitmaps: {t3 - t2:.3f} s; index files for the {rest} samples left: "
          f"{t4 - t3:.2f} s")
    print(f"per-sample lookup (DALI source info -> id): {(t6 - t5) / args.lookups * 1e6:.1f} us")
    return EXIT_OK


def cmd_finetune(args) -> int:
    """A fine-tuning step through the engine (``Trainer.train_step``: DeepSpeed, ZeRO 1 unless overridden, one
    rank) against a plain PyTorch step of the same timm classifier, augmentations, loss and optimiser groups,
    interleaved."""
    import torch.distributed as dist

    from mimae_scale.engine.distributed import destroy_process_group
    from mimae_scale.gpubench.step import engine_step, held_out_shards, plain_classifier_step

    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    environ, created = dict(os.environ), not dist.is_initialized()
    best: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="mimae-bench-") as scratch:
            cfg = load_config(args.config, [
                f"data.val_shards={held_out_shards(scratch)}", f"train.micro_batch={args.batch}",
                f"train.global_batch={args.batch}", "data.backend=synthetic", "metrics.enabled=false",
                f"run_dir={scratch}/run", "engine.zero_stage=1", *args.overrides])
            for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits both alike
                for name, run in (("plain", plain_classifier_step), ("engine", engine_step)):
                    row = run(cfg, device, args.warmup, args.steps)
                    if row["step_s"] < best.get(name, {"step_s": math.inf})["step_s"]:
                        best[name] = row
    finally:
        if created:
            destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    m = cfg.model
    print(f"{args.config}: ViT {m.embed_dim}x{m.depth} patch {m.patch_size} at {m.img_size} px, micro-batch "
          f"{args.batch}, {device}, best of {args.rounds} rounds of {args.steps} steps")
    print(f"{'step':<34} {'s/step':>8} {'images/s':>9} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8}")
    engine_label = f"engine (DeepSpeed ZeRO {cfg.engine.zero_stage})"
    for name, label in (("plain", "plain PyTorch (same model, AdamW)"), ("engine", engine_label)):
        r = best[name]
        print(f"{label:<34} {r['step_s']:>8.3f} {args.batch / r['step_s']:>9.1f} {r['forward_ms']:>8.0f} "
              f"{r['backward_ms']:>8.0f} {r['optimizer_ms']:>8.0f}")
    print(f"engine / plain step time: {best['engine']['step_s'] / best['plain']['step_s']:.3f}x (goal: at most 1.1x)")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimae-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="input pipeline images/s per backend vs a plain webdataset+PIL reference")
    d.add_argument("--shards", help="shard set dir or tar pattern (default: generate demo images)")
    d.add_argument("--images", type=int, default=600, help="images to generate when --shards is not given")
    d.add_argument("--image-side", type=int, default=320, help="side of generated images (ImageNet-like: 320)")
    d.add_argument("--backends", default="dali,webdataset")
    d.add_argument("--img-size", type=int, default=224, help="training crop size")
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--threads", type=int, default=2, help="data.num_threads for the backends")
    d.add_argument("--shuffle-buffer", type=int, default=256)
    d.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    d.add_argument("--warmup", type=int, default=2)
    d.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is shown")
    d.add_argument("--cpu", action="store_true", help="CPU-only even when a GPU is present")
    d.add_argument("--remote", action="store_true", help="also each backend reading the shards from an S3 server "
                   "started on loopback (moto; pip install 'moto[server]')")
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("shards", help="mimae-shards build images/s vs reading + decoding the same files")
    s.add_argument("--images", type=int, default=600)
    s.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is shown")
    s.set_defaults(func=cmd_shards)

    from mimae_scale import gpubench

    g = sub.add_parser("gpu", help="prove and time every part of the system on this device (--smoke: tiny, CI)")
    gpubench.add_arguments(g)
    g.set_defaults(func=gpubench.main)

    c = sub.add_parser("checkpoint", help="seconds to checksum and verify a checkpoint of a config's size")
    c.add_argument("--config", default="mimae_vit_l16", help="shipped config name or YAML path")
    c.add_argument("--ranks", type=int, default=8, help="ZeRO optimiser partitions (one file per rank)")
    c.add_argument("--dir", default=None, help="where to write it (default: the temporary directory)")
    c.set_defaults(func=cmd_checkpoint)

    f = sub.add_parser("finetune", help="a fine-tuning step through the engine vs a plain PyTorch step")
    f.add_argument("--config", default="finetune_vit_b16", help="shipped fine-tuning config or YAML path")
    f.add_argument("--batch", type=int, default=8, help="images per step")
    f.add_argument("--steps", type=int, default=4, help="timed steps per round")
    f.add_argument("--warmup", type=int, default=1)
    f.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is shown")
    f.add_argument("--cpu", action="store_true", help="CPU even when a GPU is present")
    f.add_argument("overrides", nargs="*", help="key.sub=value settings for the config")
    f.set_defaults(func=cmd_finetune)

    r = sub.add_parser("relayout", help="data-side cost of resuming on another number of ranks (ImageNet-1k size)")
    r.add_argument("--samples", type=int, default=1_281_167, help="samples in the shard set")
    r.add_argument("--per-tar", type=int, default=1000, help="samples per tar")
    r.add_argument("--ranks", type=int, default=64, help="ranks of the layout that stopped")
    r.add_argument("--lookups", type=int, default=100_000, help="source-info lookups timed")
    r.add_argument("--dir", default=None, help="where to write the index files (default: the temporary directory)")
    r.set_defaults(func=cmd_relayout)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
