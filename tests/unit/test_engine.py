"""Engine pieces that need no launcher: rank detection, DeepSpeed config, optimiser groups and
schedule, checkpoint bookkeeping. Multi-process training is in test_engine_multiprocess.py."""

from __future__ import annotations

import errno
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mimae_scale.config import grad_accumulation, load_config
from mimae_scale.diskfull import DiskFull, disk_full_errno
from mimae_scale.engine import checkpoint as ckpt
from mimae_scale.engine.distributed import DistEnv, detect_env, export_rendezvous
from mimae_scale.engine.ds_config import build_ds_config
from mimae_scale.engine.optim import LRSchedule, NonFiniteSkippingAdamW, param_groups, peak_lr
from mimae_scale.engine.trainer import mask_seed
from mimae_scale.model import build_model
from mimae_scale.precision import resolve_precision

CPU = torch.device("cpu")


# -- ranks from any launcher ------------------------------------------------------------------


def test_detect_env_from_each_launcher():
    assert detect_env({}) == DistEnv(0, 0, 1, "single")
    assert detect_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == DistEnv(3, 1, 4, "torch")
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert detect_env(slurm) == DistEnv(5, 1, 8, "slurm")
    # torchrun / deepspeed inside a Slurm allocation: their variables win
    assert detect_env({**slurm, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) == DistEnv(0, 0, 2, "torch")
    with pytest.raises(RuntimeError, match="RANK='x'"):
        detect_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_rendezvous_needs_master_address():
    env = DistEnv(1, 1, 2, "slurm")
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT"):
        export_rendezvous(env, {})
    environ = {"MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    export_rendezvous(env, environ)
    assert environ == {"MASTER_ADDR": "node7", "MASTER_PORT": "29500", "RANK": "1", "LOCAL_RANK": "1",
                       "WORLD_SIZE": "2"}


# -- DeepSpeed's config -------------------------------------------------------------------------


def test_ds_config_batches_precision_and_clipping():
    cfg = load_config("tiny", ["train.global_batch=256", "train.micro_batch=32", "engine.zero_stage=2"])
    ds = build_ds_config(cfg, grad_accumulation(cfg, world_size=2), resolve_precision(cfg, CPU))
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 4  # 256 = 32 x 2 ranks x 4
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False  # auto on a CPU: fp32
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's own default would clip at 1.0
    cfg = load_config("tiny", ["optim.clip_grad=3.0", "engine.precision=bf16"])
    ds = build_ds_config(cfg, grad_accumulation(cfg, world_size=1), resolve_precision(cfg, CPU))
    assert ds["gradient_clipping"] == 3.0 and ds["bf16"]["enabled"] is True


# -- optimiser -------------------------------------------------------------------------------------


def test_param_groups_exclude_biases_norms_and_tokens():
    cfg = load_config("tiny")
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= plain
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decayed
    assert all(p.ndim >= 2 for p in decay["params"])


def _mae_lr(epoch: float, peak: float, min_lr: float, warmup: float, epochs: int) -> float:
    """MAE's util/lr_sched.adjust_learning_rate, written from its definition (fractional epochs)."""
    if epoch < warmup:
        return peak * epoch / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_lr_rule_and_schedule_match_mae(seed):
    rng = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 64, (1,), generator=rng)) * 64
    cfg = load_config("tiny", [f"train.global_batch={batch}", "train.micro_batch=64", "train.epochs=7",
                               "optim.warmup_epochs=2", "optim.min_lr=1e-6"])
    assert peak_lr(cfg) == pytest.approx(cfg.optim.base_lr * batch / 256, rel=1e-12)
    steps_per_epoch = 13
    schedule = LRSchedule.from_config(cfg, steps_per_epoch)
    for step in range(7 * steps_per_epoch):
        expected = _mae_lr(step / steps_per_epoch, peak_lr(cfg), 1e-6, 2, 7)
        assert schedule(step) == pytest.approx(expected, rel=1e-9, abs=1e-15), step
    assert schedule(0) == 0.0 and schedule(7 * steps_per_epoch) == pytest.approx(1e-6)


