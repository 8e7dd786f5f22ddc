"""Test driver (run under a launcher by tests/integration/test_finetune.py): one fine-tuning step per ZeRO
stage, and how far each parameter moved. AdamW's first step moves every element by lr x g / (|g| + eps),
so the largest move of a tensor is the lr its group really used: schedule(0) x the group's lr_scale.

Usage: finetune_lr_probe.py OUT.json STAGES [key.sub=value ...]  (STAGES like 1,2,3)
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from mimae_scale.config import load_config
from mimae_scale.engine.distributed import detect_env
from mimae_scale.engine.signals import StopRequest
from mimae_scale.engine.trainer import Trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = list(trainer.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # no-op below ZeRO-3
        return {n: p.detach().float().clone() for n, p in trainer.engine.module.named_parameters()}


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, stages, overrides = Path(args[0]), [int(s) for s in args[1].split(",")], args[2:]
    env, stop = detect_env(), StopRequest()
    result = {}
    for stage in stages:
        cfg = load_config("finetune_tiny", [*overrides, f"run_dir={out.parent / f'zero{stage}'}",
                                            f"engine.zero_stage={stage}", "train.max_steps=1"])
        trainer = Trainer(cfg, env, stop)
        trainer.setup()
        before = weights(trainer)
        status = trainer.run()
        if status != 0:
            return status
        after = weights(trainer)
        result[stage] = {"lr": trainer.schedule(0),
                         "moved": {n: (after[n] - before[n]).abs().max().item() for n in before},
                         "groups": [{"lr": g["lr"], "lr_scale": g.get("lr_scale", 1.0)}
                                    for g in trainer.engine.optimizer.param_groups]}
    if env.rank == 0:
        out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
