"""Test driver (run under a launcher by tests/integration/test_engine_multiprocess.py): one short training per
ZeRO stage, one after the other in the same ranks, so the launch cost is paid once.

Usage: stage_sweep.py ROOT STAGES [key.sub=value ...]  (STAGES like 0,1,2,3)
"""

import sys
from pathlib import Path

from mimae_scale.config import load_config
from mimae_scale.engine.distributed import detect_env
from mimae_scale.engine.signals import StopRequest
from mimae_scale.engine.trainer import Trainer
from mimae_scale.exit_codes import EXIT_OK


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    root, stages, overrides = Path(args[0]), [int(s) for s in args[1].split(",")], args[2:]
    env, stop = detect_env(), StopRequest()
    for stage in stages:
        cfg = load_config("tiny", [*overrides, f"run_dir={root / f'zero{stage}'}", f"engine.zero_stage={stage}"])
        trainer = Trainer(cfg, env, stop)
        trainer.setup()
        status = trainer.run()
        if status != EXIT_OK:
            return status
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
