import pytest
import torch

from mimae_scale.config import load_config
from mimae_scale.metrics import CLUB_HEALTH
from mimae_scale.model import build_model
from mimae_scale.model.club import ClubCritic
from mimae_scale.model.pos_embed import sincos_2d


def tiny(*overrides):
    return load_config("tiny", list(overrides))


def tiny_model(*overrides):
    cfg = tiny(*overrides)
    return build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)


def test_patchify_roundtrip(gen):
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32, generator=gen)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(model.unpatchify(patches), imgs)
    # patch 1 is the second 4x4 tile of the first row, pixels (row, col, channel)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_sincos_matches_mae_formula():
    emb = sincos_2d(8, 3)
    assert emb.shape == (10, 8) and torch.all(emb[0] == 0)
    # position (h=1, w=2) is index 1*3+2 = 5 (+1 for cls); first half embeds w, second half h
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    w_part = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega)])
    h_part = torch.cat([torch.sin(1 * omega), torch.cos(1 * omega)])
    assert torch.allclose(emb[6].double(), torch.cat([w_part, h_part]), atol=1e-6)


def test_tiny_forward_backward(gen):
    cfg = tiny()
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    imgs = torch.randn(4, 3, 32, 32, generator=gen)
    out = model(imgs, generator=gen, critic=critic)
    assert set(out.terms) == {"rec", "max", "min", "q", *CLUB_HEALTH}
    assert out.pred.shape == (16, 64, 48) and out.mask.shape == (16, 64)
    assert all(torch.isfinite(t) for t in out.terms.values())
    # the headline loss is the encoder's objective; q's own NLL is not part of it
    expected = out.terms["rec"] + 0.1 * out.terms["max"] + cfg.loss.w_min * out.terms["min"]
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _grad_names(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("level", ["token", "global", "image"])
def test_club_gradient_isolation(gen, level):
    """q's updates happen inside forward and touch no model parameter; L_min moves the encoder only."""
    cfg = tiny(f"mi.club.level={level}")
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q_before = [p.detach().clone() for p in critic.params]
    out = model(torch.randn(4, 3, 32, 32, generator=gen), generator=gen, critic=critic)
    assert all(p.grad is None for p in model.parameters())  # q's backward passes stayed inside q
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(not torch.equal(p, b) for p, b in zip(critic.params, q_before, strict=True))  # q moved
    q_grads = [p.grad.clone() for p in critic.params]
    min_moves = _grad_names(model, out.terms["min"])
    assert all(torch.equal(p.grad, g) for p, g in zip(critic.params, q_grads, strict=True))  # L_min: not q
    assert any(n.startswith("blocks.") for n in min_moves)  # ... but the encoder
    assert not any(n.startswith("decoder") for n in min_moves)


def test_mae_special_case_equals_mae(seed):
    """K 1 and zero MI weights: the loss is exactly MAE's, computed here as the MAE repo does."""
    cfg = tiny("mask.num_masks=1", "loss.w_max=0", "loss.w_min=0")
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled).eval()
    assert model.projector is None
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ours = model(imgs, generator=torch.Generator().manual_seed(seed))
    assert set(ours.terms) == {"rec"}

    # MAE's models_mae.py, step by step, with the same noise
    g = torch.Generator().manual_seed(seed)
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    n, length, d = x.shape
    len_keep = int(length * (1 - 0.75))
    noise = torch.rand(n, length, generator=g)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls_token = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)
    x = model.decoder_embed(x)
    mask_tokens = model.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    target = model.patchify(imgs)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mae_loss = (loss * mask).sum() / mask.sum()

    assert torch.equal(ours.mask, mask)
    assert torch.allclose(ours.loss, mae_loss, rtol=1e-6, atol=1e-7)


def test_mae4_control_has_no_mi_heads(gen):
    cfg = load_config("mae4_vit_b16", ["model.depth=1", "model.decoder_depth=1"])
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss)
    assert model.projector is None
    out = model(torch.randn(2, 3, 224, 224, generator=gen), generator=gen)
    assert set(out.terms) == {"rec"} and out.pred.shape[0] == 8


def test_mae_initialisation():
    model = tiny_model()
    w = model.patch_embed.proj.weight
    fan_in, fan_out = w[0].numel(), w.shape[0]
    bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform of the patch embedding as a Linear
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    assert abs(model.cls_token.std().item() - 0.02) < 0.01
    for block in model.blocks:
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.norm1.weight == 1)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name", ["mimae_vit_b16", "mimae_vit_l16", "mimae_vit_h14"])
def test_encoder_sizes_match_timm(name):
    """The encoder of each shipped size has timm's ViT parameter count (meta device: no memory)."""
    import timm

    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
        reference = timm.create_model(
            {"mimae_vit_b16": "vit_base_patch16_224", "mimae_vit_l16": "vit_large_patch16_224",
             "mimae_vit_h14": "vit_huge_patch14_224"}[name], num_classes=0)
    ours = {n: p.shape for n, p in model.named_parameters() if n.split(".")[0] in
            {"patch_embed", "cls_token", "blocks", "norm"}}
    theirs = {n: p.shape for n, p in reference.named_parameters() if n != "pos_embed"}
    assert ours == theirs
    ours_count = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in
                     {"patch_embed", "cls_token", "blocks", "norm"}) + model.pos_embed.numel()
    assert ours_count == sum(p.numel() for p in reference.parameters())


def test_sdpa_attention_in_blocks():
    model = tiny_model()
    assert all(block.attn.fused_attn for block in model.blocks)


def test_forward_features_shape(gen):
    model = tiny_model()
    feats = model.forward_features(torch.randn(2, 3, 32, 32, generator=gen))
    assert feats.shape == (2, 65, 64)
    assert torch.allclose(feats.mean(-1), torch.zeros(2, 65), atol=1e-5)  # after LayerNorm
