"""MI-MAE's method pieces: the CLUB critic and its knobs, padding rows, global InfoNCE, the MAE controls.

References are independent of the code under test: float64 math written out here, the same loss on
the batch with padding rows removed, a single process holding every rank's rows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mimae_scale import losses, masking
from mimae_scale.config import ConfigError, load_config
from mimae_scale.model import build_model
from mimae_scale.model.club import ClubCritic, min_weight, over_valid_rows
from mimae_scale.ops import REFERENCE


def tiny(*overrides):
    return load_config("tiny", list(overrides))


def tiny_model(*overrides):
    cfg = tiny(*overrides)
    return build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)


# --------------------------------------------------------------------------------------------
# padding rows


@pytest.mark.parametrize("loss", ["norm_pix_mse", "gaussian_nll", "club_upper_bound"])
def test_padding_rows_drop_out_of_row_losses(gen, loss):
    """over_valid_rows(loss) equals the loss of the valid rows alone, and padding rows get no gradient."""
    rows = 11
    valid = torch.rand(rows, generator=gen) < 0.6
    valid[0] = True
    if loss == "norm_pix_mse":
        pred = torch.randn(rows, 7, 12, generator=gen, dtype=torch.float64).requires_grad_()
        target = torch.randn(rows, 7, 12, generator=gen, dtype=torch.float64)
        mask = (torch.rand(rows, 7, generator=gen) < 0.7).double()
        mask[:, 0] = 1
        got = over_valid_rows(losses.norm_pix_mse, valid, pred, target, mask=mask)
        want = losses.norm_pix_mse(pred[valid], target[valid], mask[valid])
        leaf = pred
    else:
        mu = torch.randn(rows, 6, generator=gen, dtype=torch.float64).requires_grad_()
        logvar = (0.5 * torch.randn(rows, 6, generator=gen, dtype=torch.float64)).requires_grad_()
        x = torch.randn(rows, 6, generator=gen, dtype=torch.float64)
        if loss == "gaussian_nll":
            got = over_valid_rows(losses.gaussian_nll, valid, mu, logvar, x)
            want = losses.gaussian_nll(mu[valid], logvar[valid], x[valid])
        else:
            perm = losses.valid_permutation(valid, gen)
            got = over_valid_rows(losses.club_upper_bound, valid, mu, logvar, x, perm=perm)
            # the same pairing among the valid rows alone
            index = torch.full((rows,), -1, dtype=torch.long)
            index[valid] = torch.arange(int(valid.sum()))
            want = losses.club_upper_bound(mu[valid], logvar[valid], x[valid], index[perm[valid]])
        leaf = mu
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(got, [leaf])
    assert (grad[~valid] == 0).all() and grad[valid].abs().sum() > 0


def test_valid_permutation_pairs_valid_rows_with_valid_rows(gen):
    valid = torch.rand(40, generator=gen) < 0.5
    seen = set()
    for _ in range(30):
        perm = losses.valid_permutation(valid, gen)
        assert sorted(perm.tolist()) == list(range(40))  # a permutation
        assert valid[perm[valid]].all() and not valid[perm[~valid]].any()
        seen.update(zip(torch.nonzero(valid).flatten().tolist(), perm[valid].tolist(), strict=True))
    n = int(valid.sum())
    assert len(seen) > 0.5 * n * n  # spread over the valid rows, not a fixed pairing


def test_padding_images_change_no_loss_term(gen):
    """Whatever a padding image holds, every loss term (and q's fit) is the same."""
    cfg = tiny()
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    imgs = torch.randn(6, 3, 32, 32, generator=gen)
    valid = torch.tensor([True, True, False, True, False, True])
    other = imgs.clone()
    other[~valid] = torch.randn(int((~valid).sum()), 3, 32, 32, generator=gen)
    a = model(imgs, generator=torch.Generator().manual_seed(3), valid=valid, critic=copy.deepcopy(critic))
    b = model(other, generator=torch.Generator().manual_seed(3), valid=valid, critic=copy.deepcopy(critic))
    c = model(other, generator=torch.Generator().manual_seed(3), critic=copy.deepcopy(critic))  # all valid
    for name in a.terms:
        assert a.terms[name].item() == pytest.approx(b.terms[name].item(), rel=1e-5, abs=1e-7), name
    assert any(abs(a.terms[n].item() - c.terms[n].item()) > 1e-4 for n in ("rec", "max", "min"))


# --------------------------------------------------------------------------------------------
# InfoNCE over ranks


# --------------------------------------------------------------------------------------------
# the MAE controls


def test_mae4_loss_is_the_mean_of_four_single_mask_maes(gen):
    """K 4 without MI terms: the loss is the mean of four MAE losses, each on one of the same masks."""
    model = tiny_model("loss.w_max=0", "loss.w_min=0")
    imgs = torch.randn(3, 3, 32, 32, generator=gen)
    out = model(imgs, generator=torch.Generator().manual_seed(5))
    ids_keep, ids_restore, mask = masking.make_masks(3, model.num_patches, 4, 0.75, "orthogonal",
                                                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, out.mask)
    singles = []
    for k in range(4):  # rows i*4 + k: mask k of image i, run as a 1-mask MAE
        latent = model.encode(imgs, ids_keep[k::4], num_masks=1)
        pred = model.decode(latent, ids_restore[k::4])
        singles.append(losses.norm_pix_mse(pred, model.patchify(imgs), mask[k::4]))
    assert out.loss.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# the critic and its knobs


def test_q_steps_update_q_with_its_own_constant_lr_optimiser(gen):
    cfg = tiny("mi.club.q_steps=3", "mi.club.q_lr=2e-3")
    critic = ClubCritic(cfg)
    assert type(critic.optimizer) is torch.optim.Adam
    assert critic.optimizer.param_groups[0]["lr"] == 2e-3 and critic.optimizer.param_groups[0]["weight_decay"] == 0
    z, x = torch.randn(50, 64, generator=gen), torch.randn(50, 48, generator=gen)
    critic.fit(z, x, torch.ones(50, dtype=torch.bool), REFERENCE)
    assert all(critic.optimizer.state[p]["step"] == 3 for p in critic.params)
    assert critic.optimizer.param_groups[0]["lr"] == 2e-3  # constant: nothing schedules it


def test_critic_state_resumes_exactly(gen):
    cfg = tiny()
    z, x = torch.randn(40, 64, generator=gen), torch.randn(40, 48, generator=gen)
    ones = torch.ones(40, dtype=torch.bool)
    a = ClubCritic(cfg)
    b = ClubCritic(cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.fit(z, x, ones, REFERENCE)
    saved = copy.deepcopy(a.state_dict())
    a.fit(z, x, ones, REFERENCE)
    b.fit(z, x, ones, REFERENCE)
    c = ClubCritic(tiny("seed=9"))
    c.load_state_dict(saved)
    c.fit(z, x, ones, REFERENCE)
    for pa, pc in zip(a.params, c.params, strict=True):
        assert torch.equal(pa, pc)


def test_fixed_variance_is_club_mean(gen):
    cfg = tiny("mi.club.variance=fixed")
    critic = ClubCritic(cfg)
    assert critic.net.logvar_hidden is None
    mu, logvar = critic.net(torch.randn(5, 64, generator=gen))
    assert torch.equal(logvar, torch.zeros_like(mu))


@pytest.mark.parametrize("negatives", ["sampled", "closed_form"])
def test_detach_logvar_moves_the_encoder_through_the_mean_only(gen, negatives):
    z = torch.randn(30, 64, generator=gen, requires_grad=True)
    x = torch.randn(30, 48, generator=gen)
    ones = torch.ones(30, dtype=torch.bool)
    perm = torch.randperm(30, generator=gen)
    critic = ClubCritic(tiny("mi.club.detach_logvar=true", f"mi.club.negatives={negatives}"))

    def bound(mu, logvar):
        if negatives == "sampled":
            return losses.club_upper_bound(mu, logvar, x, perm) / 48
        return losses.club_closed_form(mu, logvar, x, ones) / 48

    (got,) = torch.autograd.grad(critic.upper_bound(z, x, ones, perm, REFERENCE), [z])
    mu, logvar = critic.net(z, detach_params=True)
    (want,) = torch.autograd.grad(bound(mu, logvar.detach()), [z], retain_graph=True)
    torch.testing.assert_close(got, want)
    (both,) = torch.autograd.grad(bound(mu, logvar), [z])
    assert (both - want).abs().max() > 1e-6  # the log-variance path does carry gradient when not detached


def test_reduction_and_target(gen):
    z, x = torch.randn(30, 64, generator=gen), torch.randn(30, 48, generator=gen)
    ones, perm = torch.ones(30, dtype=torch.bool), torch.randperm(30, generator=gen)
    mean, total = ClubCritic(tiny()), ClubCritic(tiny("mi.club.reduction=sum"))
    total.load_state_dict(mean.state_dict())
    assert total.upper_bound(z, x, ones, perm, REFERENCE).item() == pytest.approx(
        48 * mean.upper_bound(z, x, ones, perm, REFERENCE).item(), rel=1e-5)

    imgs = torch.randn(2, 3, 32, 32, generator=gen)
    pairs = {}
    for target in ("norm", "raw"):
        model = tiny_model(f"mi.club.target={target}")
        ids_keep, _, _ = masking.make_masks(2, 64, 4, 0.75, generator=torch.Generator().manual_seed(0))
        latent = model.encode(imgs, ids_keep)
        pairs[target] = model._club_pairs(imgs, latent, model.patchify(imgs), ids_keep, torch.ones(8, dtype=bool))[1]
    raw_patch = model.patchify(imgs)[0, ids_keep[0, 0]]
    torch.testing.assert_close(pairs["raw"][0], raw_patch)
    torch.testing.assert_close(pairs["norm"][0], losses.normalize_patches(raw_patch))


def test_w_min_warmup():
    cfg = tiny("loss.w_min=2.0", "loss.w_min_warmup_epochs=2")
    assert [min_weight(cfg, s, 10) for s in (0, 5, 10, 19, 20, 100)] == [0.0, 0.5, 1.0, 1.9, 2.0, 2.0]
    assert min_weight(tiny("loss.w_min=2.0"), 0, 10) == 2.0


@pytest.mark.parametrize(("override", "field"), [
    ("mi.club.q_lr=0", "mi.club.q_lr"), ("mi.club.q_steps=0", "mi.club.q_steps"),
    ("mi.club.variance=wide", "mi.club.variance"), ("mi.club.reduction=max", "mi.club.reduction"),
    ("mi.club.target=pixels", "mi.club.target"), ("mi.club.detach_logvar=maybe", "mi.club.detach_logvar"),
    ("loss.w_min_warmup_epochs=-1", "loss.w_min_warmup_epochs"),
    ("mi.club.logvar_cap=0", "mi.club.logvar_cap"), ("mi.club.logvar_cap=-1", "mi.club.logvar_cap"),
    ("mi.club.negatives=all", "mi.club.negatives"), ("mi.club.level=patch", "mi.club.level"),
])
def test_club_knobs_are_validated(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny(override)


def test_club_bound_holds_while_the_encoder_minimises_it():
    """z carries x (each visible token's latent is computed from its own patch): trained with w_min > 0,
    q keeps beating a z-blind Gaussian (club_q_gain > 0) and the CLUB estimate does not go negative."""
    torch.manual_seed(0)
    cfg = tiny("mask.num_masks=1", "loss.w_max=0", "loss.w_min=38.4")
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 3, 8, 8, generator=gen)
    stats = []
    for _ in range(60):
        idx = torch.randint(64, (16,), generator=gen)
        imgs = torch.nn.functional.interpolate(base[idx], size=32, mode="bilinear")  # smooth: patches have structure
        out = model(imgs, generator=gen, critic=critic)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        stats.append((out.terms["club_q_gain"].item(), out.terms["min"].item()))
    second = stats[30:]
    assert sum(g for g, _ in second) / len(second) > 0
    assert sum(m for _, m in second) / len(second) >= -0.05


def test_a_batch_of_padding_only_adds_nothing(gen):
    """A rank whose last batch is all padding: every term is 0 and finite, no gradient, q unchanged."""
    cfg = tiny()
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    before = [p.detach().clone() for p in critic.params]
    out = model(torch.randn(2, 3, 32, 32, generator=gen), generator=gen, valid=torch.zeros(2, dtype=torch.bool),
                critic=critic)
    for name in ("rec", "max", "min", "q"):
        assert out.terms[name].item() == 0.0, name
    out.loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(critic.params, before, strict=True))


# --------------------------------------------------------------------------------------------
# CLUB that can show a bound (issue #25): the uncapped variance, closed-form negatives, image level


def all_pairs_f64(mu, logvar, x, valid):
    """The CLUB authors' CLUB.forward in float64 over the valid rows: the N x N table of every
    (z_i, x_j) pair, j over all rows (i included), written out with no algebra."""
    mu, logvar, x = mu[valid].double(), logvar[valid].double(), x[valid].double()
    positive = -((mu - x) ** 2) / 2 / logvar.exp()
    negative = -((x[None, :, :] - mu[:, None, :]) ** 2).mean(dim=1) / 2 / logvar.exp()
    return (positive.sum(-1) - negative.sum(-1)).mean()


def test_closed_form_negatives_equal_all_pairs_in_float64(gen):
    rows, dim = 23, 7
    valid = torch.rand(rows, generator=gen) < 0.7
    valid[:2] = True
    mu = torch.randn(rows, dim, generator=gen).requires_grad_()
    logvar = (1.5 * torch.randn(rows, dim, generator=gen)).requires_grad_()  # beyond the old (-1, 1)
    x = torch.randn(rows, dim, generator=gen) * 3 + 1
    got = losses.club_closed_form(mu, logvar, x, valid)
    mu64, logvar64 = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    want = all_pairs_f64(mu64, logvar64, x, valid)
    # the estimate is a difference of terms far larger than itself (exp(-logvar) reaches ~90 here), computed
    # in float32: its error scales with the terms, not with the difference
    x64 = x.double()[valid]
    terms = (((x64 - mu64.detach()[valid]) ** 2 + x64.var(0, unbiased=False)) / logvar64.detach()[valid].exp())
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6 * terms.sum(-1).mean().item())
    got.backward()
    want.backward()
    torch.testing.assert_close(mu.grad, mu64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logvar.grad, logvar64.grad.float(), rtol=1e-4, atol=1e-6)
    assert (mu.grad[~valid] == 0).all()  # padding rows: neither anchors ...
    x_other = x.clone()
    x_other[~valid] = 100.0
    # ... nor negatives
    assert losses.club_closed_form(mu, logvar, x_other, valid).item() == pytest.approx(got.item(), rel=1e-6)
    assert losses.club_closed_form(mu, logvar, x, torch.zeros(rows, dtype=torch.bool)).item() == 0.0


