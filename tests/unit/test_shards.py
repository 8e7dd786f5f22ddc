"""mimae-shards: build (validation, re-encoding, atomic restartable writes), index, verify, demo."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from mimae_scale.data_tools.build import BuildError, BuildSettings, build
from mimae_scale.data_tools.cli import main
from mimae_scale.data_tools.demo import write_demo
from mimae_scale.data_tools.encode import EncodeSettings
from mimae_scale.data_tools.index import index_path_for
from mimae_scale.data_tools.verify import verify
from PIL import Image
from wds2idx import IndexCreator

from tests.helpers.shard_helpers import jpeg_bytes


def _png_rgba(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 36, 4), dtype=np.uint8), "RGBA").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def source_tree(tmp_path: Path, seed: int) -> tuple[Path, dict[str, str]]:
    """Three classes of good images in several formats, plus planted bad inputs (path -> reason)."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "src"
    for c in ("cat", "dog", "eel"):
        (src / c).mkdir(parents=True)
        for i in range(7):
            (src / c / f"{i}.jpg").write_bytes(jpeg_bytes(rng))
    (src / "cat" / "progressive.jpg").write_bytes(jpeg_bytes(rng, progressive=True))
    (src / "dog" / "alpha.png").write_bytes(_png_rgba(rng))
    grey = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(grey, "JPEG")
    (src / "eel" / "grey.jpg").write_bytes(grey.getvalue())
    bad = {
        str(src / "cat" / "zero.jpg"): "empty",
        str(src / "dog" / "truncated.jpg"): "truncated",
        str(src / "eel" / "notes.jpg"): "not_image",
        str(src / "eel" / "tiny.jpg"): "too_small",
    }
    Path(next(k for k, v in bad.items() if v == "empty")).write_bytes(b"")
    Path(next(k for k, v in bad.items() if v == "truncated")).write_bytes(jpeg_bytes(rng, 64, 64)[:700])
    Path(next(k for k, v in bad.items() if v == "not_image")).write_text("this is not an image\n" * 20)
    Path(next(k for k, v in bad.items() if v == "too_small")).write_bytes(jpeg_bytes(rng, 8, 40))
    return src, bad


def _read_samples(out: Path) -> list[dict]:
    tars = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples()))


def test_build_rejects_planted_bad_inputs_and_reencodes(source_tree, tmp_path: Path) -> None:
    src, bad = source_tree
    out = tmp_path / "out"
    m = build(src, out, BuildSettings(shard_size=8, seed=1), progress=False)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejected} == bad
    assert m["total_inputs"] == 21 + 3 + 4 and m["total_rejected"] == 4 and m["total_samples"] == 24
    assert m["classes"] == ["cat", "dog", "eel"]
    assert m["total_reencoded"] == 2  # the progressive JPEG and the PNG; greyscale baseline stays as is
    assert sum(s["samples"] for s in m["shards"]) == 24
    samples = _read_samples(out)
    assert len(samples) == 24 and len({s["__key__"] for s in samples}) == 24
    for s in samples:
        path = s["path.txt"].decode()
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and not img.info.get("progressive")
        assert int(s["cls"]) == m["classes"].index(Path(path).parent.name)
        if path.endswith(("/0.jpg", "/grey.jpg")):  # baseline JPEGs are stored byte for byte
            assert s["jpg"] == Path(path).read_bytes()
    assert verify(out, progress=False) == []


def test_build_order_is_a_seeded_global_shuffle(source_tree, tmp_path: Path) -> None:
    src, _ = source_tree
    paths = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        build(src, tmp_path / name, BuildSettings(shard_size=5, seed=seed), progress=False)
        paths[name] = [s["path.txt"] for s in _read_samples(tmp_path / name)]
    assert paths["a"] == paths["b"] and paths["a"] != paths["c"]
    labels = [Path(p.decode()).parent.name for p in paths["a"]]
    assert labels != sorted(labels)


def test_interrupted_build_finishes_without_duplicates(source_tree, tmp_path: Path) -> None:
    src, _ = source_tree
    settings = BuildSettings(shard_size=4, seed=2)
    full = build(src, tmp_path / "full", settings, progress=False)
    out = tmp_path / "cut"
    build(src, out, settings, workers=2, progress=False)
    # Simulate a kill: two chunks never finished (no record; one left a temp file and a stale
    # tar half-written under a temp name), and no manifest was written yet.
    for name in ("train-000001.tar", "train-000004.tar"):
        (out / ".parts" / (name + ".json")).unlink()
        (out / name).rename(out / f".{name}.tmp-999")
    (out / "manifest.json").unlink()
    again = build(src, out, settings, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in full["shards"]]
    keys = [s["__key__"] for s in _read_samples(out)]
    assert len(keys) == len(set(keys)) == full["total_samples"]
    with pytest.raises(BuildError, match="settings"):
        build(src, out, BuildSettings(shard_size=5, seed=2), progress=False)


