"""Test driver (run under a launcher by tests/integration/test_finetune.py): top-1/top-5 of a seeded random
classifier on held-out shards, from this world's ranks; rank 0 writes the result.

Usage: eval_ranks.py OUT.json [key.sub=value ...]
"""

import json
import sys
from pathlib import Path

import torch

from mimae_scale.config import load_config
from mimae_scale.data import build_eval_loader
from mimae_scale.engine.distributed import detect_env, init_process_group, pick_device
from mimae_scale.evaluation.classify import evaluate_classifier
from mimae_scale.model.classifier import build_classifier


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, overrides = Path(args[0]), args[1:]
    env = detect_env()
    device = pick_device(env)
    init_process_group(env, device)
    cfg = load_config("finetune_tiny", overrides)
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread the logits: a random head that is not uniform
    loader = build_eval_loader(cfg, cfg.data.val_shards, env.rank, env.world_size, device, batch_size=4)
    first = evaluate_classifier(model, loader, device)
    again = evaluate_classifier(model, loader, device)  # a second pass over the same loader
    if env.rank == 0:
        out.write_text(json.dumps({"first": first, "again": again, "world_size": env.world_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
