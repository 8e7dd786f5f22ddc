"""Real training under the deepspeed launcher: 2 CPU ranks over gloo, ZeRO 0-3, faults and resumes.

Every test starts the real entry point (``deepspeed --num_gpus 2 mimae_scale/train.py``, or the
stage-sweep driver) in its own session, so a test can SIGKILL a whole job the way a dead node
does. The launcher passes a rank's exit status through, which is what a requeueing script sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mimae_scale.config import load_config
from mimae_scale.engine.checkpoint import FORMAT, MARKER, tag_for
from mimae_scale.engine.optim import LRSchedule
from tests.helpers import REPO
from tests.helpers.jobs import TIMEOUT, Job, complete_steps, records

pytestmark = pytest.mark.slow

# 2 ranks x 16 images per step over 240 demo images: 8 optimiser steps per epoch (the last one
# padded), so checkpoints every 4 or 5 steps land mid-epoch
TRAIN = ["train.global_batch=32", "train.micro_batch=16", "checkpoint.every_minutes=600"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> list[str]:
    """The embedded demo dataset (24 images per class), read by the DALI CPU pipeline."""
    out = tmp_path_factory.mktemp("demo_shards")
    shards = Path(sys.executable).parent / "mimae-shards"
    subprocess.run([str(shards), "demo", str(out), "--train-per-class", "24", "--val-per-class", "2"], check=True,
                   capture_output=True, timeout=TIMEOUT)
    return ["data.backend=dali", f"data.train_shards={out / 'train'}", *TRAIN]


def train(run_dir: Path, overrides: list[str], log: Path, env: dict[str, str] | None = None) -> Job:
    return Job("mimae_scale/train.py", ["--config", "tiny", f"run_dir={run_dir}", *overrides], log, env)


def test_zero_stages_0_to_3_train_and_agree(tmp_path, demo_data):
    """2 ranks, one short run per ZeRO stage: the loss falls, and all stages compute the same numbers
    (ZeRO partitions the optimiser state, gradients and weights; it must not change the math).

    "Falls" is asserted for the reconstruction and InfoNCE terms: the total also holds w_min x L_min,
    which the encoder trades against them, so early on the sum need not fall."""
    settings = ["train.max_steps=10", "train.log_every=5", "checkpoint.every_steps=5", "optim.base_lr=3e-3",
                "optim.warmup_epochs=0.25"]
    sweep = [str(tmp_path), "0,1,2,3", *demo_data, *settings]
    job = Job("tests/helpers/engine_runs/stage_sweep.py", sweep, tmp_path / "sweep.log")
    assert job.wait() == 0, job.output[-4000:]
    by_stage = {stage: records(tmp_path / f"zero{stage}") for stage in range(4)}
    for stage, recs in by_stage.items():
        assert [r["step"] for r in recs] == [5, 10], stage
        first, last = recs
        assert last["loss_rec"] < 0.95 * first["loss_rec"], (stage, first["loss_rec"], last["loss_rec"])
        assert last["loss_max"] < 0.97 * first["loss_max"], (stage, first["loss_max"], last["loss_max"])
        assert last["skipped_steps"] == 0 and last["images_per_s"] > 0 and last["data_wait_s"] >= 0
        assert complete_steps(tmp_path / f"zero{stage}") == [5, 10]
        for rec, ref in zip(recs, by_stage[0], strict=True):
            for key in ("loss", "loss_rec", "loss_max", "loss_min", "loss_q", "grad_norm", "lr"):
                assert rec[key] == pytest.approx(ref[key], rel=1e-4), (stage, rec["step"], key)


def test_nan_skipped_on_all_ranks_then_stop_then_sigusr2_requeue_and_resume(tmp_path, demo_data):
    run = tmp_path / "run"
    settings = [*demo_data, "train.max_steps=16", "train.log_every=1", "checkpoint.every_steps=4",
                "train.max_consecutive_skips=3"]

    # 1. NaN on rank 1 only, at step 3 (one skip) and steps 6-8 (three in a row: stop with status 3)
    job = train(run, settings, tmp_path / "nan.log", {"MIMAE_FAULT_NAN": "1:3,6,7,8"})
    assert job.wait() == 3, job.output[-4000:]
    by_step = {r["step"]: r for r in records(run)}  # written by rank 0, whose own loss stayed finite
    assert by_step[2]["skipped_steps"] == 0 and by_step[3]["skipped_steps"] == 1
    assert by_step[3]["loss"] is None and by_step[3]["grad_norm"] is None  # nothing finite to report
    assert by_step[4]["skipped_steps"] == 1 and by_step[4]["loss"] is not None
    assert by_step[7]["skipped_steps"] == 3 and 8 not in by_step  # 3, 6, 7; 8 stopped the run
    for rank in (0, 1):
        assert f"rank{rank} WARNING step 3 skipped on every rank" in job.output
    assert "3 consecutive optimiser steps (6-8)" in job.output and "step_000000004" in job.output
    assert complete_steps(run) == [4]

    # 2. restart: resumes from step 4; SIGUSR2 to rank 1 alone stops both ranks with a checkpoint
    job = train(run, settings, tmp_path / "usr2.log")
    seen = len(records(run))
    job.wait_for_step(run, 6, after=seen)
    job.rank_process(1).send_signal(signal.SIGUSR2)
    assert job.wait() == 75, job.output[-4000:]
    assert "resumed from" in job.output and "step_000000004: step 4" in job.output
    stopped = max(r["step"] for r in records(run)[seen:])
    assert complete_steps(run)[-1] == stopped >= 6
    assert "stopped by SIGUSR2" in job.output
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:09d}"

    # 3. the requeued job resumes from the signal's checkpoint and finishes
    job = train(run, settings, tmp_path / "resume.log")
    assert job.wait() == 0, job.output[-4000:]
    assert f"step_{stopped:09d}: step {stopped}" in job.output
    assert complete_steps(run)[-1] == 16


def test_sigkill_and_crash_during_save_resume_exactly(tmp_path, demo_data):
    """Deterministic mode: killed runs continue from their last complete checkpoint, mid-epoch, and
    every step's losses equal those of a run that was never interrupted."""
    settings = [*demo_data, "deterministic=true", "train.max_steps=16", "train.log_every=1", "checkpoint.every_steps=4"]
    ref_dir, run = tmp_path / "reference", tmp_path / "run"
    job = train(ref_dir, settings, tmp_path / "reference.log")
    assert job.wait() == 0, job.output[-4000:]
    reference = {r["step"]: r for r in records(ref_dir)}
    assert sorted(reference) == list(range(1, 17))

    # 1. rank 0 is SIGKILLed while writing the checkpoint of step 8 (mid-epoch 1)
    job = train(run, settings, tmp_path / "crash.log", {"MIMAE_FAULT_CRASH_IN_SAVE": "0:8"})
    assert job.wait() != 0
    assert (run / "checkpoints" / "step_000000008").is_dir()  # DeepSpeed's files were written ...
    assert not (run / "checkpoints" / "step_000000008" / MARKER).exists()  # ... but it never completed
    assert complete_steps(run) == [4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000004"

    # 2. restart: the interrupted checkpoint is ignored; then the whole job is SIGKILLed from outside
    job = train(run, settings, tmp_path / "killed.log")
    seen = len(records(run))
    job.wait_for_step(run, 10, after=seen)
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.wait()
    assert "step_000000004: step 4" in job.output
    newest = complete_steps(run)[-1]
    assert newest >= 8

    # 3. restart again: continues from the newest complete checkpoint and finishes
    job = train(run, settings, tmp_path / "resumed.log")
    assert job.wait() == 0, job.output[-4000:]
    assert f"step_{newest:09d}: step {newest}" in job.output

    every = records(run)
    assert {r["step"] for r in every} == set(range(1, 17))
    assert len(every) > 16  # steps after each checkpoint were computed twice: all must agree
    for rec in every:
        ref = reference[rec["step"]]
        # the CLUB critic (q and its Adam state) resumes exactly too: its NLL and health repeat
        for key in ("loss", "loss_rec", "loss_max", "loss_min", "loss_q", "club_q_gain", "grad_norm", "lr"):
            assert rec[key] == ref[key], (rec["step"], key, rec[key], ref[key])


def test_plain_process_runs_and_bad_settings_exit_2(tmp_path):
    run = tmp_path / "single"
    cmd = [sys.executable, "mimae_scale/train.py", "--config", "tiny", f"run_dir={run}", "data.backend=synthetic",
           "train.steps_per_epoch=8", *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # every_minutes tiny: the timed save fires at every log step (every_steps alone would never save)
    timed = ["train.max_steps=3", "train.log_every=1", "checkpoint.every_steps=1000", "checkpoint.every_minutes=1e-6"]
    done = subprocess.run([*cmd, *timed], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "launcher single, world size 1" in done.stdout
    assert done.stdout.count("INFO checkpoint ") == 3  # steps 1, 2, 3
    assert complete_steps(run) == [2, 3]  # keep_last 2
    assert (run / "config.yaml").exists() and (run / "ds_config.json").exists()
    # our replicated state rides in DeepSpeed's model-states file (our own file: full unpickling is fine)
    states = torch.load(run / "checkpoints" / "step_000000003" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["format"] == FORMAT and states["trainer"]["step"] == 3 and states["trainer"]["samples"] == 3 * 32
    assert states["config"] == load_config("tiny", [*cmd[4:], *timed]).to_dict()
    assert states["universal_checkpoint_info"]  # what ds_to_universal needs to convert it
    assert set(states["critic"]) == {"net", "optimizer"}  # CLUB's q and its own Adam, outside the engine

    bad = subprocess.run([*cmd, "model.depth=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode == 2 and "ConfigError: model.depth: must be positive" in bad.stderr

    other = subprocess.run([*cmd, "model.depth=3"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert other.returncode == 2, other.stdout[-3000:]
    assert "model.depth: checkpoint 2, now 3" in other.stdout


def test_damaged_checkpoints_fall_back_or_stop_with_one_line_and_a_tag_folder_exports_alone(tmp_path):
    """One plain process on synthetic data: the newest checkpoint truncated -> set aside, resumed from
    the previous one; every checkpoint damaged -> exit 2, one line naming the files, no traceback;
    a bad shard path -> exit 2, one line; a tag folder copied alone exports without --config."""
    run = tmp_path / "run"
    base = [sys.executable, "mimae_scale/train.py", "--config", "tiny", f"run_dir={run}", "train.log_every=1",
            "checkpoint.every_steps=2", "checkpoint.keep_last=3", *TRAIN]
    synthetic = ["data.backend=synthetic", "train.steps_per_epoch=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train_py(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)

    done = train_py(*synthetic, "train.max_steps=4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert complete_steps(run) == [2, 4]

    # the tag folder alone, elsewhere: the config travels inside it
    alone = tmp_path / "copied" / "step_000000004"
    shutil.copytree(run / "checkpoints" / "step_000000004", alone)
    export = Path(sys.executable).parent / "mimae-export"
    out = subprocess.run([str(export), str(alone), str(tmp_path / "enc.pth"), "--format", "mae"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert torch.load(tmp_path / "enc.pth", weights_only=True)["model"]
    (alone / "mimae_rank00000.pt").write_bytes(b"")  # export checks the marker's sizes and sums too
    out = subprocess.run([str(export), str(alone), str(tmp_path / "enc2.pth"), "--format", "mae"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode != 0 and "is damaged" in out.stderr and "mimae_rank00000.pt has 0 bytes" in out.stderr

    states = run / "checkpoints" / "step_000000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # a partial copy / full disk
    done = train_py(*synthetic, "train.max_steps=6")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CHECKPOINT DAMAGED" in done.stdout and "step_000000002: step 2" in done.stdout
    assert (run / "checkpoints" / "damaged_step_000000004").is_dir()
    assert complete_steps(run) == [2, 4, 6]  # step 4 written again by the resumed run

    for step in (2, 4, 6):
        rank_file = run / "checkpoints" / f"step_{step:09d}" / "mimae_rank00000.pt"
        rank_file.write_bytes(b"\0" * rank_file.stat().st_size)  # same size, other bytes
    done = train_py(*synthetic, "train.max_steps=8")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 4 and "Traceback" not in done.stdout + done.stderr  # 3 set aside, then the verdict
    assert "CheckpointUnusable" in errors[-1] and all(f"step_{s:09d}" in errors[-1] for s in (2, 4, 6))

    missing = tmp_path / "nowhere" / "train-{000000..000003}.tar"
    done = train_py("data.backend=webdataset", f"data.train_shards={missing}", f"run_dir={tmp_path / 'other'}")
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "data.train_shards" in errors[0] and "train-000000.tar" in errors[0], errors


def _plain(run: Path, overrides: list[str], log: Path) -> int:
    """train.py as one plain process (a world of one), output to ``log``."""
    cmd = [sys.executable, "mimae_scale/train.py", "--config", "tiny", f"run_dir={run}", *overrides]
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def _epoch_samples(run: Path, epoch: int, segments: list[tuple[int, bool, int]]) -> list[str]:
    """The samples of ``epoch`` in the runs' sample traces, from the segments (world size, rest of the
    epoch?, batches per rank trained before the next segment took over) that made the epoch."""
    traces = sorted((run / "samples").glob("rank*.jsonl"))
    records = [json.loads(line) for f in traces for line in f.read_text().splitlines()]
    used = []
    for world, rest, batches in segments:
        used += [name for r in records if (r["world_size"], r["rest"], r["epoch"]) == (world, rest, epoch)
                 and r["batch"] < batches for name in r["samples"]]
    return used


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_on_another_number_of_ranks(tmp_path, demo_data, stage):
    """2 ranks -> 1 rank (-> 2 ranks under ZeRO 3, the one rank at ZeRO 1) through DeepSpeed's universal
    checkpoint, converted once, beside the original. The new layout goes on with the interrupted epoch's unused samples:
    the step, the learning rate and the loss go on, and the epoch uses every sample exactly once
    (the runs' sample traces against the webdataset library's listing of the shards)."""
    run = tmp_path / "run"
    # 240 images, 48 per step: 5 steps per epoch on 2 ranks (24 each) and on 1 (2 x 24), so the
    # schedule is the same on both layouts
    settings = [*demo_data, "train.global_batch=48", "train.micro_batch=24", "train.log_every=1",
                "checkpoint.every_steps=3", f"engine.zero_stage={stage}", "optim.base_lr=3e-3",
                "optim.warmup_epochs=0.4", "train.epochs=4", "data.trace_samples=true"]
    cfg = load_config("tiny", [f"run_dir={run}", *settings])
    lr_at = LRSchedule.from_config(cfg, steps_per_epoch=5)
    shards = Path(cfg.data.train_shards)
    every_sample = sorted(f"{Path(s['__url__']).name}/{s['__key__']}"
                          for s in wds.WebDataset(sorted(str(t) for t in shards.glob("*.tar")), shardshuffle=False))
    assert len(every_sample) == 240
    if stage == 1:  # killed like a lost node, after the checkpoint of step 6 (epoch 1 begins at step 6)
        job = train(run, settings, tmp_path / "two.log")
        job.wait_for_step(run, 7)
        deadline = time.monotonic() + TIMEOUT
        while 6 not in complete_steps(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
        for tag in [t for t in (run / "checkpoints").glob("step_*") if t.name != "step_000000006"]:
            shutil.rmtree(tag)  # the kill came after step 6: resume from there
        (run / "checkpoints" / "latest").write_text("step_000000006\n")
        stop = 6
    else:
        job = train(run, [*settings, "train.max_steps=8"], tmp_path / "two.log")
        assert job.wait() == 0, job.output[-4000:]
        stop = 8
    before = {r["step"]: r for r in records(run)}
    seen_before = len(records(run))
    # DeepSpeed's CPU all-reduce buffers in /dev/shm (66 MB a rank) are gone, even after a SIGKILL
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{job.port}_*"))

    # under ZeRO 3 the one rank also changes stage (3 -> 1), and the way back (1 -> 3)
    one_rank = [*settings, "engine.zero_stage=1"] if stage == 3 else settings
    assert _plain(run, [*one_rank, f"train.max_steps={stop + 1}"], tmp_path / "one.log") == 0
    one = (tmp_path / "one.log").read_text()
    assert "converted" in one and "universal format" in one, one[-3000:]
    left = 240 - 48 * (stop - 5)
    assert (f"layout changed (2 ranks -> 1) at step {stop}: epoch 1 goes on with its {left} samples not yet used "
            f"({240 - left} used before the stop; 0 read twice) in {10 - stop} steps") in one, one[-3000:]
    assert (run / "checkpoints" / tag_for(stop) / "universal" / MARKER).is_file()
    assert ("ZeRO stage changed (3 -> 1)" in one) == (stage == 3)
    after = {r["step"]: r for r in records(run)[seen_before:]}
    assert sorted(after) == [stop + 1]  # the step goes on
    segments = [(2, False, stop - 5), (1, True, 2)]
    if stage == 3:  # and back to 2 ranks: the 1-rank checkpoint of step 9 converts the same way
        job = train(run, [*settings, "train.max_steps=11"], tmp_path / "back.log")
        assert job.wait() == 0, job.output[-4000:]
        assert ("layout changed (1 ranks -> 2) at step 9: epoch 1 goes on with its 48 samples not yet used "
                "(192 used before the stop; 0 read twice) in 1 steps") in job.output, job.output[-3000:]
        assert "ZeRO stage changed (1 -> 3)" in job.output
        after = {r["step"]: r for r in records(run)[seen_before:]}
        assert sorted(after) == [9, 10, 11]
        segments.append((2, True, 1))
    else:  # and on to the end of the epoch on the one rank
        assert _plain(run, [*settings, "train.max_steps=11"], tmp_path / "one_more.log") == 0
        after = {r["step"]: r for r in records(run)[seen_before:]}
        assert sorted(after) == list(range(stop + 1, 12))
        segments[1] = (1, True, 8)
    assert sorted(_epoch_samples(run, 1, segments)) == every_sample  # the epoch: every sample, once
    assert sorted(_epoch_samples(run, 2, [(segments[-1][0], False, 2)])) != []  # then a whole new epoch
    for step, record in after.items():
        assert record["lr"] == pytest.approx(lr_at(step - 1), rel=1e-9)  # the schedule goes on
    # the weights and optimiser came back trained: the loss goes on where it was, far below a
    # fresh model's (step 1)
    last = max(k for k in before if k <= stop)
    assert after[stop + 1]["loss_rec"] < 0.9 * before[1]["loss_rec"], (before[1], after[stop + 1])
    assert after[stop + 1]["loss_rec"] == pytest.approx(before[last]["loss_rec"], rel=0.15), (before[last], after)
