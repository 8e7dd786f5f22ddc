"""``mimae-ablate``: the paper's ablations on the embedded demo data, with fair controls.

    mimae-ablate runs/demo/shards --out runs/ablation            # default sweep, ~20 min on 2 cores

Every arm trains the same model, masks and loss code as ``train.py`` (``MIMAE.forward`` with the CLUB
critic), single-process on the CPU, without DeepSpeed or DALI (webdataset reads the shards once;
random-resized crops and flips are drawn per image, as in training). Fairness, by construction:

- the learning rate of every arm is chosen the same way: each value of ``--lrs`` trained with the
  first seed on the training images minus a validation split carved out of them (``--val-fraction``),
  and the best linear-probe top-1 *on that validation split* wins (kNN breaks ties); the held-out
  split is never used to choose;
- the chosen learning rate is then trained with every seed; the table reports mean +/- std over seeds
  and, per seed, the difference to the 4-mask MAE (the control that sees the same views and compute);
- a 1-mask MAE runs at the same epochs and at K x the epochs (compute-matched: one K-mask epoch costs
  about K single-mask epochs); the untrained encoder is the floor.

Scores, all on the held-out split: kNN and linear-probe top-1 of frozen mean-pooled features;
view retrieval top-1 (K masked views of each held-out image: is the nearest other view one of the
same image?); and a post-hoc CLUB: a fresh q fitted to each frozen encoder's (token, patch) pairs on
the training images, then its CLUB estimate and its gain over a z-blind Gaussian on held-out pairs
(nats per pixel dim). Writes ``results.json``, ``table.md`` and ``ablation.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimae_scale import losses, masking
from mimae_scale.config import Config, load_config
from mimae_scale.engine.optim import LRSchedule, build_optimizer
from mimae_scale.evaluation.knn import knn_evaluate
from mimae_scale.evaluation.linear_probe import train_linear_probe
from mimae_scale.exit_codes import EXIT_OK
from mimae_scale.model import MIMAE, build_model
from mimae_scale.model.club import ClubCritic, blind_gaussian_nll, min_weight
from mimae_scale.ops import REFERENCE


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    epoch_factor: int = 1
    what: str = ""


def arms(num_masks: int) -> list[Arm]:
    no_mi = ("loss.w_max=0", "loss.w_min=0")
    mae1 = ("mask.num_masks=1", *no_mi)
    return [
        Arm("random_init", (), epoch_factor=0, what="untrained encoder: the floor"),
        Arm("mimae", (), what="MI-MAE: K orthogonal masks, InfoNCE and CLUB"),
        Arm("mimae_no_min", ("loss.w_min=0",), what="MI-MAE without L_min"),
        Arm("mimae_no_max", ("loss.w_max=0",), what="MI-MAE without L_max"),
        Arm("mae4", no_mi, what=f"MAE with {num_masks} orthogonal masks, no MI terms (the control)"),
        Arm("mae1", mae1, what="MAE, 1 mask, same epochs"),
        Arm("mae1_4x", mae1, epoch_factor=num_masks, what=f"MAE, 1 mask, {num_masks}x epochs (compute-matched)"),
        Arm("mimae_independent", ("mask.strategy=independent",), what="MI-MAE with independent masks"),
    ]


# --------------------------------------------------------------------------------------------
# data: the shards, read once with the webdataset library


def read_split(shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (n, 3, H, W), labels (n,)) of a `mimae-shards` directory, in shard order."""
    import webdataset as wds

    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / s["name"]) for s in manifest["shards"]]
    images, labels = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("torchrgb8"):
        images.append(sample["jpg"])
        labels.append(int(sample["cls"]))
    if not images:
        raise ValueError(f"{shards}: no samples")
    return torch.stack(images), torch.tensor(labels)


