"""``python -m mimae_scale.engine.summary RUN_DIR``: what a run did and where its files are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from mimae_scale.engine.checkpoint import CheckpointManager
from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_OK

TERMS = {"loss": "total (encoder objective)", "loss_rec": "reconstruction", "loss_max": "InfoNCE (L_max)",
         "loss_min": "CLUB (L_min)", "loss_q": "L_q (CLUB critic)"}


def _club_health(steps: list[dict]) -> str:
    """Over the second half of the log: is CLUB's q fitted (gain > 0), so that L_min bounds?"""
    half = [r for r in steps[len(steps) // 2:] if r.get("club_q_gain") is not None]
    if not half:
        return ""
    gain = sum(r["club_q_gain"] for r in half) / len(half)
    bound = sum(r["loss_min"] for r in half) / len(half)
    verdict = ("q is fitted: L_min is an upper bound" if gain > 0
               else "q does NOT beat a z-blind Gaussian: L_min is no bound")
    return (f"CLUB critic, second half of the run: q gain {gain:+.4f} nats/dim, L_min {bound:+.4f} nats/dim "
            f"({verdict}; docs/METHOD.md)")


def summarize(run_dir: Path) -> str:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ds = json.loads((run_dir / "ds_config.json").read_text())
    latest = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        latest[record["step"]] = record  # a resumed run repeats steps: the last record counts
    steps = [latest[s] for s in sorted(latest)]
    first, last = steps[0], steps[-1]
    complete = CheckpointManager(run_dir / "checkpoints", rank=0, keep_last=1).complete()
    world = ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    task = cfg.get("task", "pretrain")
    curve_key = "loss_rec" if task == "pretrain" else "loss"  # a classifier's loss has no terms
    finite = [r for r in steps if r[curve_key] is not None]
    picks = sorted({round(i * (len(finite) - 1) / 9) for i in range(10)}) if finite else []
    curve = "  ".join(f"{finite[i]['step']}: {finite[i][curve_key]:.3f}" for i in picks)
    m = cfg["model"]
    if task == "pretrain":
        what = f"MI-MAE {m['img_size']} px / patch {m['patch_size']}, K={cfg['mask']['num_masks']} masks"
    else:
        ft = cfg["finetune"]
        what = (f"{task} of a ViT {m['embed_dim']}x{m['depth']} ({m['img_size']} px / patch {m['patch_size']}, "
                f"{ft['num_classes']} classes) from {ft['init'] or 'a random initialisation'}")
    evals = [r for r in steps if "val_top1" in r]
    lines = [
        "",
        "=" * 100,
        f"{what}, trained by DeepSpeed ZeRO-{ds['zero_optimization']['stage']} on {world} ranks "
        f"({'bf16' if ds['bf16']['enabled'] else 'fp32'}), data backend {cfg['data']['backend']} "
        f"({cfg['data']['train_shards'] or 'generated'})",
        f"steps {first['step']}..{last['step']} (epoch {last['epoch']:.2f}), {last['samples']} images, "
        f"{last['images_per_s']:.1f} img/s at the end, skipped steps {last['skipped_steps']}",
        "loss terms, first -> last log step: " + ", ".join(
            f"{TERMS.get(k, k) if task == 'pretrain' else 'soft-target cross-entropy'} {first[k]:.4f} -> "
            f"{last[k]:.4f}" for k in sorted(first)
            if k.startswith("loss") and first[k] is not None and last[k] is not None),
        _club_health(steps) if "club_q_gain" in first else "",
        f"{'reconstruction loss' if task == 'pretrain' else 'loss'} by step: {curve}",
        ("held-out top-1 by step: " + "  ".join(f"{r['step']}: {r['val_top1']:.4f}" for r in evals)
         + f" (last: top-1 {evals[-1]['val_top1']:.4f}, top-5 {evals[-1]['val_top5']:.4f} on "
           f"{evals[-1]['val_samples']} images)") if evals else "",
        f"run directory  {run_dir.resolve()}",
        f"  config.yaml, ds_config.json  the resolved settings; train.log  the log; metrics.jsonl  {len(steps)} "
        "log steps",
        f"  checkpoints/   {', '.join(c.tag for c in complete) or 'none'} (latest -> "
        f"{complete[-1].tag if complete else 'none'})",
        "=" * 100,
    ]
    return "\n".join(line for line in lines if line)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mimae_scale.engine.summary RUN_DIR", file=sys.stderr)
        return EXIT_CONFIG
    print(summarize(Path(args[0])))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