def test_stage0_optimizer_skips_non_finite_gradients(gen):
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = NonFiniteSkippingAdamW([weight], lr=0.1)
    before = weight.detach().clone()
    weight.grad = torch.randn(4, 3, generator=gen)
    weight.grad[1, 2] = float("inf")
    opt.step()
    assert opt.overflow and torch.equal(weight, before) and not opt.state  # untouched, no Adam moments
    weight.grad = torch.randn(4, 3, generator=gen)
    opt.step()
    assert not opt.overflow and not torch.equal(weight, before)
    assert opt._global_grad_norm == pytest.approx(float(weight.grad.double().norm()), rel=1e-6)


def test_mask_seed_depends_on_every_coordinate(seed):
    base = (seed % 1000, 1, 17, 0)
    seeds = {mask_seed(*base), mask_seed(base[0] + 1, 1, 17, 0), mask_seed(base[0], 0, 17, 0),
             mask_seed(base[0], 1, 18, 0), mask_seed(base[0], 1, 17, 1)}
    assert len(seeds) == 5 and mask_seed(*base) == mask_seed(*base)
    assert all(0 <= s < 2**63 for s in seeds)


# -- checkpoint bookkeeping (a world of one, DeepSpeed's part replaced by a recorder) -----------


class _FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would (a file per tag) and nothing else."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # only our protocol may move `latest`
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(save_dir) / tag / "mp_rank_00_model_states.pt")


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _marker(step: int) -> dict:
    return {"world_size": 1, "zero_stage": 1, "fingerprint": "abc", "method": {"model": {"depth": 2}}}


class _Counter:
    """A replicated TrainState component."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _state(value: int) -> ckpt.TrainState:
    state = ckpt.TrainState()
    state.register("counter", _Counter(value), replicated=True)
    state.register("rng", ckpt.RngStreams(CPU), replicated=False)
    return state


def test_completion_protocol_latest_and_pruning(tmp_path, world_of_one):
    root = tmp_path / "checkpoints"
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=2)
    for step in (5, 10):
        manager.save(_FakeEngine(), step, _state(step), _marker(step))
    assert (root / "latest").read_text().strip() == "step_000000010"
    # an interrupted save: DeepSpeed's files are there, the marker is not
    (root / "step_000000015").mkdir()
    (root / "step_000000015" / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    assert [c.step for c in manager.complete()] == [5, 10]
    assert manager.newest().tag == "step_000000010"
    manager.save(_FakeEngine(), 20, _state(20), _marker(20))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000010", "step_000000020"]
    info = json.loads((root / "step_000000020" / ckpt.MARKER).read_text())
    assert info["step"] == 20 and info["tag"] == "step_000000020"
    assert sorted(info["files"]) == ["mimae_rank00000.pt", "mp_rank_00_model_states.pt"]
    for name, entry in info["files"].items():  # sizes and sha256 sums recomputed independently
        data = (root / "step_000000020" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not list(root.rglob(".*.tmp-*"))
    client = torch.load(root / "step_000000020" / "mp_rank_00_model_states.pt", weights_only=True)
    assert client["counter"] == {"value": 20} and client["format"] == ckpt.FORMAT
    mine = torch.load(root / "step_000000020" / ckpt.rank_file(0), weights_only=True)
    assert set(mine) == {"format", "rng"}


def _loader_into(state: ckpt.TrainState, root: Path):
    """What the trainer's load does, for the fake engine: read the files, hand them to the state."""

    def load(chosen: ckpt.Complete) -> None:
        folder = root / chosen.tag
        client = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
        state.load(client, torch.load(folder / ckpt.rank_file(0), weights_only=True), folder)

    return load


