"""Reference rows (raw pixels, HOG) scored by the evaluation's own code (issue #25).

HOG is checked against scikit-image's ``hog`` on fresh random images (an independent
implementation); the raw-pixel row against the loader's images flattened here; the CLI on demo shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mimae_scale.data_tools.demo import write_demo

from mimae_scale.config import load_config
from mimae_scale.evaluation import cli
from mimae_scale.evaluation.features import extract_features
from mimae_scale.evaluation.knn import knn_evaluate
from mimae_scale.evaluation.reference import Hog, RawPixels, hog


@pytest.mark.parametrize(("shape", "integer", "orientations"),
                         [((32, 32), False, 9), ((30, 35), True, 9), ((28, 28), True, 12), ((16, 24), False, 6)])
def test_hog_equals_scikit_image(seed, shape, integer, orientations):
    """Integer images hit exact angles (0, 90 degrees, bin edges); 30x35 drops partial cells."""
    skimage_feature = pytest.importorskip("skimage.feature")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (3, *shape)).astype(np.float64) if integer else rng.standard_normal((3, *shape))
    want = np.stack([skimage_feature.hog(im, orientations=orientations, pixels_per_cell=(4, 4), cells_per_block=(2, 2),
                                         block_norm="L2-Hys", feature_vector=True) for im in images])
    got = hog(torch.from_numpy(images), orientations=orientations).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_hog_of_the_channel_mean_and_raw_pixels(gen):
    images = torch.randn(5, 3, 32, 32, generator=gen)
    torch.testing.assert_close(Hog().image_features(images), hog(images.mean(dim=1)))
    assert Hog().image_features(images).shape == (5, 7 * 7 * 2 * 2 * 9)
    torch.testing.assert_close(RawPixels().image_features(images), images.reshape(5, -1))


def test_extract_features_takes_image_features(gen):
    """A parameter-free reference goes through the same feature extraction, padding rows dropped."""
    images = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64)
    batches = [{"images": images[:4], "labels": torch.arange(4), "valid": torch.tensor([True, True, False, True])},
               {"images": images[4:], "labels": torch.arange(4, 6)}]
    feats, labels = extract_features(RawPixels(), batches)
    assert labels.tolist() == [0, 1, 3, 4, 5] and feats.dtype == torch.float32
    torch.testing.assert_close(feats, images[[0, 1, 3, 4, 5]].reshape(5, -1).float())


def test_compare_scores_references_with_the_same_probes(tmp_path: Path):
    write_demo(tmp_path / "demo", train_per_class=6, val_per_class=3, size=32)
    train, val = tmp_path / "demo" / "train", tmp_path / "demo" / "val"
    out = tmp_path / "eval.json"
    args = ["compare", "--config", "tiny", "--reference", "raw_pixels", "--reference", "hog", "--train", str(train),
            "--val", str(val), "--epochs", "3", "--device", "cpu", "--out", str(out)]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())["models"]
    assert set(report) == {"raw_pixels", "hog"}
    assert report["raw_pixels"]["feature_dim"] == 3 * 32 * 32 and report["hog"]["feature_dim"] == 1764
    # the raw-pixel kNN, recomputed from the loader's images flattened here
    cfg = load_config("tiny")
    flat = {}
    for split, path in (("train", train), ("val", val)):
        batches = list(cli.eval_loader(cfg, path, torch.device("cpu"), 16))
        images = torch.cat([b["images"][b["valid"].bool()] if "valid" in b else b["images"] for b in batches])
        labels = torch.cat([b["labels"][b["valid"].bool()] if "valid" in b else b["labels"] for b in batches])
        flat[split] = (images.reshape(len(images), -1).float(), labels.reshape(-1).long())
    want = knn_evaluate(*flat["train"], *flat["val"], 20, 0.07)
    assert report["raw_pixels"]["knn"]["top1"] == pytest.approx(want["top1"])
    assert cli.main(["compare", "--reference", "hog", "--train", str(train), "--val", str(val)]) == 2  # no config