def normalise(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def eval_view(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The evaluation loader's preprocessing: shorter side to img_size / 0.875, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    size = cfg.model.img_size
    resized = TF.resize(images, [round(size / 0.875)], antialias=True)
    return normalise(TF.center_crop(resized, [size, size]), cfg)


def train_view(images: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """Random-resized crop (data.crop_scale, data.crop_ratio) and flip per image, as in training."""
    size, d = cfg.model.img_size, cfg.data
    n, _, h, w = images.shape
    area = torch.empty(n).uniform_(*d.crop_scale, generator=gen) * h * w
    log_ratio = torch.empty(n).uniform_(math.log(d.crop_ratio[0]), math.log(d.crop_ratio[1]), generator=gen)
    ratio = log_ratio.exp()
    cw = (area * ratio).sqrt().round().clamp(1, w)
    ch = (area / ratio).sqrt().round().clamp(1, h)
    x0 = (torch.rand(n, generator=gen) * (w - cw + 1)).floor()
    y0 = (torch.rand(n, generator=gen) * (h - ch + 1)).floor()
    # one affine grid per image: crop box -> output square, flipped horizontally half the time
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if d.hflip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w * flip
    theta[:, 1, 1] = ch / h
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    crops = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalise(crops, cfg)


# --------------------------------------------------------------------------------------------
# training one arm (the training forward of train.py, without the engine)


def train(cfg: Config, images: torch.Tensor, seed: int,
          train_epochs: int | None = None) -> tuple[MIMAE, list[dict[str, float]]]:
    """``train_epochs`` (default train.epochs): 0 gives the initialised model, trained on nothing."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    critic = ClubCritic(cfg) if cfg.loss.w_min > 0 else None
    optimizer = build_optimizer(model, cfg, wrapped_by_deepspeed=True, device=torch.device("cpu"))
    batch = cfg.train.global_batch
    steps_per_epoch = len(images) // batch
    schedule = LRSchedule.from_config(cfg, steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    log: list[dict[str, float]] = []
    step = 0
    for _ in range(cfg.train.epochs if train_epochs is None else train_epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            x = train_view(images[order[i * batch:(i + 1) * batch]], cfg, gen)
            out = model(x, generator=gen, critic=critic, w_min=min_weight(cfg, step, steps_per_epoch))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            log.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()}})
    return model.eval(), log


# --------------------------------------------------------------------------------------------
# scores


@torch.no_grad()
def features(model: MIMAE, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([model.forward_features(images[i:i + batch])[:, 1:].mean(dim=1)
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def view_retrieval(model: MIMAE, images: torch.Tensor, num_views: int, seed: int) -> float:
    """Top-1 of matching each masked view's pooled latent to another view of its own image."""
    gen = torch.Generator().manual_seed(seed)
    ratio = model.mask_ratio
    strategy = "orthogonal" if num_views * (1 - ratio) <= 1 + 1e-9 else "independent"
    ids_keep, _, _ = masking.make_masks(len(images), model.num_patches, num_views, ratio, strategy, generator=gen)
    z = F.normalize(model.encode(images, ids_keep, num_masks=num_views)[:, 1:].mean(dim=1), dim=1)
    sim = z @ z.t()
    sim.fill_diagonal_(float("-inf"))
    image = torch.arange(len(z)) // num_views
    return (image[sim.argmax(dim=1)] == image).float().mean().item()


@torch.no_grad()
def _pairs(model: MIMAE, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids_keep, _, _ = masking.make_masks(len(images), model.num_patches, model.num_masks, model.mask_ratio,
                                        model.mask_strategy, generator=gen)
    latent = model.encode(images, ids_keep)
    valid = torch.ones(len(images) * model.num_masks, dtype=torch.bool)
    z, x, _ = model._club_pairs(images, latent, model.patchify(images), ids_keep, valid)
    return z, x


def posthoc_club(model: MIMAE, cfg: Config, train_images: torch.Tensor, test_images: torch.Tensor,
                 seed: int, steps: int) -> dict[str, float]:
    """A fresh q (the run's own mi.club settings) fitted to the frozen encoder, scored on held-out pairs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    critic = ClubCritic(dataclasses.replace(cfg, mi=dataclasses.replace(
        cfg.mi, club=dataclasses.replace(cfg.mi.club, q_steps=1))))
    for _ in range(steps):
        idx = torch.randint(len(train_images), (64,), generator=gen)
        z, x = _pairs(model, train_images[idx], gen)
        critic.fit(z, x, torch.ones(len(z), dtype=torch.bool), REFERENCE)
    z, x = _pairs(model, test_images, gen)
    with torch.no_grad():
        mu, logvar = critic.net(z)
        perm = torch.randperm(len(z), generator=gen)
        dims = x.shape[-1]
        club = losses.club_upper_bound(mu, logvar, x, perm).item() / dims
        nll = 0.5 * losses.gaussian_nll(mu, logvar, x).item() / dims
        blind = blind_gaussian_nll(x, torch.ones(len(x), dtype=torch.bool)).item()
    return {"club": club, "q_gain": blind - nll}


# --------------------------------------------------------------------------------------------
# the sweep


_DATA: dict[str, torch.Tensor] = {}  # each worker's copy of the images, set once by _init_worker


def _init_worker(data: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)  # one process per core
    _DATA.update(data)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (arm, seed, lr): train, then every score. Runs in a worker process."""
    started = time.perf_counter()
    data = _DATA
    cfg = load_config(job["config"], [*job["overrides"], f"optim.base_lr={job['lr']}"])
    epochs = cfg.train.epochs if job["epoch_factor"] else 0
    model, log = train(cfg, data["train"], job["seed"], epochs)
    tr, va, te = (features(model, data[f"{s}_eval"]) for s in ("train", "val", "test"))
    half = log[len(log) // 2:]
    result = {
        "arm": job["arm"], "seed": job["seed"], "lr": job["lr"], "epochs": epochs, "steps": len(log),
        "val_knn": knn_evaluate(tr, data["train_labels"], va, data["val_labels"])["top1"],
        "val_linear": train_linear_probe(tr, data["train_labels"], va, data["val_labels"], seed=job["seed"])["top1"],
        "knn": knn_evaluate(tr, data["train_labels"], te, data["test_labels"])["top1"],
        "linear": train_linear_probe(tr, data["train_labels"], te, data["test_labels"], seed=job["seed"])["top1"],
        "retrieval": view_retrieval(model, data["test_eval"], job["num_views"], seed=1000 + job["seed"]),
        **{f"posthoc_{k}": v for k, v in posthoc_club(model, cfg, data["train_eval"], data["test_eval"],
                                                       job["seed"], job["posthoc_steps"]).items()},
        "second_half": {k: statistics.fmean(r[k] for r in half) for k in half[0]} if half else {},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"  {job['arm']:>18} seed {job['seed']} lr {job['lr']:.1e}: val kNN {result['val_knn']:.3f}, "
          f"val linear {result['val_linear']:.3f}, "
          f"held-out kNN {result['knn']:.3f}, linear {result['linear']:.3f}, retrieval {result['retrieval']:.3f}, "
          f"post-hoc CLUB {result['posthoc_club']:+.4f} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return result


def load_data(shards: Path, cfg: Config, val_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    train_images, train_labels = read_split(shards / "train")
    test_images, test_labels = read_split(shards / "val")
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * len(train_images))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    return {
        "train": train_images[fit_idx], "train_labels": train_labels[fit_idx],
        "train_eval": eval_view(train_images[fit_idx], cfg),
        "val_eval": eval_view(train_images[val_idx], cfg), "val_labels": train_labels[val_idx],
        "test_eval": eval_view(test_images, cfg), "test_labels": test_labels,
    }


METRICS = ("knn", "linear", "retrieval", "posthoc_club", "posthoc_q_gain")


def summarise(runs: list[dict[str, Any]], chosen: dict[str, float], control: str = "mae4") -> dict[str, Any]:
    final = [r for r in runs if r["lr"] == chosen[r["arm"]]]
    table: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in final):
        mine = sorted((r for r in final if r["arm"] == arm), key=lambda r: r["seed"])
        ctrl = {r["seed"]: r for r in final if r["arm"] == control}
        row = {"lr": chosen[arm], "seeds": [r["seed"] for r in mine]}
        for m in METRICS:
            values = [r[m] for r in mine]
            diffs = [r[m] - ctrl[r["seed"]][m] for r in mine if r["seed"] in ctrl]
            row[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "values": values, "diff_vs_control": diffs}
        table[arm] = row
    return table


def markdown(table: dict[str, Any], arm_list: list[Arm], header: str) -> str:
    what = {a.name: a.what for a in arm_list}
    lines = [header, "",
             "| arm | lr | kNN top-1 | linear top-1 | view retrieval | post-hoc CLUB (nats/dim) | post-hoc q gain |",
             "|---|---|---|---|---|---|---|"]
    for arm, row in table.items():
        cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" for m in ("knn", "linear", "retrieval")]
        cells += [f"{row[m]['mean']:+.4f} ± {row[m]['std']:.4f}" for m in ("posthoc_club", "posthoc_q_gain")]
        lines.append(f"| {arm} ({what.get(arm, '')}) | {row['lr']:.1e} | " + " | ".join(cells) + " |")
    lines += ["", "Per-seed differences against the 4-mask MAE (same seed); 'beyond spread' when every seed's "
              "difference has the same sign and the mean difference exceeds both arms' seed std:", "",
              "| arm | kNN | linear | retrieval | post-hoc CLUB |", "|---|---|---|---|---|"]
    control = table.get("mae4")
    for arm, row in table.items():
        if arm == "mae4" or control is None:
            continue
        cells = []
        for m, scale in (("knn", 100), ("linear", 100), ("retrieval", 100), ("posthoc_club", 1)):
            d = row[m]["diff_vs_control"]
            if not d:
                cells.append("n/a")
                continue
            mean = statistics.fmean(d)
            beyond = (all(x > 0 for x in d) or all(x < 0 for x in d)) and abs(mean) > max(row[m]["std"],
                                                                                         control[m]["std"])
            fmt = "{:+.1f}" if scale == 100 else "{:+.4f}"
            cells.append(", ".join(fmt.format(scale * x) for x in d) + (" (beyond spread)" if beyond else " (within)"))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def picture(table: dict[str, Any], path: Path) -> None:
    """Per arm: each seed's point and the mean +/- std, for kNN, linear probe and view retrieval."""
    from PIL import Image, ImageDraw

    metrics = ("knn", "linear", "retrieval")
    arms_ = list(table)
    col_w, row_h, left, top = 260, 34, 150, 40
    img = Image.new("RGB", (left + col_w * len(metrics) + 20, top + row_h * len(arms_) + 30), "white")
    draw = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for j, m in enumerate(metrics):
        values = [v for a in arms_ for v in table[a][m]["values"]]
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 1e-3) * 0.1
        lo, hi = max(lo - pad, 0.0), min(hi + pad, 1.0)  # accuracies
        x0 = left + j * col_w
        draw.text((x0 + 10, 8), f"{m} top-1 ({100 * lo:.0f}-{100 * hi:.0f}%)", fill="black")

        def px(v: float, x0: int = x0, lo: float = lo, hi: float = hi) -> float:
            return x0 + 10 + (v - lo) / (hi - lo) * (col_w - 30)

        for i, a in enumerate(arms_):
            y = top + i * row_h + row_h // 2
            mean, std = table[a][m]["mean"], table[a][m]["std"]
            draw.line([(px(mean - std), y), (px(mean + std), y)], fill="black", width=2)
            draw.rectangle([px(mean) - 2, y - 7, px(mean) + 2, y + 7], fill="black")
            for s, v in enumerate(table[a][m]["values"]):
                c = colours[s % len(colours)]
                draw.ellipse([px(v) - 3, y - 11, px(v) + 3, y - 5], fill=c)
    for i, a in enumerate(arms_):
        draw.text((8, top + i * row_h + row_h // 2 - 6), a, fill="black")
    draw.text((8, img.height - 20), "dots: seeds; bar: mean +/- std over seeds (held-out split)", fill="gray")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mimae-ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=Path, help="a `mimae-shards demo` directory (train/ and val/)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for every arm")
    p.add_argument("--arms", nargs="*", help="a subset of arms (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 6e-3], help="optim.base_lr values to choose from")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--posthoc-steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)

    started = time.perf_counter()
    cfg = load_config(args.config, [*args.set, f"train.epochs={args.epochs}"])
    arm_list = [a for a in arms(cfg.mask.num_masks) if not args.arms or a.name in args.arms]
    data = load_data(args.shards, cfg, args.val_fraction, seed=12345)
    print(f"mimae-ablate: {len(arm_list)} arms x lrs {args.lrs} (seed {args.seeds[0]}, chosen on a "
          f"{len(data['val_labels'])}-image validation split of the training set) + seeds {args.seeds[1:]}; "
          f"{len(data['train'])} training, {len(data['test_labels'])} held-out images", file=sys.stderr, flush=True)
    base = {"config": args.config, "num_views": cfg.mask.num_masks if cfg.mask.num_masks > 1 else 4,
            "posthoc_steps": args.posthoc_steps}
    common = [*args.set, f"train.epochs={args.epochs}"]

    def job(arm: Arm, seed: int, lr: float) -> dict[str, Any]:
        epochs = f"train.epochs={args.epochs * max(arm.epoch_factor, 1)}"
        return {**base, "arm": arm.name, "overrides": [*common, *arm.overrides, epochs],
                "epoch_factor": arm.epoch_factor, "seed": seed, "lr": lr}

    with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(data,)) as pool:
        # longest jobs first, so the two workers finish together
        first = sorted((job(a, args.seeds[0], lr) for a in arm_list for lr in (args.lrs if a.epoch_factor else
                                                                              args.lrs[:1])),
                       key=lambda j: -j["epoch_factor"])
        runs = list(pool.map(run_one, first))
        # the linear probe on the validation split chooses (kNN breaks ties): it separates the arms
        # where kNN at this scale barely leaves chance
        chosen = {a.name: max((r for r in runs if r["arm"] == a.name),
                              key=lambda r: (r["val_linear"], r["val_knn"]))["lr"] for a in arm_list}
        rest = sorted((job(a, s, chosen[a.name]) for a in arm_list for s in args.seeds[1:]),
                      key=lambda j: -j["epoch_factor"])
        runs += list(pool.map(run_one, rest))

    table = summarise(runs, chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"mimae-ablate on {args.shards}: config {args.config} {' '.join(args.set)}, {args.epochs} epochs, "
              f"seeds {args.seeds}, lr chosen from {args.lrs} on a validation split; {platform.node()}, "
              f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s")
    md = markdown(table, arm_list, header)
    (args.out / "table.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "chosen_lr": chosen,
         "runs": runs, "table": table, "numpy": np.__version__, "torch": torch.__version__}, indent=2) + "\n")
    picture(table, args.out / "ablation.png")
    print(md)
    print(f"mimae-ablate: {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'ablation.png'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