def _flip_bytes(path: Path, gen: torch.Generator) -> None:
    data = bytearray(path.read_bytes())
    at = int(torch.randint(0, len(data), (1,), generator=gen))
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "missing latest", "marker lists a missing file",
                                    "unreadable marker"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, world_of_one, damage, gen):
    root = tmp_path / "checkpoints"
    set_aside: list[str] = []
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=3, on_set_aside=set_aside.append)
    for step in (4, 8):
        manager.save(_FakeEngine(), step, _state(step), _marker(step))
    newest = root / "step_000000008"
    model_states = newest / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        model_states.write_bytes(model_states.read_bytes()[: model_states.stat().st_size // 2])
    elif damage == "flipped bytes":
        _flip_bytes(model_states, gen)
    elif damage == "missing latest":
        (root / "latest").unlink()
    elif damage == "marker lists a missing file":
        (newest / ckpt.rank_file(0)).unlink()
    else:
        (newest / ckpt.MARKER).write_text('{"step": 8, "files": {')
    state = _state(0)
    chosen = manager.resume(_loader_into(state, root))
    expected = 8 if damage == "missing latest" else 4
    assert chosen.step == expected and state.replicated["counter"].value == expected
    assert (root / "latest").read_text().strip() == chosen.tag
    if damage == "missing latest":
        assert set_aside == [] and newest.is_dir()
    else:
        assert set_aside == ["step_000000008"] and not newest.exists()
        assert (root / "damaged_step_000000008").is_dir()  # renamed, never deleted
        manager.save(_FakeEngine(), 12, _state(12), _marker(12))  # pruning leaves it alone
        assert (root / "damaged_step_000000008").is_dir()


def test_every_checkpoint_damaged_is_one_error_naming_the_files(tmp_path, world_of_one, gen):
    root = tmp_path / "checkpoints"
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=2)
    for step in (4, 8):
        manager.save(_FakeEngine(), step, _state(step), _marker(step))
    _flip_bytes(root / "step_000000004" / "mp_rank_00_model_states.pt", gen)
    rank_file = root / "step_000000008" / ckpt.rank_file(0)
    rank_file.write_bytes(rank_file.read_bytes()[:10])
    with pytest.raises(ckpt.CheckpointUnusable) as info:
        manager.resume(_loader_into(_state(0), root))
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "step_000000004" / "mp_rank_00_model_states.pt") in message
    assert str(rank_file) in message
    assert sorted(p.name for p in root.iterdir()) == ["damaged_step_000000004", "damaged_step_000000008", "latest"]
    assert manager.resume(_loader_into(_state(0), root)) is None  # nothing left: a fresh start


def test_a_checkpoint_that_verifies_but_does_not_load_is_set_aside(tmp_path, world_of_one):
    root = tmp_path / "checkpoints"
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=2)
    manager.save(_FakeEngine(), 4, _state(4), _marker(4))
    other = ckpt.TrainState()  # registers a component the checkpoint does not hold
    other.register("missing", _Counter(), replicated=True)
    with pytest.raises(ckpt.CheckpointUnusable, match="does not load: KeyError"):
        manager.resume(_loader_into(other, root))


class _Refusing(_Counter):
    """A component that refuses the saved state, as a loader does when the shard set changed."""

    def load_state_dict(self, state: dict) -> None:
        raise ValueError("data loader state was saved with num_samples=240, this run has 300")


def test_a_component_refusing_its_state_stops_the_run_and_keeps_the_checkpoint(tmp_path, world_of_one):
    root = tmp_path / "checkpoints"
    set_aside: list[str] = []
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=2, on_set_aside=set_aside.append)
    manager.save(_FakeEngine(), 4, _state(4), _marker(4))
    refusing = ckpt.TrainState()
    refusing.register("counter", _Refusing(), replicated=True)
    with pytest.raises(ckpt.CheckpointMismatch, match=r"step_000000004: counter: .*num_samples=240"):
        manager.resume(_loader_into(refusing, root))
    assert set_aside == [] and (root / "step_000000004" / ckpt.MARKER).is_file()  # sound: not set aside


