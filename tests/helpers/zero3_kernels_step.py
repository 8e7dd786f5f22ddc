"""Training steps of the tiny MI-MAE with kernels.enabled=on inside a DeepSpeed ZeRO-3 engine (CPU).

Run by tests/integration/test_kernels_zero3.py as WORLD_SIZE processes (env: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TRITON_INTERPRET=1). Every parameter is partitioned (persistence threshold 0), so the
mask token and the MI heads' weights exist only while ZeRO-3 has gathered them for a module's
forward. Rank 0 prints one JSON line: losses with kernels off and on at the same parameters and
masks, per-step losses, kernel call counts, and whether the parameters moved.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections import Counter

import deepspeed
import torch

from mimae_scale import kernels
from mimae_scale.config import load_config
from mimae_scale.model import build_model
from mimae_scale.model.club import ClubCritic
from mimae_scale.ops import REFERENCE
from mimae_scale.precision import deepspeed_bf16, input_dtype

KERNELS = tuple(vars(REFERENCE))  # the hot-path ops (mimae_scale.ops)


def count_calls(calls: Counter) -> None:
    """Wrap the kernels module's functions (the model looks them up there on every call)."""
    for name in KERNELS:
        inner = getattr(kernels, name)

        def counted(*args, _inner=inner, _name=name, **kwargs):
            calls[_name] += 1
            return _inner(*args, **kwargs)

        setattr(kernels, name, counted)


def main() -> None:
    precision = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)  # identical initial weights on every rank
    # sampled negatives: the closed form (the default) is plain PyTorch, and every kernel must run here
    cfg = load_config("tiny", ["kernels.enabled=on", "mi.club.negatives=sampled"])
    model, critic = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled), ClubCritic(cfg)
    calls: Counter = Counter()
    count_calls(calls)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},  # no JIT-built op
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": deepspeed_bf16(precision)},
        "steps_per_print": 1000,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    dtype = input_dtype(precision)
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)

    with torch.no_grad():
        engine.module.kernels_enabled = "off"
        # a copy of q: the first step below starts from the same q and fits it the same way
        reference = engine(imgs, generator=torch.Generator().manual_seed(7),
                           critic=copy.deepcopy(critic)).loss.float().item()
        engine.module.kernels_enabled = "on"
        calls.clear()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        before = [p.detach().float().clone() for p in engine.module.parameters()]

    step_losses = []
    for step in range(2):
        out = engine(imgs, generator=torch.Generator().manual_seed(7 + step), critic=critic)
        engine.backward(out.loss)
        engine.step()
        step_losses.append(out.loss.float().item())

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        after = [p.detach().float().clone() for p in engine.module.parameters()]
    moved = sum(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    if rank == 0:
        result = {"world": world, "precision": precision, "reference_loss": reference, "step_losses": step_losses,
                  "q_steps": cfg.mi.club.q_steps,
                  "calls": dict(calls), "params_moved": moved, "params": len(before)}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
