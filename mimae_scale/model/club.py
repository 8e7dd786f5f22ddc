"""CLUB's approximation network q(x|z) as a critic with its own optimiser (docs/METHOD.md, "L_min").

CLUB bounds I(x; z) from above only while q(x|z) fits the current latents: the estimate
log q(x_r|z_r) - log q(x_perm(r)|z_r) is linear in q's mean, so an encoder that meets a stale or
badly fitted q can drive it below zero without removing any information. The CLUB authors' recipe,
followed here: q has its own optimiser (Adam, constant learning rate, no weight decay, no warm-up)
and takes ``mi.club.q_steps`` updates on the current step's detached pairs *before* the encoder's
L_min is computed with q's parameters detached. q lives outside the DeepSpeed engine (it is small
and the same on every rank): its gradients are averaged over the ranks here, and its weights and
optimiser state travel in the checkpoint through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from mimae_scale import losses
from mimae_scale.config import Config
from mimae_scale.model.heads import ApproximationNetwork

SATURATED = 0.99  # |log-variance| above this share of mi.club.logvar_cap sits on the cap


def club_x_dim(cfg: Config) -> int:
    """Width of x: a patch's pixels (`token`), the down-sampled image (`global`) or the image (`image`)."""
    m, club = cfg.model, cfg.mi.club
    side = {"token": m.patch_size, "global": club.global_size, "image": m.img_size}[club.level]
    return m.in_chans * side**2


def min_weight(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """w_min at optimiser step ``step`` (0-based): linear from 0 over ``loss.w_min_warmup_epochs``."""
    warmup = cfg.loss.w_min_warmup_epochs * steps_per_epoch
    if warmup <= 0 or step >= warmup:
        return cfg.loss.w_min
    return cfg.loss.w_min * step / warmup


def over_valid_rows(loss: Callable[..., torch.Tensor], weight: torch.Tensor, *rows: torch.Tensor,
                    **kwargs) -> torch.Tensor:
    """A row-mean ``loss`` over the rows whose ``weight`` is 1 (padding rows have 0).

    A zeroed row adds exactly 0 to every row-mean loss of :mod:`mimae_scale.losses` (and to its fused
    twin), and passes no gradient back; the mean over all rows is then rescaled to the valid ones. So
    the kernels need no padding logic of their own, and nothing waits for the host to count rows.
    """
    w = weight.float()
    zeroed = [t * w.view(-1, *([1] * (t.dim() - 1))).to(t.dtype) for t in rows]
    return loss(*zeroed, **kwargs) * (w.numel() / w.sum().clamp_min(1))  # all padding: 0, not NaN


def blind_gaussian_nll(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-dim NLL in nats, without the 2 pi constant, of a z-blind Gaussian fitted to the valid rows
    of x: the baseline that q must beat for L_min to be a bound (``club_q_gain``)."""
    w = weight.float()[:, None]
    count = w.sum().clamp_min(1)
    mean = (x.float() * w).sum(0) / count
    var = ((x.float() - mean) ** 2 * w).sum(0) / count
    return 0.5 * (torch.log(var.clamp_min(1e-12)) + 1.0).mean()


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """The mean of q's gradients over the ranks, in one all-reduce (every rank then takes the same step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


class ClubCritic:
    """q(x|z) with its own Adam. ``fit`` trains it on this step's pairs; ``upper_bound`` is L_min."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        club = cfg.mi.club
        self.club = club
        self.net = ApproximationNetwork(cfg.model.embed_dim, club.hidden_dim, club_x_dim(cfg),
                                        learned_variance=club.variance == "learned",
                                        logvar_cap=club.logvar_cap).to(device)
        self.params = list(self.net.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=club.q_lr)  # constant, no weight decay

    def _reduce(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The losses sum over x's dims; ``mean`` divides by their number (mi.club.reduction)."""
        return value / x.shape[-1] if self.club.reduction == "mean" else value

    def fit(self, z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, impl) -> dict[str, torch.Tensor]:
        """``q_steps`` updates of q on the detached pairs; returns L_q and q's health on them.

        The returned values are those of q's last update (computed before it): no extra pass.
        ``club_q_gain`` is, per dim and in nats, the NLL of a z-independent Gaussian fitted to the
        batch minus q's NLL: above 0 means q uses z (the 2 pi constants cancel)."""
        z = z.detach().float()
        # q trains even inside a no-grad forward of the model, and in fp32 under amp's autocast too (as
        # under DeepSpeed's bf16, where it is outside the engine): Adam turns bf16 noise into steps
        with torch.enable_grad(), torch.autocast(z.device.type, enabled=False):
            for _ in range(self.club.q_steps):
                mu, logvar = self.net(z)
                nll = self._reduce(over_valid_rows(impl.gaussian_nll, weight, mu, logvar, x), x)
                self.optimizer.zero_grad(set_to_none=True)
                nll.backward()
                _average_gradients(self.params)
                self.optimizer.step()
        with torch.no_grad():
            w = weight.float()[:, None]
            count = w.sum().clamp_min(1)
            per_dim_nll = 0.5 * (nll.detach() if self.club.reduction == "mean" else nll.detach() / x.shape[-1])
            logvar = logvar.detach()
            return {
                "q": nll.detach(),
                "club_q_gain": blind_gaussian_nll(x, weight) - per_dim_nll,
                "club_logvar_mean": (logvar * w).sum() / (count * logvar.shape[-1]),
                "club_logvar_saturated": self._saturated(logvar, w, count),
            }

    def _saturated(self, logvar: torch.Tensor, w: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Share of q's log-variances on the cap (mi.club.logvar_cap); uncapped, none can be."""
        if self.club.logvar_cap is None:
            return torch.zeros((), device=logvar.device)
        at_cap = (logvar.abs() > SATURATED * self.club.logvar_cap).float()
        return (at_cap * w).sum() / (count * logvar.shape[-1])

    def upper_bound(self, z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, perm: torch.Tensor | None,
                    impl) -> torch.Tensor:
        """L_min: CLUB's estimate with q's parameters detached, so it moves the encoder only (through
        q's mean alone with ``mi.club.detach_logvar``). ``mi.club.negatives``: ``sampled`` pairs each
        z with the x of row ``perm[r]`` (CLUBSample); ``closed_form`` takes every row as a negative,
        exactly (:func:`mimae_scale.losses.club_closed_form`; ``perm`` unused). The closed form is
        elementwise plus two column reductions, so it runs as plain PyTorch with or without kernels."""
        with torch.autocast(z.device.type, enabled=False):  # fp32, as in fit
            mu, logvar = self.net(z.float(), detach_params=True)
        if self.club.detach_logvar:
            logvar = logvar.detach()
        if self.club.negatives == "closed_form":
            return self._reduce(losses.club_closed_form(mu, logvar, x, weight), x)
        return self._reduce(over_valid_rows(impl.club_upper_bound, weight, mu, logvar, x, perm=perm), x)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])