def test_sampled_negatives_average_to_the_closed_form(gen):
    """Over every partner j != i the CLUBSample term averages to the all-pairs one rescaled by N / (N - 1)
    (the j == i pair adds 0 to the difference). Checked with all cyclic shifts (the losses run in float32)."""
    rows, dim = 9, 5
    mu, logvar, x = torch.randn(3, rows, dim, generator=gen, dtype=torch.float64)
    valid = torch.ones(rows, dtype=torch.bool)
    shifts = [losses.club_upper_bound(mu, logvar, x, (torch.arange(rows) + s) % rows) for s in range(1, rows)]
    closed = losses.club_closed_form(mu, logvar, x, valid)
    assert torch.stack(shifts).mean().item() == pytest.approx(closed.item() * rows / (rows - 1), rel=1e-6)


def test_critic_uses_the_configured_negatives(gen):
    z, x = torch.randn(30, 64, generator=gen), torch.randn(30, 48, generator=gen)
    valid = torch.ones(30, dtype=torch.bool)
    valid[-4:] = False
    closed = ClubCritic(tiny("mi.club.negatives=closed_form"))
    sampled = ClubCritic(tiny("mi.club.negatives=sampled"))
    sampled.net.load_state_dict(closed.net.state_dict())
    mu, logvar = closed.net(z)
    assert closed.upper_bound(z, x, valid, None, REFERENCE).item() == pytest.approx(
        losses.club_closed_form(mu, logvar, x, valid).item() / 48, rel=1e-6)
    perm = losses.valid_permutation(valid, gen)
    assert sampled.upper_bound(z, x, valid, perm, REFERENCE).item() == pytest.approx(
        over_valid_rows(losses.club_upper_bound, valid, mu, logvar, x, perm=perm).item() / 48, rel=1e-6)


