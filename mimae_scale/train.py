"""Train MI-MAE: ``python|deepspeed|torchrun|srun ... mimae_scale/train.py --config NAME [key.sub=value ...]``.

Exit status: 0 finished (schedule or train.max_steps); 75 stopped by SIGUSR2/SIGTERM after a
checkpoint (requeue); 74 the disk filled while writing a checkpoint (one line naming the path, the
bytes needed and free; the previous checkpoint intact, the partial one removed; not requeued);
3 too many consecutive non-finite steps (last checkpoint intact); 2 bad
configuration or input (nothing ran: a config error, unusable shards, a checkpoint of another
method, every checkpoint damaged), one line naming the setting or files; 1 any other error.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, Python puts this file's directory first on sys.path, where our module names
    # (config, data, model, engine ...) would shadow installed libraries of the same name.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]

import argparse
import logging

from mimae_scale.config import ConfigError, load_config, validate
from mimae_scale.data import remote
from mimae_scale.data.shardset import DataError
from mimae_scale.diskfull import DiskFull
from mimae_scale.engine.checkpoint import CheckpointMismatch, CheckpointUnusable
from mimae_scale.engine.distributed import detect_env
from mimae_scale.engine.signals import StopRequest
from mimae_scale.engine.trainer import Trainer
from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_DISK_FULL, EXIT_ERROR

log = logging.getLogger("mimae_scale.engine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a shipped config's name (e.g. tiny) or a YAML path")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (unused: "
                        "LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied over the config")
    return parser.parse_args(argv)


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs progress to the console and train.log; other ranks only their warnings and errors."""
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    run_dir.mkdir(parents=True, exist_ok=True)
    logfile = logging.FileHandler(run_dir / "train.log")
    logfile.setFormatter(fmt)
    root.addHandler(logfile)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat what we log


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest()
    stop.install()  # before anything slow, so an early preemption is not lost
    args = parse_args(argv)
    env = detect_env()
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, env.world_size)
    except ConfigError as exc:
        print(f"ConfigError: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(Path(cfg.run_dir), env.rank)
    remote.use_endpoint(cfg.data.s3_endpoint_url)  # before anything reads shards (the label check too)
    trainer = Trainer(cfg, env, stop)
    try:
        trainer.setup()
    except (ConfigError, DataError, CheckpointMismatch, CheckpointUnusable) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_CONFIG
    try:
        return trainer.run()
    except DiskFull as exc:
        log.error("DiskFull: %s", exc)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    try:
        status = main()
    except Exception:
        logging.getLogger("mimae_scale.engine").exception("training failed")
        status = EXIT_ERROR
    sys.exit(status)