def test_max_side_shrinks_and_keeps_aspect(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "big.jpg").write_bytes(jpeg_bytes(rng, 120, 200))
    settings = BuildSettings(encode=EncodeSettings(max_side=50))
    build(tmp_path / "src", tmp_path / "out", settings, progress=False)
    (sample,) = _read_samples(tmp_path / "out")
    assert Image.open(io.BytesIO(sample["jpg"])).size == (50, 30)


def test_index_equals_dalis_wds2idx(source_tree, tmp_path: Path) -> None:
    src, _ = source_tree
    out = tmp_path / "out"
    build(src, out, BuildSettings(shard_size=10), progress=False)
    for tar in sorted(out.glob("*.tar")):
        ref = tmp_path / "ref.idx"
        with IndexCreator(str(tar), str(ref), verbose=False) as ic:
            ic.create_index()
        assert index_path_for(tar).read_text() == ref.read_text()


def test_verify_catches_damage(source_tree, tmp_path: Path) -> None:
    src, _ = source_tree
    out = tmp_path / "out"
    m = build(src, out, BuildSettings(shard_size=8), progress=False)
    names = [s["name"] for s in m["shards"]]
    assert verify(out, progress=False) == [] and main(["verify", str(out), "--quiet"]) == 0

    # Truncated tar.
    data = (out / names[0]).read_bytes()
    (out / names[0]).write_bytes(data[: len(data) // 2 + 100])
    problems = verify(out, progress=False)
    assert any(names[0] in p and "truncated" in p for p in problems)
    (out / names[0]).write_bytes(data)

    # Flipped bytes inside a JPEG's header tables: checksum mismatch and a named corrupt sample.
    with tarfile.open(out / names[1]) as tar:
        member = next(mm for mm in tar if mm.name.endswith(".jpg"))
    data = bytearray((out / names[1]).read_bytes())
    original = bytes(data)
    for k in range(member.offset_data + 2, member.offset_data + 40):
        data[k] ^= 0xFF
    (out / names[1]).write_bytes(bytes(data))
    problems = verify(out, progress=False)
    assert any(names[1] in p and "checksum mismatch" in p for p in problems)
    assert any(member.name.split(".")[0] in p and "corrupt JPEG" in p for p in problems)
    (out / names[1]).write_bytes(original)

    # Stale index: the index of another shard.
    idx0, idx2 = (out / names[0]).with_suffix(".idx"), (out / names[2]).with_suffix(".idx")
    saved = idx2.read_text()
    idx2.write_text(idx0.read_text())
    problems = verify(out, progress=False)
    assert any("stale index" in p and idx2.name in p for p in problems)
    assert main(["verify", str(out), "--quiet"]) == 1
    idx2.write_text(saved)
    assert verify(out, progress=False) == []


def test_verify_names_missing_component(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out = tmp_path / "out"
    out.mkdir()
    with wds.TarWriter(str(out / "x-000000.tar")) as w:
        w.write({"__key__": "a", "jpg": jpeg_bytes(rng), "cls": b"0"})
        w.write({"__key__": "b", "jpg": jpeg_bytes(rng)})
    main(["index", str(out / "x-000000.tar")])
    from mimae_scale.data_tools.shards import ShardRecord, sha256_file, write_manifest

    tar = out / "x-000000.tar"
    rec = ShardRecord(tar.name, "x-000000.idx", 2, tar.stat().st_size, sha256_file(tar))
    write_manifest(out, classes=["z"], shards=[rec], settings={}, inputs=2, rejected=0, reencoded=0, tool="t")
    assert verify(out, progress=False) == ["x-000000.tar: sample b: missing component cls"]


def test_demo_is_deterministic_balanced_and_valid(tmp_path: Path) -> None:
    kw = {"train_per_class": 12, "val_per_class": 3, "shard_size": 50}
    a = write_demo(tmp_path / "a", seed=5, **kw)
    b = write_demo(tmp_path / "b", seed=5, **kw)
    c = write_demo(tmp_path / "c", seed=6, **kw)
    shas = {k: [s["sha256"] for s in m["train"]["shards"]] for k, m in (("a", a), ("b", b), ("c", c))}
    assert shas["a"] == shas["b"] != shas["c"]
    assert a["train"]["total_samples"] == 120 and a["val"]["total_samples"] == 30
    labels = [int(s["cls"]) for s in _read_samples(tmp_path / "a" / "train")]
    assert np.bincount(labels).tolist() == [12] * 10
    val = [s["jpg"] for s in _read_samples(tmp_path / "a" / "val")]
    assert not set(val) & {s["jpg"] for s in _read_samples(tmp_path / "a" / "train")}  # held out
    for split in ("train", "val"):
        assert verify(tmp_path / "a" / split, progress=False) == []


def test_cli_demo_layout_and_bad_build_input(tmp_path: Path, capsys) -> None:
    assert main(["demo", str(tmp_path / "d"), "--train-per-class", "3", "--val-per-class", "2"]) == 0
    for split, n in (("train", 30), ("val", 20)):
        m = json.loads((tmp_path / "d" / split / "manifest.json").read_text())
        assert m["total_samples"] == n and (tmp_path / "d" / split / f"{split}-000000.idx").exists()
    assert main(["build", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--quiet"]) == 2
    assert "no such directory" in capsys.readouterr().err
