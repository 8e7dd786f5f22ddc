"""The speed options give the results of the plain path, on the CPU: the precision modes through the
real Trainer.train_step, compiled blocks against eager, the fused optimiser against the loop, and
the kernels importable from a plain checkout (PYTHONPATH=.)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mimae_scale.config import load_config
from mimae_scale.engine.distributed import destroy_process_group, detect_env
from mimae_scale.engine.signals import StopRequest
from mimae_scale.engine.trainer import Trainer
from mimae_scale.model import build_model
from mimae_scale.model.compile import compile_blocks

CPU = torch.device("cpu")


def _one_step(tmp_path: Path, precision: str, kernels: str) -> dict:
    cfg = load_config("tiny", [f"run_dir={tmp_path / precision / kernels}", "data.backend=synthetic",
                               "train.micro_batch=4", "train.global_batch=4", "metrics.enabled=false",
                               f"engine.precision={precision}", f"kernels.enabled={kernels}"])
    trainer = Trainer(cfg, detect_env({}), StopRequest())
    trainer.setup()
    try:
        module = trainer.engine.module
        dtypes = {"weights": module.blocks[0].attn.qkv.weight.dtype, "norm": module.norm.weight.dtype,
                  "pos_embed": module.pos_embed.dtype}
        out = trainer.train_step(iter([next(iter(trainer.loader))]))
        assert out.applied
        return {"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()}, "dtypes": dtypes}
    finally:
        trainer.metrics.close()
        destroy_process_group()


def test_precision_modes_agree_with_fp32(tmp_path):
    """amp (fp32 weights, bf16 autocast) and DeepSpeed's bf16 give fp32's loss terms to bf16 accuracy
    (inputs and weights rounded to 8 bits of mantissa: 2^-8 relative per value; 3% leaves room for the
    sums); amp keeps weights, norms and the sin-cos table in fp32, bf16 casts every parameter."""
    fp32 = _one_step(tmp_path, "fp32", "off")
    amp = _one_step(tmp_path, "amp", "off")
    bf16 = _one_step(tmp_path, "bf16", "off")
    assert set(fp32["dtypes"].values()) == {torch.float32}
    assert set(amp["dtypes"].values()) == {torch.float32}
    assert bf16["dtypes"]["weights"] == bf16["dtypes"]["norm"] == torch.bfloat16  # (buffers: DeepSpeed's choice)
    for name in ("loss", "rec", "max", "min", "q"):
        # L_min is a difference of two NLL-sized sums that nearly cancel: its rounding scales with q
        size = abs(fp32["q"]) if name == "min" else abs(fp32[name])
        for mode, got in (("amp", amp), ("bf16", bf16)):
            assert abs(got[name] - fp32[name]) <= 3e-2 * size + 1e-3, (mode, name, got[name], fp32[name])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on the CPU need the interpreter")
def test_amp_with_the_kernels_matches_the_references(tmp_path):
    """Under autocast the kernels receive bf16 activations beside fp32 tables and targets (mixed dtypes)."""
    reference = _one_step(tmp_path, "amp", "off")
    kernels = _one_step(tmp_path, "amp", "on")
    for name in ("loss", "rec", "max", "min", "q"):
        size = abs(reference["q"]) if name == "min" else abs(reference[name])
        assert abs(kernels[name] - reference[name]) <= 1e-2 * size + 1e-3, (name, kernels[name], reference[name])


@pytest.mark.slow  # inductor compiles two blocks forward and backward: ~1 min on 2 cores
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """engine.compile: inductor-compiled blocks against eager ones, same weights, masks and images
    (fp32 on the CPU: equal up to float32 reassociation in the generated code)."""
    cfg = load_config("tiny", ["model.depth=1", "model.decoder_depth=1", "model.embed_dim=16", "model.num_heads=2",
                               "model.decoder_embed_dim=16", "model.decoder_num_heads=2"])
    torch.manual_seed(0)
    eager = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    compiled = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == 2
    images = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (eager, compiled):
        out = model(images, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names


