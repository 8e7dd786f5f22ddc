"""Exit statuses of every mimae_scale command: train.py, the CLIs, the Slurm launchers.

Written once here; ``launch/common.sh`` repeats the ones it acts on as ``MIMAE_EXIT_*`` (a shell
cannot import Python) and docs/CLUSTER.md tabulates them: tests/unit/test_exit_codes.py keeps both
equal to this module.
"""

EXIT_OK = 0  # the schedule (or train.max_steps) finished; a CLI did its work
EXIT_ERROR = 1  # any other error (a crash): the log says what
# Bad configuration or input, found before anything ran: a config error, unusable shards, a
# checkpoint of another method or one that cannot be read. Argparse's usage errors are 2 as well.
EXIT_CONFIG = 2
EXIT_NONFINITE = 3  # train.max_consecutive_skips non-finite steps in a row; the last checkpoint is intact
# EX_IOERR: the disk filled (ENOSPC/EDQUOT) while writing a checkpoint or shards; the previous checkpoint
# is intact. Launchers do not requeue it: the requeued job would meet the same full disk.
EXIT_DISK_FULL = 74
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after a complete checkpoint; a launcher requeues


def exit_codes() -> dict[str, int]:
    """Every status by name (``EXIT_...``), for the tests that hold the shell and the docs to it."""
    return {name: value for name, value in globals().items() if name.startswith("EXIT_")}
