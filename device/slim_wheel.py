"""Rewrite a wheel without what one Python version on Linux never loads, so the GPU bundle fits its calls.

DALI's and nvImageCodec's wheels are ``py3-none`` and carry one extension module per CPython
version (3.9 ... 3.15, free-threaded builds too); nvCOMP's carries a command-line tool and C
headers. A slim wheel keeps the extension modules of the target version (and version-independent
ones), drops the others, ``bin/`` and ``include/`` trees of ``nvidia/*`` packages, and rewrites
RECORD to match, so pip installs it like the original.

    python device/slim_wheel.py --python 3.12 IN.whl OUT_DIR
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

EXTENSION = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")


def keep(name: str, tag: str) -> bool:
    match = EXTENSION.search(name)
    if match and match.group(1) != tag:
        return False
    parts = name.split("/")
    return not (len(parts) > 3 and parts[0] == "nvidia" and parts[2] in ("bin", "include"))


def slim(src: Path, out_dir: Path, python: str) -> tuple[int, int]:
    tag = python.replace(".", "")
    out = out_dir / src.name
    dropped = 0
    # stored, not deflated: the bundle compresses all wheels together with xz, far better than zip
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        kept = [i for i in zin.infolist() if keep(i.filename, tag)]
        dropped = len(zin.infolist()) - len(kept)
        names = {i.filename for i in kept}
        for info in kept:
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] in names]
                data = ("\n".join(lines) + "\n").encode()
            info.compress_type = zipfile.ZIP_STORED  # writestr keeps the entry's own method otherwise
            zout.writestr(info, data)
    return dropped, out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", required=True, help="target CPython version, e.g. 3.12")
    p.add_argument("wheel", type=Path)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    dropped, size = slim(args.wheel, args.out_dir, args.python)
    print(f"{args.wheel.name}: {dropped} files dropped, {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
