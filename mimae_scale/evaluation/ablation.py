"""``mimae-ablate``: what pretraining and each MI-MAE term buy, on real images, with fair statistics.

    mimae-shards real mnist5k runs/mnist5k
    mimae-ablate runs/mnist5k --out runs/ablation        # the default sweep; resumable (see below)

Every arm trains the model, masks and loss code of ``train.py`` (``MIMAE.forward`` with the CLUB
critic) in one process on the CPU, without DeepSpeed or DALI (webdataset reads the shards once;
random-resized crops drawn per image, as in training). The primary metric no arm trains on is
few-label end-to-end fine-tuning (``fewlabel.finetune``: the engine's classifier, layer-decay groups,
schedule and loss) with ``--fractions`` of the training labels; the linear probe on frozen features is
the second, kNN the third. The order of work, and what is chosen where (never on the test split):

1. selection, seed 0: every arm at every ``--lrs`` pretraining lr (MI-MAE: every pair of lr and
   ``--w-mins``, 0 included); the best linear probe on the val split (10% of the labels, label seed
   0) wins. Where the best lr is a grid's edge, the next lr beyond it (the grid's own ratio) is tried
   too, up to ``--extend`` times. Then each arm's fine-tuning lr from ``--ft-lrs`` (extended the same
   way), by fine-tuned top-1 on val (10% of the labels). A choice still at an edge is flagged.
2. seeds: each arm at its choices with every ``--seeds`` pretraining seed; each encoder scored with
   every ``--ft-seeds`` seed (its own label subset, head and order) at every fraction, on the test split.
3. references, scored by the same code: random initialisation (fine-tuned from timm's own init),
   raw pixels and HOG (linear, kNN), and the supervised ceiling (all labels, from random init).
4. the curve: the 4-mask MAE pretrained for ``--curve-epochs`` (each its own schedule), seed 0.

Arms: MI-MAE, MI-MAE without L_min, the 4-mask MAE (the control: the same views), and the 1-mask MAE
at K x the epochs (compute-matched: one K-mask epoch costs about K single-mask ones). Differences
against the 4-mask MAE are paired (the same pretraining seed, label subset and test images) with 95%
bootstrap intervals that resample pretraining seeds, fine-tuning seeds and test images.

Resumes: each finished unit (an encoder, a score) is a file under ``--out/units/``; a rerun with the
same arguments skips it, so the sweep can run in several sittings. Writes ``results.json``,
``table.md``, ``ablation.png`` and ``curve.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

from mimae_scale import masking
from mimae_scale.config import Config, load_config
from mimae_scale.engine.optim import LRSchedule, build_optimizer
from mimae_scale.evaluation.fewlabel import crop_views, label_subset, predict, train_classifier
from mimae_scale.evaluation.knn import knn_votes
from mimae_scale.evaluation.linear_probe import fit_linear_probe
from mimae_scale.evaluation.reference import reference_encoder
from mimae_scale.exit_codes import EXIT_OK
from mimae_scale.model import MIMAE, build_model
from mimae_scale.model.club import ClubCritic, min_weight

CONTROL = "mae4"
SELECT_FRACTION = 0.1  # the share of labels the selection probes and fine-tunes learn from


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    epoch_factor: int = 1
    what: str = ""


def arms(num_masks: int) -> list[Arm]:
    no_mi = ("loss.w_max=0", "loss.w_min=0")
    return [
        Arm("mimae", (), what="MI-MAE: K orthogonal masks, InfoNCE and CLUB (w_min chosen on val)"),
        Arm("mimae_no_min", ("loss.w_min=0",), what="MI-MAE without L_min"),
        Arm(CONTROL, no_mi, what=f"MAE with the same {num_masks} orthogonal masks, no MI terms (the control)"),
        Arm("mae1_4x", ("mask.num_masks=1", *no_mi), epoch_factor=num_masks,
            what=f"MAE, 1 mask, {num_masks}x the epochs (compute-matched)"),
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
    return normalise(crop_views(images, cfg, gen, cfg.model.img_size), cfg)


def load_data(shards: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """A ``mimae-shards real`` set: train (pretraining images, and the labels fractions come from),
    val (every choice) and test (every reported number)."""
    data: dict[str, torch.Tensor] = {}
    for split in ("train", "val", "test"):
        images, labels = read_split(shards / split)
        data[f"{split}_eval"], data[f"{split}_labels"] = eval_view(images, cfg), labels
        if split == "train":
            data["train"] = images
    return data


# --------------------------------------------------------------------------------------------
# pretraining one arm (the training forward of train.py, without the engine)


def pretrain(cfg: Config, images: torch.Tensor, seed: int, epochs: int) -> tuple[MIMAE, list[dict[str, float]]]:
    """``epochs`` (= ``cfg.train.epochs``, whose schedule it follows) of training; 0: the initialised model."""
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
    for _ in range(epochs):
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
# scores: per-image correctness on the split, so differences can be paired image by image


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    direct = getattr(model, "image_features", None)  # the reference rows
    return torch.cat([direct(images[i:i + batch]) if direct else model.forward_features(images[i:i + batch])[:, 1:]
                      .mean(dim=1) for i in range(0, len(images), batch)])


def linear_correct(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, seed: int) -> np.ndarray:
    """Per-image hits of ``mimae-eval``'s linear probe (MAE's head, SGD, cosine, 100 epochs)."""
    head = fit_linear_probe(xtr, ytr, int(max(ytr.max(), yte.max())) + 1, seed=seed)
    with torch.no_grad():
        return (head(xte.float()).argmax(1) == yte).numpy()


def knn_correct(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> np.ndarray:
    """Per-image hits of ``mimae-eval``'s kNN (k 20, temperature 0.07)."""
    votes = knn_votes(xtr, ytr, xte, int(max(ytr.max(), yte.max())) + 1)
    return (votes.argmax(1) == yte).numpy()


