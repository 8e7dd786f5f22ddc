"""A checkpoint resumes under another ZeRO stage: the universal copy our checkpoint manager makes
(DeepSpeed's converter, then made loadable by every stage) against the engine that never stopped.

One process (a world of one): the source engine trains two steps and saves through the real
CheckpointManager; a fresh engine of the target stage loads the converted copy. Its weights must be
the source's exactly, its parameter groups its own settings, and one more identical step on both
must agree bit for bit, which also checks the Adam moments and step count that came across (in a
world of one, ZeRO 1 and 3 take the same steps bit for bit).
"""

from __future__ import annotations

import deepspeed
import pytest
import torch

from mimae_scale.config import load_config
from mimae_scale.engine.checkpoint import CheckpointManager, RunConfig, TrainState, load_universal
from mimae_scale.engine.ds_config import build_ds_config
from mimae_scale.engine.optim import build_optimizer
from mimae_scale.model import build_model
from tests.helpers.ds_helpers import single_process_group

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def _engine(cfg, universal: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels="off")
    optimizer = build_optimizer(model, cfg, wrapped_by_deepspeed=True, device=CPU)
    ds_config = build_ds_config(cfg, 1, "fp32")
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _step(engine, seed: int) -> None:
    size = engine.module.patch_embed.img_size[0]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(images, generator=torch.Generator().manual_seed(seed)).loss)
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO 3
        return {k: v.detach().clone() for k, v in engine.module.named_parameters()}


@pytest.mark.parametrize("source, target", [(3, 1), (1, 3), (3, 2)])
def test_a_checkpoint_resumes_under_another_zero_stage(tmp_path, source: int, target: int) -> None:
    def cfg_for(stage: int):
        return load_config("tiny", [f"run_dir={tmp_path}", f"engine.zero_stage={stage}", "train.global_batch=4",
                                    "train.micro_batch=4", "loss.w_min=0", "kernels.enabled=off"])

    with single_process_group():
        before = _engine(cfg_for(source), universal=False)
        for seed in (1, 2):
            _step(before, seed)
        state = TrainState()
        state.register("config", RunConfig(cfg_for(source)), replicated=True)
        manager = CheckpointManager(tmp_path / "checkpoints", rank=0, keep_last=2)
        manager.save(before, 2, state, {"world_size": 1, "zero_stage": source, "fingerprint": "f", "method": {}})
        universal = manager.universal(manager.newest())

        after = _engine(cfg_for(target), universal=True)
        own = [{k: v for k, v in g.items() if k != "params"} for g in after.optimizer.param_groups]
        assert len({g["weight_decay"] for g in own}) == 2  # decay and no-decay groups
        path, client = load_universal(after, universal)
        assert path is not None and client["config"] == cfg_for(source).to_dict()

        want, got = _weights(before), _weights(after)
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), name
        assert [{k: v for k, v in g.items() if k != "params"} for g in after.optimizer.param_groups] == own

        _step(before, 3)
        _step(after, 3)
        want, got = _weights(before), _weights(after)
        for name in want:  # one process: the stages compute the same step bit for bit
            assert torch.equal(want[name], got[name]), name