def test_edquot_in_save_is_one_line_keeps_the_previous_checkpoint_and_removes_the_partial_one(
        tmp_path, world_of_one, monkeypatch):
    """A quota (EDQUOT, injected: no real filesystem here has quotas) fills while the checkpoint of
    step 10 is written; ENOSPC on a real tmpfs is tests/integration/test_disk_full.py."""
    root = tmp_path / "checkpoints"
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=2)
    manager.save(_FakeEngine(), 5, _state(5), _marker(5))
    size = sum(p.stat().st_size for p in (root / "step_000000005").iterdir() if p.name != ckpt.MARKER)
    monkeypatch.setenv("MIMAE_FAULT_EDQUOT_IN_SAVE", "0:10")
    with pytest.raises(DiskFull) as info:
        manager.save(_FakeEngine(), 10, _state(10), _marker(10))
    message = str(info.value)
    assert "\n" not in message and info.value.code == errno.EDQUOT
    assert message.startswith(f"disk full (EDQUOT: Disk quota exceeded) writing checkpoint {root / 'step_000000010'}: ")
    assert f"({size} bytes) as step_000000005 did" in message
    assert "partial checkpoint removed, step_000000005 kept as the latest" in message
    assert not (root / "step_000000010").exists()
    assert (root / "latest").read_text().strip() == "step_000000005"
    state = _state(0)
    assert manager.resume(_loader_into(state, root)).step == 5 and state.replicated["counter"].value == 5
    monkeypatch.delenv("MIMAE_FAULT_EDQUOT_IN_SAVE")
    manager.save(_FakeEngine(), 10, _state(10), _marker(10))  # room again: the same step saves
    assert [c.step for c in manager.complete()] == [5, 10]


def test_space_is_checked_one_save_ahead(tmp_path, world_of_one, monkeypatch, caplog):
    root = tmp_path / "checkpoints"
    manager = ckpt.CheckpointManager(root, rank=0, keep_last=2)
    manager.save(_FakeEngine(), 5, _state(5), _marker(5))
    size = ckpt.checkpoint_bytes(manager.newest())
    warnings = []
    # keep_last 2 with one checkpoint: the next save prunes nothing, so it needs room for two more
    for free in (10 * size, 2 * size - 1, size - 1):
        monkeypatch.setattr(ckpt, "free_bytes", lambda path, free=free: free)
        caplog.clear()
        manager._check_space()
        warnings.append(" ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING"))
    assert warnings[0] == ""
    assert "room for this checkpoint" in warnings[1] and "not for the next one" in warnings[1]
    assert "this save will probably fail" in warnings[2] and "step_000000005" in warnings[2]
    manager.save(_FakeEngine(), 10, _state(10), _marker(10))  # now each save prunes the oldest: room for one is enough
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: size + 1)
    caplog.clear()
    manager._check_space()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_write_error_on_a_disk_with_room_is_not_a_full_disk(tmp_path):
    assert disk_full_errno(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"), tmp_path) is None
    assert disk_full_errno(OSError(errno.EIO, "I/O error"), tmp_path) is None
    assert disk_full_errno(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # the probe cleaned up


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state(CPU)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())
    ckpt.set_rng_state(state, CPU)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_resume_refusals_name_the_difference(tmp_path):
    old = load_config("tiny", ["model.depth=3"])
    chosen = ckpt.Complete("step_000000100", 100, world_size=4, zero_stage=1, fingerprint=old.fingerprint(),
                           method=old.method(), files={})
    with pytest.raises(ckpt.CheckpointMismatch, match=r"model.depth: checkpoint 3, now 2") as info:
        ckpt.check_resumable(chosen, load_config("tiny"), 4, tmp_path)
    assert "embed_dim" not in str(info.value)
    with pytest.raises(ckpt.CheckpointMismatch, match=r"model.depth: checkpoint 3, now 2"):
        ckpt.RunConfig(load_config("tiny")).load_state_dict(old.to_dict())  # the same rule, from the state
    ckpt.RunConfig(load_config("tiny", ["model.depth=3", "train.epochs=9"])).load_state_dict(old.to_dict())
    ckpt.check_resumable(chosen, load_config("tiny", ["model.depth=3", "optim.base_lr=1e-3"]), 4, tmp_path)