@torch.no_grad()
def view_retrieval(model: MIMAE, images: torch.Tensor, num_views: int, seed: int) -> float:
    """Top-1 of matching each masked view's pooled latent to another view of its own image (L_max's job)."""
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
def token_pairs(model: MIMAE, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, x) pairs as L_min sees them (``mi.club.level`` and ``target``), from the model's own masks."""
    gen = torch.Generator().manual_seed(seed)
    ids_keep, _, _ = masking.make_masks(len(images), model.num_patches, model.num_masks, model.mask_ratio,
                                        model.mask_strategy, generator=gen)
    latent = model.encode(images, ids_keep)
    valid = torch.ones(len(images) * model.num_masks, dtype=torch.bool)
    z, x, _ = model._club_pairs(images, latent, model.patchify(images), ids_keep, valid)
    return z.double(), x.double()


def linear_gaussian_critic(model: MIMAE, train_images: torch.Tensor, test_images: torch.Tensor,
                           ridge: float = 1e-3) -> dict[str, float]:
    """A post-hoc critic of another family than the training q: x ~ N(W [z, 1], diag(s^2)), W by ridge
    least squares and s^2 the residual variance, both on the training images' pairs, in float64. On the
    test images' pairs: R^2, how much of each token's own patch a linear read-out recovers, and its
    CLUB estimate in nats per dim (closed form over all negatives: for each dim, mean over j of
    (x_j - mu_i)^2 = (mean_j x_j - mu_i)^2 + var_j x_j)."""
    z, x = token_pairs(model, train_images, seed=0)
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    gram = design.T @ design
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    weight = torch.linalg.solve(gram, design.T @ x)
    var = (x - design @ weight).pow(2).mean(dim=0).clamp_min(1e-8)
    z, x = token_pairs(model, test_images, seed=1)
    mu = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1) @ weight
    positive = (x - mu).pow(2).mean(dim=0)
    negative = ((x.mean(dim=0) - mu).pow(2) + x.var(dim=0, unbiased=False)).mean(dim=0)
    r2 = 1 - positive.sum() / x.var(dim=0, unbiased=False).sum()
    return {"decode_r2": r2.item(), "club_linear": ((negative - positive) / (2 * var)).mean().item()}


# --------------------------------------------------------------------------------------------
# units of work, each kept in a file so the sweep resumes


_DATA: dict[str, torch.Tensor] = {}  # each worker's copy of the images, set once by _init_worker


def _init_worker(data: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)  # one process per core
    _DATA.update(data)


