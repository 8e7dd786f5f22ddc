"""``mimae-eval``: frozen-feature evaluation of a pretrained encoder on labelled shard sets.

    mimae-eval knn     --checkpoint CKPT --train DIR --val DIR [--k 20 --temperature 0.07]
    mimae-eval linear  --checkpoint CKPT --train DIR --val DIR [--epochs 100 --lr 0.1]
    mimae-eval compare --model mimae=CKPT --model mae=CKPT --random-init --train DIR --val DIR \
                       --reference raw_pixels --reference hog [--label-fraction 0.1 --finetune]

``--random-init`` (with ``--config``, or the first ``--model``'s config under ``compare``) evaluates
a freshly initialised encoder of the same shape (``random``): the floor any pretraining must beat.
``--reference`` adds an encoder with nothing learnt (raw pixels, HOG; mimae_scale/evaluation/reference.py),
scored by the same loader and probes. ``--label-fraction F`` lets the probes (and fine-tuning) learn from
a stratified, seeded share F of the training labels: the few-label regime where pretraining shows.
``--finetune`` (compare) also fine-tunes each ViT end to end on those labels (fewlabel.py; a reference
has nothing to fine-tune). Results are printed and written as JSON (``--out``): ``encoders`` holds each
one's top-1 in percent (``finetune_top1``, ``linear_top1``, ``knn_top1``), ``models`` the details.
Features come from ``build_eval_loader`` (resize and centre crop, every sample once); on a CPU-only
machine the ``webdataset`` decoder is used.
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
from mimae_scale.evaluation.fewlabel import finetune, label_subset
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


def _labelled(batches, pool: str, model: nn.Module, name: str, split: str, keep_images: bool) -> dict[str, Any]:
    """One split's pooled features and labels, and (``keep_images``) its images, in the same order."""
    batches = list(batches) if keep_images else batches
    feats, labels = extract_features(model, batches, pool, progress=f"{name} {split}")
    out: dict[str, Any] = {"features": feats, "labels": labels}
    if keep_images:  # the same rows extract_features kept (a rank's padding dropped)
        rows = [(b["images"][b["valid"].bool()] if "valid" in b else b["images"]).float().cpu() for b in batches]
        out["images"] = torch.cat(rows)
    return out


def evaluate_model(model: nn.Module, cfg: Config, args: argparse.Namespace, device: torch.device, name: str,
                   probes: tuple[str, ...], pretrained: bool = True) -> dict[str, Any]:
    """The probes of one encoder; ``pretrained`` False: fine-tuning starts from timm's own initialisation."""
    start = time.perf_counter()
    tune = "finetune" in probes and isinstance(model, MIMAE)
    model.to(device)
    data = {split: _labelled(eval_loader(cfg, getattr(args, split), device, args.batch_size), args.pool, model,
                             name, split, tune) for split in ("train", "val")}
    train, val = data["train"], data["val"]
    if args.label_fraction < 1:
        rows = label_subset(train["labels"], args.label_fraction, args.seed)
        train = {k: v[rows] for k, v in train.items()}
    xtr, ytr, xva, yva = train["features"], train["labels"], val["features"], val["labels"]
    result: dict[str, Any] = {"pool": args.pool, "feature_dim": int(xtr.shape[1]), "train_labels": len(ytr)}
    if "knn" in probes:
        result["knn"] = knn_evaluate(xtr.to(device), ytr.to(device), xva.to(device), yva.to(device),
                                     args.k, args.temperature)
    if "linear" in probes:
        result["linear"] = train_linear_probe(xtr, ytr, xva, yva, epochs=args.epochs, batch_size=args.probe_batch,
                                              lr=args.lr, seed=args.seed, device=device)
    if tune:
        encoder = {k: v.cpu() for k, v in model.state_dict().items()} if pretrained else None
        scores = finetune(encoder, cfg, train["images"], ytr, {"val": (val["images"], yva)},
                          base_lr=args.ft_lr, steps=args.ft_steps, seed=args.seed)
        result["finetune"] = {"top1": scores["val"], "steps": args.ft_steps, "base_lr": args.ft_lr,
                              "init": "pretrained" if pretrained else "timm's random initialisation"}
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
        models.append(("random", random_init_model(cfg, args.seed), cfg, f"random init, seed {args.seed}"))
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
    return "  ".join(f"{label} top-1 {100 * result[key]['top1']:6.2f}%" for key, label in
                     (("finetune", "fine-tune"), ("linear", "linear"), ("knn", "kNN")) if key in result)


def _data_name(shards: str | Path) -> str:
    """The benchmark's name: the source ``mimae-shards real`` recorded, else the folder's name."""
    manifest = Path(shards) / "manifest.json"
    settings = json.loads(manifest.read_text()).get("settings", {}) if manifest.is_file() else {}
    return settings.get("source") or Path(shards).resolve().parent.name


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    probes = ("knn", "linear") if args.command == "compare" else (args.command,)
    if args.command == "compare" and args.finetune:
        probes += ("finetune",)
    report: dict[str, Any] = {"command": args.command, "data": _data_name(args.train), "train": str(args.train),
                              "val": str(args.val), "label_fraction": args.label_fraction, "device": str(device),
                              "encoders": {}, "models": {}}
    models = _models(args)
    labels = "all training labels" if args.label_fraction == 1 else f"{args.label_fraction:.0%} of the training labels"
    print(f"frozen {args.pool}-pooled features, scored on {args.val} (learnt from {labels} of {args.train}): "
          f"kNN k={args.k} T={args.temperature}; linear probe {args.epochs} epochs"
          + (f"; fine-tuning {args.ft_steps} steps at base lr {args.ft_lr:g}" if "finetune" in probes else ""),
          flush=True)
    for name, model, cfg, source in models:
        result = evaluate_model(model, cfg, args, device, name, probes, pretrained=name != "random")
        result["source"] = source
        report["models"][name] = result
        report["encoders"][name] = {f"{key}_top1": round(100 * result[key]["top1"], 2) if key in result else None
                                    for key in ("finetune", "linear", "knn") if key in probes}
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
        p.add_argument("--label-fraction", type=float, default=1.0,
                       help="learn from this stratified share of the training labels (seeded by --seed)")
        if command == "compare":
            p.add_argument("--finetune", action="store_true", help="also fine-tune each ViT end to end (fewlabel.py)")
            p.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps of 64 images")
            p.add_argument("--ft-lr", type=float, default=3e-3, help="fine-tuning base lr (x 64 / 256)")
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
