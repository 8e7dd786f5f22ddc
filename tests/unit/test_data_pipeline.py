"""Input pipelines on real shards: the CPU-only DALI pipeline, and the webdataset fallback.

Shards are written so that sample i has label i: the labels of a batch's valid rows name exactly
which samples it holds, so exactly-once, ordering and resume are checked sample by sample.
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from mimae_scale.data_tools.cli import main as shards_main

from mimae_scale.config import load_config
from mimae_scale.data import build_eval_loader, build_train_loader
from mimae_scale.data.dali_loader import labels_from_ascii
from mimae_scale.data.shardset import DataError
from tests.helpers.shard_helpers import jpeg_bytes, write_id_shards

N, PER_SHARD, BATCH = 103, 16, 8  # uneven: 7 tars, the last one short; 103 is prime
BACKENDS = ["dali", "webdataset"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("id_shards")
    write_id_shards(out, N, PER_SHARD)
    return out


def _cfg(backend: str, shards: Path, seed: int = 0, **extra):
    overrides = [
        f"data.backend={backend}",
        f"data.train_shards={shards}",
        f"train.micro_batch={BATCH}",
        "data.shuffle_buffer=12",
        f"seed={seed}",
    ]
    return load_config("tiny", overrides + [f"{k}={v}" for k, v in extra.items()])


def _epoch(loader) -> tuple[list[int], list[dict]]:
    """Valid labels of one epoch in order, and the raw batches."""
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    labels = [int(v) for b in batches for v in b["labels"][b["valid"]]]
    return labels, batches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch(backend: str, world: int, id_shards: Path) -> None:
    cfg = _cfg(backend, id_shards)
    loaders = [build_train_loader(cfg, r, world, CPU) for r in range(world)]
    steps = math.ceil(math.ceil(N / world) / BATCH)
    assert {ld.steps_per_epoch for ld in loaders} == {steps}
    orders = []
    for _epoch_no in range(3):
        seen = []
        for ld in loaders:
            labels, batches = _epoch(ld)
            for b in batches:
                assert b["images"].shape == (BATCH, 3, 32, 32) and b["images"].dtype == torch.float32
                assert b["labels"].dtype == torch.int64 and b["valid"].dtype == torch.bool
                assert b["valid"][: int(b["valid"].sum())].all()  # padding only at a batch's tail
            seen += labels
        assert sorted(seen) == list(range(N))  # every sample, none twice
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_and_augmentation_repeat_for_a_seed(backend: str, id_shards: Path) -> None:
    def first_two_epochs(seed: int):
        ld = build_train_loader(_cfg(backend, id_shards, seed), 0, 1, CPU)
        (l0, b0), (l1, _) = _epoch(ld), _epoch(ld)
        return l0, l1, b0[0]["images"]

    a, b, c = first_two_epochs(7), first_two_epochs(7), first_two_epochs(8)
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[0] != c[0]
    assert a[0] != sorted(a[0])  # shuffled, not stored order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "stop_at, exhaust",
    [(3, False), (7, False), (7, True), (10, False)],  # mid-epoch; at the end (7 steps), also after the
)  # pass's loop finished (the usual place to save); into the next epoch
def test_resume_yields_the_same_next_batches(backend: str, stop_at: int, exhaust: bool, id_shards: Path) -> None:
    cfg = _cfg(backend, id_shards, seed=3)
    world, rank = 2, 1
    ref = build_train_loader(cfg, rank, world, CPU)
    assert ref.steps_per_epoch == 7
    reference = [b for _ in range(3) for b in ref]  # three epochs

    first = build_train_loader(cfg, rank, world, CPU)
    it, taken = iter(first), 0
    while taken < stop_at:
        next(it)
        taken += 1
        if taken % 7 == 0 and (exhaust or taken < stop_at):
            assert next(it, None) is None  # the pass ends after steps_per_epoch batches
            it = iter(first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the state travels through a checkpoint file
    # Saving does not disturb the run that goes on (the uninterrupted run saves checkpoints too).
    live = itertools.chain(it, *(first for _ in range(3)))
    for want in reference[stop_at:]:
        assert torch.equal(want["images"], next(live)["images"])
    del first, it, live

    resumed = build_train_loader(cfg, rank, world, CPU)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    after = []
    while len(after) < len(reference) - stop_at:
        after += list(resumed)
    for want, got in zip(reference[stop_at:], after, strict=False):
        assert torch.equal(want["labels"], got["labels"])
        assert torch.equal(want["valid"], got["valid"])
        assert torch.equal(want["images"], got["images"])


def _valid_labels(batch: dict) -> list[int]:
    return [int(v) for v in batch["labels"][batch["valid"]]]


def _through_a_file(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)  # the state travels through a checkpoint file
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "old_world, old_accum, new_world, new_accum, stop_step",
    [(2, 1, 1, 2, 3), (1, 2, 2, 1, 2), (3, 1, 1, 3, 2), (1, 3, 3, 1, 1), (2, 1, 3, 1, 5)],
)
def test_another_layout_goes_on_with_the_rest_of_the_epoch(backend: str, old_world: int, old_accum: int,
                                                            new_world: int, new_accum: int, stop_step: int,
                                                            id_shards: Path) -> None:
    """Ranks of one layout stop mid-epoch; a layout with another number of ranks (same images per
    step, so another accumulation) goes on with exactly the samples none of them used: the epoch
    holds every sample once. The rest of the epoch resumes exactly on its own layout, and the
    next epoch is a whole one."""
    cfg = _cfg(backend, id_shards, seed=5)
    old = [build_train_loader(cfg, r, old_world, CPU) for r in range(old_world)]
    used = []
    for ld in old:
        it = iter(ld)
        used += [label for _ in range(stop_step * old_accum) for label in _valid_labels(next(it))]
    states = [_through_a_file(ld.state_dict()) for ld in old]
    steps_left = (old[0].steps_per_epoch - stop_step * old_accum) // old_accum  # as the trainer counts them
    new = [build_train_loader(cfg, r, new_world, CPU) for r in range(new_world)]
    for ld in new:
        info = ld.continue_epoch(states, steps_left, new_accum)
        assert info == {"epoch": 0, "used": len(used), "left": N - len(used), "repeated": 0}
        assert ld.batches_left % new_accum == 0 and ld.batches_left >= steps_left * new_accum
    rest = [list(ld) for ld in new]
    got = used + [label for batches in rest for b in batches for label in _valid_labels(b)]
    assert sorted(got) == list(range(N))  # every sample of the epoch once: none skipped, none twice
    assert len({len(batches) for batches in rest}) == 1  # every rank runs the same number of batches
    assert all(ld.epoch == 1 for ld in new)
    nxt = [label for ld in new for b in ld for label in _valid_labels(b)]
    assert sorted(nxt) == list(range(N))  # then whole epochs on the new layout

    # the rest of an epoch is itself resumable, exactly, on its layout
    first = build_train_loader(cfg, new_world - 1, new_world, CPU)
    first.continue_epoch(states, steps_left, new_accum)
    it = iter(first)
    next(it)
    resumed = build_train_loader(cfg, new_world - 1, new_world, CPU)
    resumed.load_state_dict(_through_a_file(first.state_dict()))
    for want, batch in zip(rest[-1][1:], resumed, strict=True):
        assert torch.equal(want["valid"], batch["valid"]) and torch.equal(want["labels"], batch["labels"])
        assert torch.equal(want["images"], batch["images"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_refuses_a_state_it_cannot_continue(backend: str, id_shards: Path) -> None:
    """Another backend's state, or one saved with another world size, is an error naming the field;
    the loader keeps its own position."""
    cfg = _cfg(backend, id_shards)
    state = build_train_loader(cfg, 0, 2, CPU).state_dict()
    loader = build_train_loader(cfg, 0, 3, CPU)
    with pytest.raises(ValueError, match="saved with world_size=2, this run has 3"):
        loader.load_state_dict(state)
    other = "webdataset" if backend == "dali" else "dali"
    with pytest.raises(ValueError, match=f"from backend '{other}', this is '{backend}'"):
        loader.load_state_dict({**state, "backend": other, "world_size": 3})
    assert (loader.epoch, loader.batch_in_epoch) == (0, 0)


def test_dali_reads_shards_written_by_webdataset_shardwriter(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(tmp_path / "ext-%06d.tar"), maxcount=9, verbose=0) as w:
        for i in range(20):
            w.write({"__key__": f"s{i:04d}", "jpg": jpeg_bytes(rng), "cls": str(i)})
        w.write({"__key__": "nolabel", "jpg": jpeg_bytes(rng)})  # counted, never read
    tars = sorted(str(p) for p in tmp_path.glob("ext-*.tar"))
    assert shards_main(["index", *tars]) == 0
    cfg = _cfg("dali", tmp_path / "ext-{000000..000002}.tar")
    seen = []
    for rank in range(2):
        ld = build_train_loader(cfg, rank, 2, CPU)
        assert ld.skipped_samples == 1
        seen += _epoch(ld)[0]
    assert sorted(seen) == list(range(20))


def test_missing_index_is_a_clear_error(tmp_path: Path, seed: int) -> None:
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "x", "jpg": jpeg_bytes(np.random.default_rng(seed)), "cls": "0"})
    with pytest.raises(DataError, match="mimae-shards index"):
        build_train_loader(_cfg("dali", tmp_path / "a.tar"), 0, 1, CPU)


@pytest.mark.parametrize("fault", ["missing shard", "unreadable index", "not a tar", "no shards", "no samples"])
def test_bad_shard_sets_are_one_line_errors_naming_path_and_field(tmp_path: Path, fault: str) -> None:
    """Every way a shard set can be unusable ends in a DataError that names the setting and the file."""
    write_id_shards(tmp_path / "set", 6, 3)
    tars = sorted((tmp_path / "set").glob("*.tar"))
    spec, culprit = str(tmp_path / "set"), ""
    if fault == "missing shard":
        tars[1].unlink()
        culprit = str(tars[1])
    elif fault == "unreadable index":
        culprit = str(tars[0].with_suffix(".idx"))
        Path(culprit).write_bytes(b"\x89PNG not an index")
    elif fault == "not a tar":
        tars[0].write_bytes(b"PK\x03\x04" + bytes(600))  # a zip's header
        culprit = str(tars[0])
    elif fault == "no shards":
        spec = culprit = str(tmp_path / "empty-{000..001}.tar")
    else:
        (tmp_path / "nolabel").mkdir()
        with wds.TarWriter(str(tmp_path / "nolabel" / "a.tar")) as w:
            w.write({"__key__": "x", "jpg": b"not used"})
        assert shards_main(["index", str(tmp_path / "nolabel" / "a.tar")]) == 0
        spec = culprit = str(tmp_path / "nolabel")
    with pytest.raises(DataError) as info:
        build_train_loader(_cfg("webdataset", spec), 0, 1, CPU)
    message = str(info.value)
    assert "\n" not in message and "data.train_shards" in message and culprit in message, message


@pytest.mark.parametrize("world", [1, 2])
def test_eval_loader_dali_matches_pil_reference(world: int, id_shards: Path) -> None:
    """Deterministic eval batches: DALI's decode/resize/crop/normalise against PIL's, row by row."""
    got = {}
    for backend in BACKENDS:
        cfg = _cfg(backend, id_shards)
        images, labels = [], []
        for rank in range(world):
            ld = build_eval_loader(cfg, str(id_shards), rank, world, CPU, batch_size=10)
            for _pass in range(2):  # every pass is the same
                batches = list(ld)
                imgs = torch.cat([b["images"][b["valid"]] for b in batches])
                labs = torch.cat([b["labels"][b["valid"]] for b in batches])
                if _pass == 1:
                    assert torch.equal(imgs, images[-1]) and torch.equal(labs, labels[-1])
                    continue
                images.append(imgs)
                labels.append(labs)
        got[backend] = (torch.cat(images), torch.cat(labels))
    assert got["dali"][1].tolist() == list(range(N)) == got["webdataset"][1].tolist()
    diff = (got["dali"][0] - got["webdataset"][0]).abs()
    # Two decoders and two bicubic resizers (40x48 -> 37x44) agree to about half a grey level on average.
    assert diff.mean() < 0.02 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_train_batches_are_normalised_crops(id_shards: Path) -> None:
    """Augmented DALI and PIL batches have the same statistics (they draw different crops)."""
    stats = {}
    for backend in BACKENDS:
        ld = build_train_loader(_cfg(backend, id_shards), 0, 1, CPU)
        x = torch.cat([b["images"] for b in ld])
        stats[backend] = (x.mean().item(), x.std().item())
    (m0, s0), (m1, s1) = stats.values()
    assert abs(m0 - m1) < 0.1 and abs(s0 - s1) < 0.1, stats


def test_labels_from_ascii(gen: torch.Generator) -> None:
    values = [*torch.randint(0, 10**9, (50,), generator=gen).tolist(), 0, 7, 10, 999]
    rows = torch.zeros(len(values), 12, dtype=torch.uint8)
    for i, v in enumerate(values):
        digits = str(v).encode() + (b"\n" if i % 3 == 0 else b"")
        rows[i, : len(digits)] = torch.tensor(list(digits), dtype=torch.uint8)
    assert labels_from_ascii(rows).tolist() == values


def test_webdataset_backend_pads_and_counts_undecodable_samples(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(tmp_path / "bad-%06d.tar"), maxcount=100, verbose=0) as w:
        for i in range(10):
            jpg = jpeg_bytes(rng) if i != 4 else b"\xff\xd8 not really a jpeg"
            w.write({"__key__": f"k{i}", "jpg": jpg, "cls": str(i)})
    shards_main(["index", str(tmp_path / "bad-000000.tar")])
    ld = build_train_loader(_cfg("webdataset", tmp_path / "bad-000000.tar"), 0, 1, CPU)
    labels, _ = _epoch(ld)
    assert sorted(labels) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert ld.skipped_samples == 1
    resumed = build_train_loader(_cfg("webdataset", tmp_path / "bad-000000.tar"), 0, 1, CPU)
    resumed.load_state_dict(ld.state_dict())
    assert resumed.skipped_samples == 1  # the counter survives a restart
    _epoch(resumed)
    assert resumed.skipped_samples == 2


def test_our_shards_read_by_webdataset_library(id_shards: Path) -> None:
    tars = sorted(str(p) for p in id_shards.glob("*.tar"))
    ds = wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples(), wds.decode("rgb8"))
    seen = [(int(s["cls"]), s["jpg"].shape) for s in ds]
    assert sorted(c for c, _ in seen) == list(range(N))
    assert {shape for _, shape in seen} == {(40, 48, 3)}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_build_then_dali_round_trip(world: int, tmp_path: Path, seed: int) -> None:
    """mimae-shards build -> DALI: every accepted input exactly once per epoch, rejected ones never.

    One image per class folder, so a label names its input."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "src"
    for i in range(37):
        (src / f"c{i:02d}").mkdir(parents=True)
        (src / f"c{i:02d}" / "img.jpg").write_bytes(jpeg_bytes(rng, progressive=i % 5 == 0))
    (src / "c03" / "img.jpg").write_bytes(b"")  # rejected: empty
    (src / "c08" / "img.jpg").write_text("not an image")  # rejected: not_image
    out = tmp_path / "out"
    assert shards_main(["build", str(src), str(out), "--shard-size", "6", "--workers", "1", "--quiet"]) == 0
    accepted = sorted(set(range(37)) - {3, 8})
    cfg = _cfg("dali", out)
    loaders = [build_train_loader(cfg, r, world, CPU) for r in range(world)]
    for _ in range(2):
        seen = [label for ld in loaders for label in _epoch(ld)[0]]
        assert sorted(seen) == accepted


