"""End to end: a real Prometheus scrapes a 2-rank CPU training (train.py, tiny config, synthetic
data), discovered through the shipped prometheus.yml and a targets file written by
write_targets.sh; then every query of the Grafana dashboard runs through Prometheus's HTTP API
and must return data with the expected labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mimae_scale.engine.distributed import free_port
from mimae_scale.exit_codes import EXIT_REQUEUE
from tests.helpers.monitoring import (
    RANKS,
    RATE_WINDOW,
    check_query,
    dashboard_queries,
    grafana_substitute,
    is_dcgm,
    prometheus_config,
)
from tests.helpers.prometheus_tools import (
    MONITORING,
    REPO,
    PrometheusServer,
    free_port_block,
    http_get,
    promtool_check_metrics,
    require_prometheus,
)

pytestmark = pytest.mark.slow

def start_ranks(workdir: Path, job: str, port_base: int) -> list[subprocess.Popen]:
    """train.py as two plain processes with the env:// rendezvous variables (torchrun's contract)."""
    master_port = free_port()
    overrides = [
        f"run_dir={workdir / 'run'}", "data.backend=synthetic", "train.micro_batch=8", "train.global_batch=16",
        "train.max_steps=100000", "train.log_every=2", "checkpoint.every_steps=4", f"metrics.job={job}",
        f"metrics.port_base={port_base}", "metrics.peak_tflops=0.05", "metrics.ceiling_tflops=0.04",
    ]
    procs = []
    for rank in range(RANKS):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(RANKS),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": "1"}
        env.pop("SLURM_JOB_NAME", None)
        log = (workdir / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "mimae_scale" / "train.py"), "--config", "tiny", *overrides],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        ))
    return procs