def _key(unit: dict[str, Any]) -> str:
    text = json.dumps(unit, sort_keys=True)
    return f"{unit['kind']}-{unit.get('arm', unit.get('ref', ''))}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _encoder(unit: dict[str, Any], out: Path) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The unit's encoder: pretrained (or read back from an earlier sitting), a random init, a reference."""
    if unit.get("ref"):
        return reference_encoder(unit["ref"]), {}
    cfg = load_config(unit["config"], unit["overrides"])
    path = out / "encoders" / f"{_key(unit['pretrain'])}.pt"
    if path.exists():
        model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["info"]
    started = time.perf_counter()
    model, log = pretrain(cfg, _DATA["train"], unit["pretrain"]["seed"], unit["pretrain"]["epochs"])
    half = log[len(log) // 2:]
    info = {"steps": len(log), "pretrain_seconds": round(time.perf_counter() - started, 1),
            "second_half": {k: statistics.fmean(r[k] for r in half) for k in half[0]} if half else {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return model, info


def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Score one encoder: the probes and fine-tunes the unit lists. Runs in a worker process."""
    out = Path(unit["out"])
    done = out / "units" / f"{_key(unit)}.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    data = _DATA
    model, info = _encoder(unit, out)
    cfg = load_config(unit["config"], unit.get("overrides", []))
    split = unit["split"]
    xte, yte = data[f"{split}_eval"], data[f"{split}_labels"]
    ftr, fte = features(model, data["train_eval"]), features(model, xte)
    scores = []
    pretrain_seed = unit.get("pretrain", {}).get("seed", 0)
    encoder = None if unit.get("random") or not unit.get("ft_lrs") else model.state_dict()
    classes = int(max(data["train_labels"].max(), yte.max())) + 1
    for fraction, label_seed in unit["subsets"]:
        rows = label_subset(data["train_labels"], fraction, label_seed)
        row: dict[str, Any] = {"fraction": fraction, "label_seed": label_seed, "labels": len(rows)}
        ytr = data["train_labels"][rows]
        if unit.get("probes", True):
            row["linear"] = linear_correct(ftr[rows], ytr, fte, yte, seed=label_seed).tolist()
            row["knn"] = knn_correct(ftr[rows], ytr, fte, yte).tolist()
        for lr in unit.get("ft_lrs", []):
            model_ft = train_classifier(encoder, cfg, data["train_eval"][rows], ytr, classes, base_lr=lr,
                                        steps=unit["ft_steps"], seed=1000 * pretrain_seed + label_seed)
            row[f"finetune@{lr:g}"] = (predict(model_ft, xte) == yte).numpy().tolist()
        scores.append(row)
    result = {"unit": unit, "info": info, "scores": scores, "seconds": round(time.perf_counter() - started, 1)}
    if unit.get("retrieval") and isinstance(model, MIMAE):
        result["retrieval"] = view_retrieval(model, xte, max(cfg.mask.num_masks, 4), seed=1000)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result) + "\n")
    name = unit.get("arm") or unit.get("ref")
    summary = ", ".join(f"{k} {100 * np.mean(v):.1f}" for r in scores for k, v in r.items() if isinstance(v, list))
    print(f"  {unit['kind']:>8} {name:>13} {json.dumps(unit.get('pretrain', {}).get('choice', ''))}: {summary} "
          f"({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------------------------
# statistics


def bootstrap_diff(diff: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diff`` (pretraining seeds, label seeds, images), each
    axis resampled with replacement: the seeds' spread and the test set's finite size both count."""
    rng = np.random.default_rng(seed)
    seeds, subsets, n = diff.shape
    per_image = np.empty(reps)
    for b in range(reps):
        rows = diff[rng.integers(0, seeds, seeds)][:, rng.integers(0, subsets, subsets)].mean(axis=(0, 1))
        per_image[b] = rows @ rng.multinomial(n, np.full(n, 1.0 / n)) / n
    lo, hi = np.percentile(per_image, [2.5, 97.5])
    return float(lo), float(hi)


METRICS = ("finetune", "linear", "knn")


def _hits(results: list[dict[str, Any]], metric: str, fraction: float, ft_lr: float | None) -> np.ndarray:
    """(pretraining seeds, label seeds, images) of 0/1 hits, in seed order."""
    if metric == "finetune" and ft_lr is None:  # a reference row: nothing to fine-tune
        return np.empty((0, 0, 0))
    key = f"finetune@{ft_lr:g}" if metric == "finetune" else metric
    by_seed = sorted(results, key=lambda r: r["unit"].get("pretrain", {}).get("seed", 0))
    cube = [[row[key] for row in sorted(r["scores"], key=lambda row: row["label_seed"])
             if row["fraction"] == fraction and key in row] for r in by_seed]
    return np.asarray([c for c in cube if c], dtype=np.float64)


def summarise(final: dict[str, list[dict[str, Any]]], ft_lr: dict[str, float], fractions: list[float]
              ) -> dict[str, Any]:
    """Per arm, metric and label fraction: mean top-1, per-seed means, and against the control the
    paired mean difference with its 95% bootstrap interval (all in percent)."""
    table: dict[str, Any] = {}
    for arm, results in final.items():
        row: dict[str, Any] = {}
        for metric in METRICS:
            for fraction in fractions:
                hits = _hits(results, metric, fraction, ft_lr.get(arm))
                if hits.size == 0:
                    continue
                cell = {"mean": 100 * hits.mean(), "seed_means": (100 * hits.mean(axis=(1, 2))).round(2).tolist(),
                        "shape": list(hits.shape)}
                control = _hits(final.get(CONTROL, []), metric, fraction, ft_lr.get(CONTROL))
                if arm != CONTROL and control.shape == hits.shape:
                    diff = hits - control
                    lo, hi = bootstrap_diff(diff)
                    cell["diff_vs_control"] = {"mean": 100 * diff.mean(), "ci95": [100 * lo, 100 * hi]}
                row[f"{metric}@{fraction:g}"] = cell
        table[arm] = row
    return table


# --------------------------------------------------------------------------------------------
# the report


def markdown(table: dict[str, Any], choices: dict[str, Any], what: dict[str, str], fractions: list[float],
             header: str) -> str:
    cols = [f"{m}@{f:g}" for m in METRICS for f in fractions]
    names = {"finetune": "fine-tune", "linear": "linear", "knn": "kNN"}
    heads = [f"{names[c.split('@')[0]]} {float(c.split('@')[1]):.0%}" for c in cols]
    lines = [header, "", "Top-1 on the test split (%), mean over pretraining seeds x label subsets; "
             f"in brackets the paired difference to `{CONTROL}` and its 95% bootstrap interval.", "",
             "| arm | " + " | ".join(heads) + " |", "|---|" + "---|" * len(cols)]
    for arm, row in table.items():
        cells = []
        for c in cols:
            cell = row.get(c)
            if cell is None:
                cells.append("")
                continue
            text = f"{cell['mean']:.1f}"
            if "diff_vs_control" in cell:
                d = cell["diff_vs_control"]
                text += f" ({d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}])"
            cells.append(text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Does each term do its job (test split, mean over pretraining seeds): view retrieval is L_max's "
              "objective; the CLUB terms are the training q's (second half of the run); the post-hoc critic is "
              "linear-Gaussian (least squares), not the training q's family: its CLUB estimate (nats/dim) and the "
              "R^2 of each visible token's own patch read out linearly from its latent.", "",
              "| arm | view retrieval | L_min (train) | q gain (train) | post-hoc CLUB | post-hoc R^2 |",
              "|---|---|---|---|---|---|"]
    for arm, row in table.items():
        if "posthoc" not in row:
            continue
        terms = row.get("training_terms", {})
        post = row["posthoc"]
        lines.append(f"| {arm} | {row.get('view_retrieval', float('nan')):.1f} | "
                     + (f"{terms['min']:.3f}" if "min" in terms else "") + " | "
                     + (f"{terms['club_q_gain']:.3f}" if "club_q_gain" in terms else "") + " | "
                     + f"{statistics.fmean(post['club_linear']):.3f} | {statistics.fmean(post['decode_r2']):.3f} |")
    lines += ["", "| arm | what | pretraining lr | w_min | fine-tuning lr | pretraining seeds x label seeds |",
              "|---|---|---|---|---|---|"]
    for arm in table:
        c = choices.get(arm, {})
        lines.append(f"| {arm} | {what.get(arm, '')} | {c.get('lr', '')} | {c.get('w_min', '')} | "
                     f"{c.get('ft_lr', '')} | {c.get('shape', '')} |")
    return "\n".join(lines) + "\n"


def _chosen(label: str, value: float, grid: list[float]) -> str:
    edge = len(grid) > 1 and value in (min(grid), max(grid)) and not (label == "w_min" and value == 0)
    return f"{value:g}" + (" (grid edge)" if edge else "")


def _edge_step(value: float, grid: list[float]) -> float | None:
    """The factor to the next grid point beyond ``value`` when it is the grid's smallest or largest."""
    grid = sorted(set(grid))
    if len(grid) < 2 or grid[0] < value < grid[-1]:
        return None
    return grid[-1] / grid[-2] if value == grid[-1] else grid[0] / grid[1]


def _ft_val(results: list[dict[str, Any]]) -> dict[float, float]:
    """Fine-tuning lr -> top-1 on val, over an arm's ``ftlr`` units."""
    return {lr: float(np.mean(r["scores"][0][f"finetune@{lr:g}"])) for r in results for lr in r["unit"]["ft_lrs"]}


def _plot(path: Path, arms_: list[str], panels: list[tuple[str, dict[str, tuple[float, float, float]]]]) -> None:
    """One column per panel, one row per arm: its mean as a dot and (lo, hi) as a bar."""
    from PIL import Image, ImageDraw

    col_w, row_h, left, top = 230, 26, 130, 40
    img = Image.new("RGB", (left + col_w * len(panels) + 20, top + row_h * len(arms_) + 30), "white")
    draw = ImageDraw.Draw(img)
    for i, arm in enumerate(arms_):
        draw.text((8, top + i * row_h + row_h // 2 - 6), arm, fill="black")
    for j, (title, items) in enumerate(panels):
        lo = min(v[1] for v in items.values())
        hi = max(v[2] for v in items.values())
        lo, hi = lo - 0.05 * (hi - lo + 1e-6), hi + 0.05 * (hi - lo + 1e-6)
        x0 = left + j * col_w
        draw.text((x0 + 10, 8), title, fill="black")
        draw.text((x0 + 10, 20), f"{lo:.0f} .. {hi:.0f} %", fill="gray")

        def px(v: float, x0: int = x0, lo: float = lo, hi: float = hi) -> float:
            return x0 + 10 + (v - lo) / (hi - lo) * (col_w - 30)

        for i, arm in enumerate(arms_):
            if arm not in items:
                continue
            mean, a, b = items[arm]
            y = top + i * row_h + row_h // 2
            draw.line([(px(a), y), (px(b), y)], fill=(31, 119, 180), width=2)
            draw.ellipse([px(mean) - 4, y - 4, px(mean) + 4, y + 4], fill="black")
    draw.text((8, img.height - 20), "dot: mean top-1 on the test split; bar: min..max over pretraining seeds",
              fill="gray")
    img.save(path)


def _curve(path: Path, points: dict[str, list[tuple[float, float]]], lines: dict[str, float]) -> None:
    """Top-1 against pretraining epochs: one polyline per metric, horizontal lines for the references."""
    from PIL import Image, ImageDraw

    w, h, left, bottom = 640, 380, 60, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts] + list(lines.values())
    xmax, ylo, yhi = max(xs) or 1.0, min(ys) - 2, max(ys) + 2

    def px(x: float, y: float) -> tuple[float, float]:
        return left + x / xmax * (w - left - 150), h - bottom - (y - ylo) / (yhi - ylo) * (h - bottom - 20)

    draw.line([px(0, ylo), px(xmax, ylo)], fill="black")
    draw.line([px(0, ylo), px(0, yhi)], fill="black")
    for x in sorted(set(xs)):
        draw.text((px(x, ylo)[0] - 4, h - bottom + 4), f"{x:g}", fill="black")
    for y in range(math.ceil(ylo / 5) * 5, int(yhi) + 1, 5):
        draw.text((8, px(0, y)[1] - 6), f"{y}%", fill="black")
    colours = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189)]
    for (name, pts), colour in zip(points.items(), colours, strict=False):
        pts = sorted(pts)
        draw.line([px(x, y) for x, y in pts], fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([px(x, y)[0] - 3, px(x, y)[1] - 3, px(x, y)[0] + 3, px(x, y)[1] + 3], fill=colour)
        draw.text((px(*pts[-1])[0] + 8, px(*pts[-1])[1] - 6), name, fill=colour)
    for name, y in lines.items():
        draw.line([px(0, y), px(xmax, y)], fill="gray", width=1)
        draw.text((px(xmax, y)[0] + 8, px(xmax, y)[1] - 6), name, fill="gray")
    draw.text((left, h - 18), "pretraining epochs (4-mask MAE, seed 0); test split, 10% of the labels", fill="gray")
    img.save(path)


# --------------------------------------------------------------------------------------------
# the sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mimae-ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=Path, help="a `mimae-shards real` directory (train/, val/, test/)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for every arm")
    p.add_argument("--arms", nargs="*", help="a subset of arms (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds (the first selects)")
    p.add_argument("--ft-seeds", type=int, nargs="+", default=[0, 1, 2], help="label subsets / fine-tuning seeds")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1], help="shares of the training labels")
    p.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 6e-3, 2.4e-2], help="pretraining base lrs")
    p.add_argument("--w-mins", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1], help="MI-MAE's w_min grid")
    p.add_argument("--ft-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="fine-tuning base lrs")
    p.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps of 64 images")
    p.add_argument("--epochs", type=int, default=12, help="pretraining epochs (the 1-mask arm: K x these)")
    p.add_argument("--curve-epochs", type=int, nargs="*", default=[1, 3, 6], help="shorter 4-mask MAE runs")
    p.add_argument("--no-references", action="store_true", help="skip raw pixels, HOG and the supervised ceiling")
    p.add_argument("--extend", type=int, default=2, help="grid points added beyond an edge that wins (each lr grid)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)

    started = time.perf_counter()
    cfg = load_config(args.config, args.set)
    arm_list = [a for a in arms(cfg.mask.num_masks) if not args.arms or a.name in args.arms]
    data = load_data(args.shards, cfg)
    out = args.out.resolve()
    print(f"mimae-ablate: {len(arm_list)} arms on {args.shards}: {len(data['train'])} training, "
          f"{len(data['val_labels'])} val, {len(data['test_labels'])} test images; units kept in {out / 'units'}",
          file=sys.stderr, flush=True)
    what = {a.name: a.what for a in arm_list} | {"random": "random initialisation (the floor)"}

    def encoder(arm: Arm, lr: float, seed: int, epochs: int, w_min: float | None = None) -> dict[str, Any]:
        # (an untrained encoder keeps the config's epochs: 0 is no valid train.epochs)
        overrides = [*args.set, *arm.overrides, f"optim.base_lr={lr:g}", *([f"train.epochs={epochs}"] * (epochs > 0))]
        if w_min is not None:
            overrides.append(f"loss.w_min={w_min:g}")
        return {"kind": "encoder", "arm": arm.name, "config": args.config, "overrides": overrides, "seed": seed,
                "lr": lr, "epochs": epochs, "w_min": w_min}

    def unit(kind: str, pre: dict[str, Any], split: str, subsets: list, **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "arm": pre["arm"], "config": args.config, "overrides": pre["overrides"],
                "pretrain": pre, "split": split, "subsets": subsets, "out": str(out), "ft_steps": args.ft_steps,
                **extra}

    select = [(SELECT_FRACTION, args.ft_seeds[0])]
    tests = [(f, s) for f in args.fractions for s in args.ft_seeds]
    with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(data,)) as pool:
        def score(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # longest first, so the workers finish together
            return list(pool.map(run_unit, sorted(units, key=lambda u: -u.get("pretrain", {}).get("epochs", 0))))

        def best(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
            def val(r: dict[str, Any]) -> tuple[float, ...]:
                row = r["scores"][0]
                return tuple(float(np.mean(row[k])) for k in key.split(","))
            return max(results, key=val)

        # 1. the pretraining lr (MI-MAE: jointly with w_min), on val by the linear probe (kNN breaks ties)
        seed0 = args.seeds[0]

        def pre_of(a: Arm, lr: float, w_min: float | None) -> dict[str, Any]:
            return encoder(a, lr, seed0, args.epochs * a.epoch_factor, w_min)

        def w_grid(a: Arm) -> list[float | None]:
            return list(args.w_mins) if a.name == "mimae" else [None]

        first = score([unit("select", pre_of(a, lr, w), "val", select)
                       for a in arm_list for lr in args.lrs for w in w_grid(a)])
        # a grid brackets its optimum: where the best lr is at an edge, the next one out (the grid's
        # own ratio) is tried too (MI-MAE: at the best w_min), at most --extend times
        for _ in range(args.extend):
            more = []
            for a in arm_list:
                win = best([r for r in first if r["unit"]["arm"] == a.name], "linear,knn")["unit"]["pretrain"]
                same_w = [r["unit"]["pretrain"]["lr"] for r in first
                          if r["unit"]["arm"] == a.name and r["unit"]["pretrain"]["w_min"] == win["w_min"]]
                out_by = _edge_step(win["lr"], same_w)
                if out_by:
                    more.append(unit("select", pre_of(a, win["lr"] * out_by, win["w_min"]), "val", select))
            if not more:
                break
            first += score(more)
        choices: dict[str, Any] = {}
        chosen: dict[str, dict[str, Any]] = {}
        for a in arm_list:
            mine = [r for r in first if r["unit"]["arm"] == a.name]
            chosen[a.name] = win = best(mine, "linear,knn")["unit"]["pretrain"]
            lrs = [r["unit"]["pretrain"]["lr"] for r in mine if r["unit"]["pretrain"]["w_min"] == win["w_min"]]
            choices[a.name] = {"lr": _chosen("lr", win["lr"], lrs)}
            if win["w_min"] is not None:
                choices[a.name]["w_min"] = _chosen("w_min", win["w_min"], args.w_mins)
        # the floor: the same model, never trained (fine-tuned from timm's own initialisation)
        random_arm = Arm("random", ())
        chosen["random"] = encoder(random_arm, args.lrs[0], seed0, 0)
        choices["random"] = {}

        # 2. each arm's fine-tuning lr, on val (extended the same way)
        def ft_unit(arm: str, lrs: list[float]) -> dict[str, Any]:
            return unit("ftlr", chosen[arm], "val", select, probes=False, ft_lrs=lrs, random=arm == "random")

        tuned = score([ft_unit(arm, args.ft_lrs) for arm in chosen])
        for _ in range(args.extend):
            more = []
            for arm in chosen:
                val = _ft_val([r for r in tuned if r["unit"]["arm"] == arm])
                out_by = _edge_step(max(val, key=val.get), list(val))
                if out_by:
                    more.append(ft_unit(arm, [max(val, key=val.get) * out_by]))
            if not more:
                break
            tuned += score(more)
        ft_lr: dict[str, float] = {}
        for arm in chosen:
            val = _ft_val([r for r in tuned if r["unit"]["arm"] == arm])
            ft_lr[arm] = max(val, key=val.get)
            choices[arm]["ft_lr"] = _chosen("ft_lr", ft_lr[arm], list(val))

        # 3. every pretraining seed at the choices, scored on test; the references beside them
        finals = []
        for arm, pre in chosen.items():
            for seed in args.seeds:
                finals.append(unit("final", {**pre, "seed": seed}, "test", tests, ft_lrs=[ft_lr[arm]],
                                   random=arm == "random", retrieval=True))
        refs = [] if args.no_references else [
            {"kind": "ref", "ref": name, "config": args.config, "overrides": args.set, "split": "test",
             "subsets": tests, "out": str(out)} for name in ("raw_pixels", "hog")]
        if not args.no_references and "random" in ft_lr:
            ceiling = {**chosen["random"], "arm": "supervised"}
            refs.append(unit("ceiling", ceiling, "test", [(1.0, s) for s in args.ft_seeds], probes=False,
                             ft_lrs=[ft_lr["random"]], random=True) | {"ft_steps": 3 * args.ft_steps})
        # 4. the curve: the control pretrained for fewer epochs, seed 0
        curve_units = []
        if CONTROL in chosen:
            for e in args.curve_epochs:
                control = next(a for a in arm_list if a.name == CONTROL)
                pre = encoder(control, chosen[CONTROL]["lr"], seed0, e)
                curve_units.append(unit("curve", pre, "test", [(SELECT_FRACTION, s) for s in args.ft_seeds],
                                        ft_lrs=[ft_lr[CONTROL]]))
        done = score(finals + refs + curve_units)

    final: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        u = r["unit"]
        if u["kind"] == "final":
            final.setdefault(u["arm"], []).append(r)
        elif u["kind"] in ("ref", "ceiling"):
            final.setdefault(u.get("ref") or "supervised", []).append(r)
    ft_lr["supervised"] = ft_lr.get("random", 0.0)
    what |= {"raw_pixels": "raw pixels (reference)", "hog": "HOG features (reference)",
             "supervised": "supervised ViT, all labels, from random init (the ceiling)"}
    for arm, results in final.items():
        choices.setdefault(arm, {})["shape"] = f"{len(results)} x {len(args.ft_seeds)}"
    fractions = sorted(set(args.fractions) | ({1.0} if "supervised" in final else set()))
    table = summarise(final, ft_lr, fractions)
    for arm, results in final.items():
        retrieval = [r["retrieval"] for r in results if "retrieval" in r]
        if retrieval:
            table[arm]["view_retrieval"] = 100 * statistics.fmean(retrieval)
        terms = [r["info"].get("second_half", {}) for r in results if r["info"].get("second_half")]
        if terms:
            table[arm]["training_terms"] = {k: statistics.fmean(t[k] for t in terms) for k in terms[0]}
        # L_min's job, judged by a critic that is not the training q (1,000 images each side)
        critics = [linear_gaussian_critic(_encoder(r["unit"], out)[0], data["train_eval"][:1000],
                                          data["test_eval"][:1000]) for r in results if r["unit"]["kind"] == "final"]
        if critics:
            table[arm]["posthoc"] = {k: [c[k] for c in critics] for k in critics[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"mimae-ablate on {args.shards}: config {args.config} {' '.join(args.set)}, {args.epochs} epochs, "
              f"seeds {args.seeds} x label seeds {args.ft_seeds}, fractions {args.fractions}; lr from {args.lrs}, "
              f"w_min from {args.w_mins}, fine-tuning lr from {args.ft_lrs} ({args.ft_steps} steps), all chosen "
              f"on val; {platform.node()}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s")
    md = markdown(table, choices, what, fractions, header)
    (args.out / "table.md").write_text(md)
    curve = {"epochs": [*args.curve_epochs, args.epochs]}
    panels = []
    for col in [f"{m}@{f:g}" for m in METRICS for f in args.fractions]:
        items = {arm: (row[col]["mean"], min(row[col]["seed_means"]), max(row[col]["seed_means"]))
                 for arm, row in table.items() if col in row}
        if items:
            panels.append((col, items))
    if panels:
        _plot(args.out / "ablation.png", list(table), panels)
    if curve_units and CONTROL in table and "random" in table:
        by_epochs = {r["unit"]["pretrain"]["epochs"]: r for r in done if r["unit"]["kind"] == "curve"}
        points: dict[str, list[tuple[float, float]]] = {}
        for metric in ("finetune", "linear"):
            key = f"{metric}@{SELECT_FRACTION:g}"
            pts = [(float(args.epochs), table[CONTROL][key]["mean"])]
            for e, r in by_epochs.items():
                pts.append((float(e), 100 * _hits([r], metric, SELECT_FRACTION, ft_lr[CONTROL]).mean()))
            points[f"{metric} 10%"] = pts
        lines = {f"random, {metric} 10%": table["random"][f"{metric}@{SELECT_FRACTION:g}"]["mean"]
                 for metric in ("finetune", "linear")}
        raw = table.get("raw_pixels", {}).get(f"linear@{SELECT_FRACTION:g}")
        if raw:
            lines["raw pixels, linear 10%"] = raw["mean"]
        _curve(args.out / "curve.png", points, lines)
        curve["points"] = points
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "choices": choices,
         "ft_lr": ft_lr, "config": dataclasses.asdict(cfg), "table": table, "curve": curve,
         "units": [{**r["unit"], "info": r["info"], "seconds": r["seconds"]} for r in done],
         "numpy": np.__version__, "torch": torch.__version__}, indent=2, default=str) + "\n")
    print(md)
    print(f"mimae-ablate: {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'ablation.png'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
