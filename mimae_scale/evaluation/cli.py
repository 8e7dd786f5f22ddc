"""``mimae-eval``: frozen-feature evaluation of a pretrained encoder on labelled shard sets.

    mimae-eval knn     --checkpoint CKPT --train DIR --val DIR [--k 20 --temperature 0.07]
    mimae-eval linear  --checkpoint CKPT --train DIR --val DIR [--epochs 100 --lr 0.1]
    mimae-eval compare --model mimae=CKPT --model mae=CKPT --random-init --train DIR --val DIR \
                       --reference raw_pixels --reference hog

``--random-init`` (with ``--config``, or the first ``--model``'s config under ``compare``) evaluates
a freshly initialised encoder of the same shape: the floor any pretraining must beat. ``--reference``
adds an encoder with nothing learnt (raw pixels, HOG; mimae_scale/evaluation/reference.py), scored
by the same loader and probes. Results are
printed and written as JSON (``--out``). Features come from ``build_eval_loader`` (resize and
centre crop, every sample once); on a CPU-only machine the ``webdataset`` decoder is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimae_scale.config import Config, load_config
from mimae_scale.evaluation.checkpoint import CheckpointError, load_model
from mimae_scale.evaluation.features import extract_features
from mimae_scale.evaluation.knn import knn_evaluate
from mimae_scale.evaluation.linear_probe import train_linear_probe
from mimae_scale.evaluation.reference import REFERENCES, describe, reference_encoder
from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_OK
from mimae_scale.model import MIMAE, build_model


def eval_loader(cfg: Config, shards: str | Path, device: torch.device, batch_size: int):
    """The deterministic evaluation loader over ``shards`` for one process."""
    from mimae_scale.data import build_eval_loader

    if device.type == "cpu" and cfg.data.backend != "webdataset":  # DALI decodes on the GPU
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend="webdataset"))
    return build_eval_loader(cfg, str(shards), 0, 1, device, batch_size)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def random_init_model(cfg: Config, seed: int) -> MIMAE:
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled).eval()


def _features(model: nn.Module, cfg: Config, args: argparse.Namespace, device: torch.device, name: str) -> dict:
    model.to(device)
    out = {}
    for split in ("train", "val"):
        batches = eval_loader(cfg, getattr(args, split), device, args.batch_size)
        out[split] = extract_features(model, batches, args.pool, progress=f"{name} {split}")
    return out


def evaluate_model(model: nn.Module, cfg: Config, args: argparse.Namespace, device: torch.device, name: str,
                   probes: tuple[str, ...]) -> dict[str, Any]:
    start = time.perf_counter()
    feats = _features(model, cfg, args, device, name)
    (xtr, ytr), (xva, yva) = feats["train"], feats["val"]
    result: dict[str, Any] = {"pool": args.pool, "feature_dim": int(xtr.shape[1])}
    if "knn" in probes:
        result["knn"] = knn_evaluate(xtr.to(device), ytr.to(device), xva.to(device), yva.to(device),
                                     args.k, args.temperature)
    if "linear" in probes:
        result["linear"] = train_linear_probe(xtr, ytr, xva, yva, epochs=args.epochs, batch_size=args.probe_batch,
                                              lr=args.lr, seed=args.seed, device=device)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _models(args: argparse.Namespace) -> list[tuple[str, nn.Module, Config, str]]:
    """(name, model, cfg, source) for each model the command evaluates."""
    models = []
    for spec in getattr(args, "model", None) or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        model, ckpt = load_model(path, args.config)
        models.append((name, model, ckpt.cfg, str(ckpt.path)))
    if getattr(args, "checkpoint", None):
        model, ckpt = load_model(args.checkpoint, args.config)
        models.append(("checkpoint", model, ckpt.cfg, str(ckpt.path)))
    if args.random_init:
        if models:
            cfg = models[0][2]
        elif args.config:
            cfg = load_config(args.config)
        else:
            raise CheckpointError("--random-init needs --config (or a checkpoint to copy the shape from)")
        models.append(("random_init", random_init_model(cfg, args.seed), cfg, f"random init, seed {args.seed}"))
    for name in args.reference or []:
        if models:
            cfg = models[0][2]  # the same loader (image size, normalisation) as the encoders
        elif args.config:
            cfg = load_config(args.config)
        else:
            raise CheckpointError("--reference needs --config (or a checkpoint) for the loader's image size")
        models.append((name, reference_encoder(name), cfg, describe(name)))
    if not models:
        raise CheckpointError("nothing to evaluate: give --checkpoint/--model, --random-init or --reference")
    return models


def _fmt(result: dict[str, Any]) -> str:
    parts = []
    if "knn" in result:
        parts.append(f"kNN top-1 {100 * result['knn']['top1']:6.2f}%")
    if "linear" in result:
        parts.append(f"linear top-1 {100 * result['linear']['top1']:6.2f}%")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    probes = ("knn", "linear") if args.command == "compare" else (args.command,)
    report: dict[str, Any] = {"command": args.command, "train": str(args.train), "val": str(args.val),
                              "device": str(device), "models": {}}
    models = _models(args)
    print(f"frozen {args.pool}-pooled features, scored on {args.val} (learnt from {args.train}): kNN k={args.k} "
          f"T={args.temperature}; linear probe {args.epochs} epochs", flush=True)
    for name, model, cfg, source in models:
        result = evaluate_model(model, cfg, args, device, name, probes)
        result["source"] = source
        report["models"][name] = result
        print(f"{name:>14}: {_fmt(result)}  ({source})", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimae-eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("knn", "linear", "compare"):
        p = sub.add_parser(command)
        if command == "compare":
            p.add_argument("--model", action="append", metavar="NAME=CKPT", help="a checkpoint to compare (repeat)")
        else:
            p.add_argument("--checkpoint", help="DeepSpeed checkpoint folder, or a run dir / checkpoints dir")
        p.add_argument("--random-init", action="store_true", help="also evaluate a randomly initialised encoder")
        p.add_argument("--reference", action="append", choices=sorted(REFERENCES),
                       help="also score an encoder with nothing learnt: raw_pixels or hog (repeat)")
        p.add_argument("--config", help="config name or YAML path (default: the checkpoint's own)")
        p.add_argument("--train", required=True, help="labelled shard set the probes learn from")
        p.add_argument("--val", required=True, help="labelled shard set the probes are scored on")
        p.add_argument("--pool", choices=("cls", "mean"), default="mean", help="cls token or mean of patch tokens")
        p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--seed", type=int, default=0, help="seed of the random init and the probe")
        p.add_argument("--out", help="write the results here as JSON")
        p.add_argument("--k", type=int, default=20, help="kNN neighbours")
        p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
        p.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
        p.add_argument("--lr", type=float, default=0.1, help="linear probe learning rate (SGD, cosine)")
        p.add_argument("--probe-batch", type=int, default=256, help="linear probe batch size")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"mimae-eval: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
