"""``python -m mimae_scale.gpubench``: ``mimae-bench gpu`` without mimae_scale.bench, whose other
sub-commands import the configuration (pydantic). The kernel proof must run where installing the
project's dependencies failed (device/call.sh)."""

from __future__ import annotations

import argparse
import sys

from mimae_scale import gpubench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimae_scale.gpubench",
                                     description=gpubench.__doc__.splitlines()[0])
    gpubench.add_arguments(parser)
    return gpubench.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
