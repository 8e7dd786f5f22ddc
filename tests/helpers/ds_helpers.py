"""Real DeepSpeed checkpoints for the evaluation tests: a one-process gloo group and a short run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from mimae_scale.config import load_config
from mimae_scale.engine.distributed import destroy_process_group, free_port
from mimae_scale.model import build_model


@contextlib.contextmanager
def single_process_group():
    """A world of one (gloo), unless the test process already has a group."""
    created = not dist.is_initialized()
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {name: os.environ.get(name) for name in names}
    if created:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        if created:
            destroy_process_group()
            # the variables go too: a later test's subprocess would otherwise take this stale port as its own
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def train_and_save(run_dir: Path, config: str, stage: int, seed: int, overrides: tuple[str, ...] = ()) -> dict:
    """One SGD step of the config's model under a DeepSpeed engine with ZeRO ``stage``, saved by
    ``engine.save_checkpoint`` (config in the client state, as the trainer does). Returns the
    weights before and after the step (gathered under ZeRO-3), the config and the tag folder."""
    cfg = load_config(config, [f"run_dir={run_dir}", f"engine.zero_stage={stage}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
                 "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    size = cfg.model.img_size
    imgs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(imgs).loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO-3
        trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag="global_step1", client_state={"config": cfg.to_dict()})
    del engine
    return {"initial": initial, "trained": trained, "cfg": cfg, "folder": run_dir / "checkpoints" / "global_step1"}