@pytest.mark.parametrize("cap", [None, 1.0, 3.0])
def test_logvar_cap(gen, cap):
    """q's log-variance is the raw head output unless capped, then cap * tanh(raw / cap) (cap 1: CLUB's
    Tanh); checked against the head's own layers recomputed in float64."""
    critic = ClubCritic(tiny() if cap is None else tiny(f"mi.club.logvar_cap={cap}"))
    net = critic.net.double()
    z = 30 * torch.randn(40, 64, generator=gen, dtype=torch.float64)  # large inputs: raw outputs far beyond +-cap
    _, logvar = net(z)
    raw = net.logvar_out(torch.nn.functional.gelu(net.logvar_hidden(z)))
    want = raw if cap is None else cap * torch.tanh(raw / cap)
    torch.testing.assert_close(logvar, want)
    if cap is None:
        assert raw.abs().max() > 3.0  # uncapped here means values the old Tanh could not reach
    else:
        assert logvar.abs().max() <= cap


def test_uncapped_q_fits_a_narrow_conditional_the_old_cap_cannot():
    """x = A z + noise of std 0.05 (log-variance -6): uncapped, q's NLL goes far below what CLUB's Tanh
    (cap 1) allows, where its log-variances sit on the cap (issue #25)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 48, generator=gen) / 8
    z = torch.randn(512, 64, generator=gen)
    x = z @ a + 0.05 * torch.randn(512, 48, generator=gen)
    valid = torch.ones(512, dtype=torch.bool)
    nll = {}
    for cap in (None, 1.0):
        capped = [] if cap is None else [f"mi.club.logvar_cap={cap}"]
        critic = ClubCritic(tiny("mi.club.q_lr=3e-3", "mi.club.q_steps=400", *capped))
        terms = critic.fit(z, x, valid, REFERENCE)
        nll[cap] = terms["q"].item() / 2  # per-dim NLL in nats, without 1/2 log(2 pi)
        if cap is not None:
            assert terms["club_logvar_saturated"].item() > 0.5  # it sits on the cap
            assert terms["club_logvar_mean"].item() > -1.0
    # capped, logvar >= -1 so the NLL 1/2 (r^2 e^-logvar + logvar) >= -1/2 whatever q does; the true
    # conditional's is 1/2 (log 0.05^2 + 1) = -2.50, and uncapped q gets most of the way there
    assert nll[1.0] > -0.5
    assert 0.5 * (2 * math.log(0.05) + 1) < nll[None] < -1.5


def test_image_level_pairs_each_image_latent_with_the_image(gen):
    """`image`: one pair per image, z the mean of all its views' visible tokens (float64, from the
    encoder's own output), x the image normalised over its pixels."""
    cfg = tiny("mi.club.level=image")
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled).double()
    imgs = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    ids_keep, _, _ = masking.make_masks(3, model.num_patches, 4, 0.75, "orthogonal", generator=gen)
    latent = model.encode(imgs, ids_keep)
    valid = torch.tensor([True, False, True]).repeat_interleave(4)
    z, x, pair_valid = model._club_pairs(imgs, latent, model.patchify(imgs), ids_keep, valid)
    assert z.shape == (3, 64) and x.shape == (3, 3 * 32 * 32)
    assert pair_valid.tolist() == [True, False, True]
    for i in range(3):
        tokens = torch.cat([latent[i * 4 + k, 1:] for k in range(4)])  # 4 x 16 tokens: every patch once
        torch.testing.assert_close(z[i].double(), tokens.mean(0))
        flat = imgs[i].flatten()
        torch.testing.assert_close(x[i].double(), (flat - flat.mean()) / (flat.var() + 1e-6) ** 0.5,
                                   rtol=1e-5, atol=1e-5)
    assert ClubCritic(cfg).net.mu_out.out_features == 3 * 32 * 32


@pytest.mark.parametrize("overrides", [["mi.club.negatives=closed_form"], ["mi.club.level=image"],
                                       ["mi.club.level=image", "mi.club.negatives=closed_form"]])
def test_new_club_options_train_end_to_end(gen, overrides):
    """Each option runs the training forward with padding rows, gives a finite L_min that moves the
    encoder, and padding images change no term."""
    cfg = tiny(*overrides)
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    imgs = torch.randn(6, 3, 32, 32, generator=gen)
    valid = torch.tensor([True, True, False, True, False, True])
    other = imgs.clone()
    other[~valid] = torch.randn(2, 3, 32, 32, generator=gen)
    a = model(imgs, generator=torch.Generator().manual_seed(3), valid=valid, critic=copy.deepcopy(critic))
    b = model(other, generator=torch.Generator().manual_seed(3), valid=valid, critic=copy.deepcopy(critic))
    for name in a.terms:
        assert a.terms[name].item() == pytest.approx(b.terms[name].item(), rel=1e-5, abs=1e-7), name
    assert torch.isfinite(a.terms["min"])
    a.terms["min"].backward()
    encoder = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
