"""A stand-in for the GPU image's Python packages, to rehearse the bundle's install on another machine.

The GPU image already has PyTorch, Triton, timm and ~200 other packages (device/image_packages.txt,
as read on the lent machines in 2026-11); the bundle brings only what it lacks. To rehearse the
install without that image, this makes a folder of links to exactly those packages as found in
an existing environment (e.g. the project's .venv), and a fresh virtual environment sees that folder
through a .pth file: the project, DeepSpeed, webdataset and DALI must then come from the bundle.

    python device/image_standin.py --from .venv /tmp/image_site
    echo /tmp/image_site > /tmp/rehearse/lib/python3.11/site-packages/image.pth
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _tops(dist: metadata.Distribution) -> set[str]:
    return {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}


def _entry(file: Path, shared: set[str]) -> Path | None:
    """What to link for one of a distribution's files: its top-level folder or module, or, inside a
    folder several distributions install into (``nvidia/``), the sub-folder below it."""
    parts = file.parts
    if not parts or parts[0] in ("..", "__pycache__"):
        return None
    if parts[0] in shared and len(parts) > 2:
        return Path(parts[0], parts[1])
    return Path(parts[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="env", type=Path, required=True, help="environment holding the packages")
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    wanted = {normalise(n) for n in (Path(__file__).parent / "image_packages.txt").read_text().split() if n}
    site = next(args.env.resolve().glob("lib/python3*/site-packages"))
    args.out.mkdir(parents=True, exist_ok=True)
    linked, dists = [], list(metadata.distributions(path=[str(site)]))
    owners = Counter(top for dist in dists for top in _tops(dist))
    shared = {top for top, count in owners.items() if count > 1 and (site / top).is_dir()}
    for dist in dists:
        if normalise(dist.metadata["Name"]) not in wanted:
            continue
        for entry in {_entry(Path(str(f)), shared) for f in dist.files or []} - {None}:
            target = args.out / entry
            if (site / entry).exists() and not (target.exists() or target.is_symlink()):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(site / entry)
        linked.append(dist.metadata["Name"])
    print(f"{len(linked)} of the image's packages linked into {args.out}: {', '.join(sorted(linked))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