def stop_ranks(procs: list[subprocess.Popen], workdir: Path) -> list[int]:
    """SIGTERM: train.py checkpoints and exits with 75 (requeue)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=120))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(workdir.glob("*.log")))


def wait_for_training_history(prom: PrometheusServer, job: str, procs: list[subprocess.Popen],
                              workdir: Path, timeout: float = 420.0) -> None:
    """Until both ranks have stepped through a whole rate window of scrapes and written a checkpoint."""
    ready = (
        f'count_over_time(mimae_images_total{{job="{job}"}}[{RATE_WINDOW}]) >= 6 '
        f'and increase(mimae_images_total{{job="{job}"}}[{RATE_WINDOW}]) > 0 '
        f'and on (rank) mimae_checkpoint_last_complete_timestamp_seconds{{job="{job}"}} '
        f'and on (rank) mimae_images_per_second{{job="{job}"}}'
    )
    deadline = time.monotonic() + timeout
    while len(prom.query(ready)) < RANKS:
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a rank exited early: {[p.poll() for p in procs]}\n{logs(workdir)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no training history in Prometheus after {timeout:.0f} s\n{logs(workdir)}")
        time.sleep(0.5)


def test_prometheus_scrapes_two_rank_training_and_answers_every_dashboard_query(tmp_path):
    require_prometheus()
    job = f"e2e-{uuid.uuid4().hex[:8]}"
    port_base = free_port_block(RANKS)
    targets = MONITORING / "write_targets.sh"
    written = subprocess.run(
        ["bash", str(targets), str(tmp_path / "targets"), job, str(port_base), str(RANKS)],
        env={**os.environ, "MIMAE_TARGET_HOSTS": "127.0.0.1"}, capture_output=True, text=True, timeout=30,
    )
    assert written.returncode == 0, written.stderr
    prom = PrometheusServer(prometheus_config(tmp_path), tmp_path)
    procs = start_ranks(tmp_path, job, port_base)
    try:
        wait_for_training_history(prom, job, procs, tmp_path)

        # each exporter's own output is clean by promtool's rules
        for rank in range(RANKS):
            checked = promtool_check_metrics(http_get(f"http://127.0.0.1:{port_base + rank}/metrics"))
            assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked

        # both targets discovered through file_sd and healthy, with the targets file's labels
        active = prom.api("targets", state="active")["activeTargets"]
        ours = [t for t in active if t["labels"].get("job") == job]
        assert sorted(t["labels"]["instance"] for t in ours) == [f"127.0.0.1:{port_base + r}" for r in range(RANKS)]
        assert all(t["health"] == "up" for t in ours), ours

        # the dashboard's variables
        jobs = prom.api("label/job/values", **{"match[]": "mimae_run_info"})
        ranks = prom.api("label/rank/values", **{"match[]": f'mimae_run_info{{job="{job}"}}'})
        assert job in jobs and ranks == ["0", "1"]

        # every panel query, as Grafana would send it (a query naming no existing series gives no data)
        assert prom.query(f'mimae_images_totl{{job="{job}"}}') == []
        queries = [(title, target) for title, target in dashboard_queries() if not is_dcgm(target["expr"])]
        for title, target in queries:
            check_query(prom, title, target, job)

        # a few values against what the run is: two ranks, the tiny model, the configured peak
        info = prom.query(f'mimae_run_info{{job="{job}", rank="0"}}')[0]["metric"]
        assert (info["world_size"], info["num_masks"], info["micro_batch"], info["peak_tflops"]) == ("2", "4", "8",
                                                                                                     "0.05")
        per_rank = prom.query(f'mimae_images_total{{job="{job}"}} / mimae_steps_total{{job="{job}"}}')
        assert sorted(float(s["value"][1]) for s in per_rank) == [8.0, 8.0]  # global batch 16 over 2 ranks
    finally:
        codes = stop_ranks(procs, tmp_path)
        prom.stop()
    assert codes == [EXIT_REQUEUE] * RANKS, f"exit codes {codes}\n{logs(tmp_path)}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] >= 4


def test_top1_panel_answers_from_a_real_prometheus(tmp_path, seed):
    """The held-out accuracy panel (fine-tuning, linear probe), through a real Prometheus that discovers
    an exporter by the shipped configuration: the top-1/top-5 series of the model and its EMA, one each."""
    import random

    from mimae_scale.metrics import TrainingMetrics
    from tests.helpers.metrics_inputs import log_record, tiny_metrics_config

    require_prometheus()
    rng = random.Random(seed)
    job = f"ft-{uuid.uuid4().hex[:8]}"
    port = free_port_block(1)
    written = subprocess.run(["bash", str(MONITORING / "write_targets.sh"), str(tmp_path / "targets"), job, str(port),
                              "1"], env={**os.environ, "MIMAE_TARGET_HOSTS": "127.0.0.1"}, capture_output=True,
                             text=True, timeout=30)
    assert written.returncode == 0, written.stderr
    cfg = tiny_metrics_config(port, f"metrics.job={job}")
    metrics = TrainingMetrics(cfg, rank=0, local_rank=0, world_size=1)
    assert metrics.start(total_steps=40)
    prom = PrometheusServer(prometheus_config(tmp_path), tmp_path)
    try:
        accuracy = {"val_top1": rng.uniform(0.2, 0.6), "val_top5": rng.uniform(0.6, 1.0),
                    "ema_val_top1": rng.uniform(0.2, 0.6), "ema_val_top5": rng.uniform(0.6, 1.0)}
        metrics.on_log({**log_record(rng, step=10, epoch=1.0, skipped_samples=0), **accuracy})
        prom.wait_for(f'mimae_val_accuracy_ratio{{job="{job}"}}', count=4)
        panel = [(t, q) for t, q in dashboard_queries() if "mimae_val_accuracy_ratio" in q["expr"]]
        assert len(panel) == 1
        title, target = panel[0]
        check_query(prom, title, target, job, classifier_run=True)
        got = {(s["metric"]["k"], s["metric"]["weights"]): float(s["value"][1])
               for s in prom.query(grafana_substitute(target["expr"], job))}
        assert got == pytest.approx({("1", "model"): accuracy["val_top1"], ("5", "model"): accuracy["val_top5"],
                                     ("1", "ema"): accuracy["ema_val_top1"], ("5", "ema"): accuracy["ema_val_top5"]})
    finally:
        metrics.close()
        prom.stop()