def test_dali_restarts_from_its_checkpoint_after_a_transient_failure(id_shards: Path, monkeypatch) -> None:
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    cfg = _cfg("dali", id_shards, seed=4)
    ref_loader = build_train_loader(cfg, 0, 2, CPU)
    reference = [b for _ in range(2) for b in ref_loader]
    calls = {"n": 0}
    original = DALIGenericIterator.__next__

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 10:  # one failure, in the second epoch
            raise RuntimeError("simulated I/O error")
        return original(self)

    monkeypatch.setattr(DALIGenericIterator, "__next__", flaky)
    loader = build_train_loader(cfg, 0, 2, CPU)
    got = [b for _ in range(2) for b in loader]
    assert loader.pipeline_restarts == 1
    assert len(got) == len(reference)
    for want, have in zip(reference, got, strict=True):
        assert torch.equal(want["labels"], have["labels"]) and torch.equal(want["images"], have["images"])


def test_dali_names_the_way_out_when_a_sample_cannot_decode(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(tmp_path / "c-%06d.tar"), maxcount=100, verbose=0) as w:
        for i in range(12):  # bypasses `build`, which would have rejected the bad one
            w.write({"__key__": f"k{i}", "jpg": jpeg_bytes(rng) if i != 5 else b"garbage" * 50, "cls": str(i)})
    shards_main(["index", str(tmp_path / "c-000000.tar")])
    loader = build_train_loader(_cfg("dali", tmp_path / "c-000000.tar"), 0, 1, CPU)
    with pytest.raises(RuntimeError, match="mimae-shards verify"):
        list(loader)
    assert loader.pipeline_restarts == 1


@pytest.mark.parametrize("world", [2, 3])
def test_backends_split_each_epoch_into_the_same_rank_shares(world: int, id_shards: Path) -> None:
    """Both backends read share r of the same per-epoch tar order (only the window shuffle differs)."""
    shares = {}
    for backend in BACKENDS:
        loaders = [build_train_loader(_cfg(backend, id_shards, seed=9), r, world, CPU) for r in range(world)]
        shares[backend] = [[sorted(_epoch(ld)[0]) for ld in loaders] for _ in range(2)]
    assert shares["dali"] == shares["webdataset"]
    assert shares["dali"][0] != shares["dali"][1]
