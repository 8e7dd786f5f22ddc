"""Scale-out on a real two-node Slurm cluster (``slurm_netns.py``: one network namespace per node).

One job of the real ``launch/vit_l_1600ep.sh`` (tiny CPU config, one rank per node) lives through
what only happens across machines: ``sbatch --nodes=2`` -> the ranks meet at the first node of the
job's node list from the other namespace, train and checkpoint; Prometheus scrapes each rank on its
own node through the targets file the launcher wrote, and every dashboard query has a series per
rank -> USR2 to the batch shell: every rank checkpoints, the job requeues and resumes on two nodes
-> USR2 again, and the requeued job, shrunk to one node while pending, resumes on one rank where the
two left off (step, loss, data position).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import REPO
from tests.helpers.monitoring import RATE_WINDOW, check_query, dashboard_queries, is_dcgm, prometheus_config
from tests.helpers.prometheus_tools import PrometheusServer, require_prometheus
from tests.helpers.shard_helpers import write_id_shards
from tests.helpers.slurm_cluster import SlurmError, ensure_installed
from tests.helpers.slurm_netns import NamespacesUnavailable, NetnsSlurmCluster

LAUNCHER = REPO / "launch" / "vit_l_1600ep.sh"
JOB_NAME = "mimae_vit_l16_1600ep"  # the launcher's #SBATCH --job-name: the metrics' job label
NODES = 2
LOG_EVERY = 2
METRICS_PORT = 9410  # the launcher's default; each node is its own network namespace
GLOBAL_BATCH = 16
MICRO_BATCH = 4  # MIMAE_MAX_MICRO_BATCH: accumulation 2 on two ranks, 4 on one
SAMPLES = 320  # 8 shards: 20 steps an epoch on any world size, so runs cross epochs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_installed()
        require_prometheus()
        cluster = NetnsSlurmCluster(NODES).start()
    except NamespacesUnavailable as exc:
        pytest.skip(str(exc))
    except SlurmError as exc:
        pytest.fail(f"could not bring up the two-node test cluster: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def test_each_node_is_its_own_host(cluster, tmp_path):
    """A two-node srun: each task has its node's host name, one address of its own (on the test's
    subnet) and resolves both node names."""
    out = tmp_path / "hosts.out"
    script = ('echo "$SLURM_NODEID $(hostname) $(ip -4 -o addr show scope global | awk \'{print $4}\')"; '
              "getent hosts node1 node2 | sort")
    job_id = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={out}", "--wrap",
                             f"srun bash -c {shlex.quote(script)}"])
    record = cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    text = out.read_text()
    assert record["JobState"] == "COMPLETED", text
    prefix = cluster.subnet.prefixlen
    for node_id, node in enumerate(cluster.node_names):
        assert f"{node_id} {node} {cluster.addresses[node]}/{prefix}\n" in text, text
    for node in cluster.node_names:  # both names resolve on both nodes (each task prints both)
        assert len(re.findall(rf"^{re.escape(cluster.addresses[node])}\s+{node}$", text, re.M)) == 2, text


def job_env(tmp_path: Path) -> dict[str, str]:
    """Site settings for the tiny CPU config: global batch 16 on 2 ranks (4 x 2) or 1 rank (4 x 4)."""
    return {
        "MIMAE_CONFIG": "tiny",
        "MIMAE_DATA": str(tmp_path / "shards"),
        "MIMAE_RUN_DIR": str(tmp_path / "run"),
        "MIMAE_GLOBAL_BATCH": str(GLOBAL_BATCH),
        "MIMAE_MAX_MICRO_BATCH": str(MICRO_BATCH),
        "MIMAE_TARGETS_DIR": str(tmp_path / "targets"),  # beside the test's prometheus.yml
    }


def log_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Job:
    """The submitted job, with bounded waits that fail with its output."""

    def __init__(self, cluster: NetnsSlurmCluster, job_id: int, out: Path, run_dir: Path) -> None:
        self.cluster, self.id, self.out, self.run_dir = cluster, job_id, out, run_dir

    def output(self) -> str:
        return self.out.read_text() if self.out.exists() else "(no output yet)"

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            state = self.cluster.job(self.id).get("JobState")
            if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
                pytest.fail(f"job {self.id} {state} while waiting for {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout:.0f} s (job {state}):\n{self.output()}")
            time.sleep(0.5)

    def restart_started(self, restart: int) -> bool:
        return f"job {self.id} restart {restart}:" in self.output()

    def this_run(self, restart: int) -> str:
        """The job output of one incarnation (the output file is appended to across restarts)."""
        return self.output().split(f"job {self.id} restart {restart}:")[-1]

    def preempt(self, restart: int, ranks: int) -> int:
        """USR2 to the batch shell: every rank checkpoints at the same step (returned), the job requeues."""
        self.cluster.run(["scancel", "--signal=USR2", "--batch", str(self.id)])
        pattern = r"rank(\d+) WARNING stopped by SIGUSR2 after step (\d+); checkpoint written"
        stops = self.wait(lambda: len(found := re.findall(pattern, self.this_run(restart))) == ranks and found,
                          120, f"every rank's checkpoint after USR2 (restart {restart})")
        assert {r for r, _ in stops} == {str(r) for r in range(ranks)}, stops
        assert len({s for _, s in stops}) == 1, stops  # one step for all ranks
        self.wait(lambda: f"requeueing job {self.id}:" in self.this_run(restart), 120, f"restart {restart}'s requeue")
        return int(stops[0][1])


def check_data_position(tag: Path, ranks: int) -> None:
    """Each rank's part of checkpoint ``tag`` is there, and the data position is where the step says,
    on any layout: the epoch is step // steps-per-epoch, and the samples its ranks marked used (the
    union of their bitmaps) are the step's images into that epoch."""
    assert sorted(p.name for p in tag.glob("mimae_rank*")) == [f"mimae_rank{r:05d}.pt" for r in range(ranks)]
    step = json.loads((tag / "mimae_complete.json").read_text())["step"]
    per_epoch = SAMPLES // GLOBAL_BATCH
    used = np.zeros(SAMPLES, dtype=bool)
    for rank in range(ranks):
        loader = torch.load(tag / f"mimae_rank{rank:05d}.pt", weights_only=True)["loader"]
        assert (loader["rank"], loader["world_size"], loader["epoch"]) == (rank, ranks, step // per_epoch), loader
        used |= np.unpackbits(loader["seen"].numpy(), count=SAMPLES).astype(bool)
    assert used.sum() == step % per_epoch * GLOBAL_BATCH, (step, used.sum())


def check_one_curve(records: list[dict]) -> None:
    """Every log step once and in order across the restarts; the images seen follow the step."""
    steps = [r["step"] for r in records]
    assert steps == list(range(LOG_EVERY, steps[-1] + 1, LOG_EVERY)), steps
    assert all(r["samples"] == r["step"] * GLOBAL_BATCH for r in records), records


def wait_for_scrapes(prom: PrometheusServer, job: Job, ranks: int) -> None:
    """Until each rank has a rate window of scrapes, a checkpoint and a throughput on record."""
    sel = f'job="{JOB_NAME}"'
    ready = (f"count_over_time(mimae_images_total{{{sel}}}[{RATE_WINDOW}]) >= 6 "
             f"and increase(mimae_images_total{{{sel}}}[{RATE_WINDOW}]) > 0 "
             f"and on (rank) mimae_checkpoint_last_complete_timestamp_seconds{{{sel}}} "
             f"and on (rank) mimae_images_per_second{{{sel}}}")
    job.wait(lambda: len(prom.query(ready)) >= ranks, 420, f"{ranks} ranks' training history in Prometheus")


def check_two_node_monitoring(prom: PrometheusServer, seen_targets: list) -> None:
    nodes = [f"node{i}" for i in range(1, NODES + 1)]
    # the launcher's targets file: one group per node of the job, the rank's port on each
    assert seen_targets == [{"targets": [f"{n}:{METRICS_PORT}"], "labels": {"job": JOB_NAME, "node": n}}
                            for n in nodes], seen_targets
    active = [t for t in prom.api("targets", state="active")["activeTargets"] if t["labels"]["job"] == JOB_NAME]
    assert sorted(t["labels"]["instance"] for t in active) == [f"{n}:{METRICS_PORT}" for n in nodes], active
    assert all(t["health"] == "up" for t in active), active
    # rank r runs on node r+1 (one task per node, in node-list order), world size 2 on both
    info = {s["metric"]["rank"]: s["metric"] for s in prom.query(f'mimae_run_info{{job="{JOB_NAME}"}}')}
    assert {r: (m["node"], m["world_size"]) for r, m in info.items()} == {"0": ("node1", "2"), "1": ("node2", "2")}
    for title, target in dashboard_queries():
        if not is_dcgm(target["expr"]):
            check_query(prom, title, target, JOB_NAME)  # a series per rank where the panel is per rank


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    """The one job both tests follow, and the Prometheus that scrapes it (shut down after both)."""
    tmp = tmp_path_factory.mktemp("scaleout")
    write_id_shards(tmp / "shards", SAMPLES, SAMPLES // 8)
    prom = PrometheusServer(prometheus_config(tmp), tmp, prefix=cluster.head_command([]))
    state = SimpleNamespace(tmp=tmp, prom=prom, job=None, shrunk=False, started=time.monotonic())
    yield state
    prom.stop()
    print(f"two nodes -> one node: {time.monotonic() - state.started:.0f} s")


def test_two_node_job_rendezvous_scrape_preempt_requeue_resume(cluster, run):
    tmp, prom = run.tmp, run.prom
    run_dir, out = tmp / "run", tmp / "job.out"
    job_id = cluster.sbatch(
        [f"--nodes={NODES}", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
         f"--chdir={tmp}", f"--output={out}", str(LAUNCHER), "data.backend=webdataset",
         "engine.zero_stage=1", "train.max_steps=100000", f"train.log_every={LOG_EVERY}",
         "checkpoint.every_steps=8", "metrics.peak_tflops=0.05",
         "metrics.ceiling_tflops=0.04"],
        env=job_env(tmp))
    job = run.job = Job(cluster, job_id, out, run_dir)
    targets = tmp / "targets" / f"{JOB_NAME}.json"

    # -- restart 0, two nodes: rendezvous at node1 from node2, train, checkpoint, scrape -----------
    seen = job.wait(lambda: targets.exists() and json.loads(targets.read_text()), 120, "the targets file")
    wait_for_scrapes(prom, job, NODES)
    check_two_node_monitoring(prom, seen)
    assert re.search(rf"job {job_id} restart 0: config tiny, 2 node\(s\) x 1 rank\(s\) = 2", job.output())
    assert re.search(r"rendezvous node1:\d+", job.output()), job.output()
    stop0 = job.preempt(restart=0, ranks=NODES)
    tag = run_dir / "checkpoints" / f"step_{stop0:09d}"
    check_data_position(tag, NODES)
    assert len(list(tag.glob("*optim_states.pt"))) == NODES  # each node's ZeRO partition
    print(f"restart 0 stopped at step {stop0} after {time.monotonic() - run.started:.0f} s")

    # -- restart 1, two nodes again: resumes where restart 0 stopped ------------------------------
    job.wait(lambda: job.restart_started(1), 120, "the requeued job's second start")
    # long enough that the loss has clearly moved from where it started (the one-node test's check)
    job.wait(lambda: any(r["step"] >= stop0 + 24 for r in log_records(run_dir)), 300, "24 steps after the resume")
    assert re.search(rf"resumed from \S+/step_0*{stop0}: step {stop0}\b", (run_dir / "train.log").read_text())
    run.stop1 = job.preempt(restart=1, ranks=NODES)
    run.before = log_records(run_dir)
    check_one_curve(run.before)
    check_data_position(run_dir / "checkpoints" / f"step_{run.stop1:09d}", NODES)
    print(f"restart 1 stopped at step {run.stop1} after {time.monotonic() - run.started:.0f} s")

    # the requeued job, held for cred_expire, shrinks to one node (what a node lost looks like)
    cluster.wait_for_state(job_id, {"PENDING"}, timeout=60)
    cluster.run(["scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1"])
    run.shrunk = True


def test_job_requeued_onto_one_node_continues(cluster, run):
    """The two-node test's job, shrunk to one node while pending: one rank resumes the two ranks'
    checkpoint (step, loss curve, data position) through the launcher."""
    if not run.shrunk:
        pytest.skip("needs the job that test_two_node_job_rendezvous_scrape_preempt_requeue_resume left pending")
    job, stop1, before = run.job, run.stop1, run.before
    run_dir, targets = job.run_dir, run.tmp / "targets" / f"{JOB_NAME}.json"
    job.wait(lambda: job.restart_started(2), 120, "the requeued job's third start")
    assert re.search(rf"job {job.id} restart 2: config tiny, 1 node\(s\) x 1 rank\(s\) = 1", job.output())
    job.wait(lambda: "Prometheus targets:" in job.this_run(2), 60, "the one-node run's targets file")
    assert json.loads(targets.read_text()) == [
        {"targets": [f"node1:{METRICS_PORT}"], "labels": {"job": JOB_NAME, "node": "node1"}}]
    # On another layout the new one goes on with the interrupted epoch's unused samples: the step,
    # the images seen and the schedule go on from where two nodes stopped.
    per_epoch = SAMPLES // GLOBAL_BATCH
    epoch, used = stop1 // per_epoch, stop1 % per_epoch * GLOBAL_BATCH
    job.wait(lambda: "resumed from" in job.this_run(2), 300, "the one-node run's resume")
    job.wait(lambda: any(r["step"] > stop1 for r in log_records(run_dir)[len(before):]), 300,
             f"the one-node run past step {stop1}, where two nodes stopped")
    cluster.run(["scancel", str(job.id)])  # SIGTERM: checkpoint, no requeue
    record = cluster.wait_for_state(job.id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "2", job.output()
    train_log = (run_dir / "train.log").read_text()
    assert (f"layout changed (2 ranks -> 1) at step {stop1}: epoch {epoch} goes on with its {SAMPLES - used} "
            f"samples not yet used ({used} used before the stop; 0 read twice) in {per_epoch - stop1 % per_epoch} "
            "steps") in train_log, train_log[-3000:]
    assert re.search(rf"resumed from \S+/step_0*{stop1}: step {stop1}, epoch {epoch}, "
                     rf"{stop1 * GLOBAL_BATCH} images seen", train_log), train_log

    # One curve across the layouts; the reconstruction loss goes on from where two ranks left it
    # instead of starting over (the total is no gauge: its CLUB term climbs while q learns, measured
    # 1.8 -> 3.3 over this run); the one rank's data position is its step's.
    records = log_records(run_dir)
    check_one_curve(records)
    one_node = records[len(before):]
    assert one_node[0]["step"] == before[-1]["step"] + LOG_EVERY, (before[-1], one_node[0])
    first, last_two_node, resumed = records[0]["loss_rec"], before[-1]["loss_rec"], one_node[0]["loss_rec"]
    assert abs(resumed - last_two_node) < abs(resumed - first), (first, last_two_node, resumed)
    ckpt = run_dir / "checkpoints"
    final = ckpt / (ckpt / "latest").read_text().strip()
    check_data_position(final, 1)
    # ... and it is the checkpoint a next run would resume from (the newest complete one)
    complete = [p for p in ckpt.glob("step_*") if (p / "mimae_complete.json").exists()]
    assert max(complete, key=lambda p: int(p.name.split("_")[1])) == final, sorted(p.name for p in complete)
