"""launch/monitoring/: prometheus.yml (promtool), write_targets.sh (shellcheck, Slurm node lists) and
the Grafana dashboard's structure and metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mimae_scale.config import load_config
from mimae_scale.metrics import TrainingMetrics
from tests.helpers.monitoring import DASHBOARD, METRIC_SELECTOR, dashboard_panels, dashboard_queries, is_dcgm
from tests.helpers.prometheus_tools import MONITORING, require_prometheus, shellcheck

WRITE_TARGETS = MONITORING / "write_targets.sh"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
def write_targets(targets_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(WRITE_TARGETS), str(targets_dir), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_write_targets_passes_shellcheck():
    done = subprocess.run([shellcheck(), str(WRITE_TARGETS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_write_targets_from_host_list(tmp_path):
    out = tmp_path / "targets"
    done = write_targets(out, "vitl-1600", "9410", "3", env={"MIMAE_TARGET_HOSTS": "gpu01,gpu02 gpu03"})
    assert done.returncode == 0, done.stderr
    groups = json.loads((out / "vitl-1600.json").read_text())
    assert groups == [
        {"targets": [f"{h}:{p}" for p in (9410, 9411, 9412)], "labels": {"job": "vitl-1600", "node": h}}
        for h in ("gpu01", "gpu02", "gpu03")
    ]
    assert sorted(p.name for p in out.iterdir()) == ["vitl-1600.json"]  # the temporary file was renamed


def test_write_targets_expands_a_slurm_node_list(tmp_path):
    if not shutil.which("scontrol"):
        pytest.skip("Slurm's scontrol is not installed (.ci/run installs slurm-wlm)")
    conf = tmp_path / "slurm.conf"  # `scontrol show hostnames` only needs a configuration to read
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    env = {"SLURM_CONF": str(conf), "SLURM_JOB_NODELIST": "gpu[07-09],cpu1"}
    env_without_override = {k: v for k, v in os.environ.items() if k != "MIMAE_TARGET_HOSTS"}
    done = subprocess.run(["bash", str(WRITE_TARGETS), str(tmp_path), "job1", "9410", "1"], capture_output=True,
                          text=True, env={**env_without_override, **env}, timeout=30)
    assert done.returncode == 0, done.stderr
    groups = json.loads((tmp_path / "job1.json").read_text())
    assert [g["labels"]["node"] for g in groups] == ["gpu07", "gpu08", "gpu09", "cpu1"]
    assert [g["targets"] for g in groups] == [[f"{h}:9410"] for h in ("gpu07", "gpu08", "gpu09", "cpu1")]


@pytest.mark.parametrize(
    ("args", "hosts", "message"),
    [
        (["bad name", "9410", "1"], "n1", "JOB_NAME"),
        (["j", "94x", "1"], "n1", "PORT_BASE"),
        (["j", "9410", "0"], "n1", "RANKS_PER_NODE"),
        (["j", "65535", "2"], "n1", "exceeds 65535"),
        (["j", "9410", "1"], 'n1,"evil', "host name"),
        (["j", "9410"], "n1", "usage"),
    ],
)
def test_write_targets_refuses_bad_input(tmp_path, args, hosts, message):
    done = write_targets(tmp_path / "t", *args, env={"MIMAE_TARGET_HOSTS": hosts})
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_prometheus_config_and_targets_pass_promtool(tmp_path):
    """promtool checks the configuration and, through file_sd, the targets files the script wrote."""
    require_prometheus()
    shutil.copy(MONITORING / "prometheus.yml", tmp_path / "prometheus.yml")
    hosts = {"MIMAE_TARGET_HOSTS": "gpu01,gpu02"}
    assert write_targets(tmp_path / "targets", "run-a", "9410", "8", env=hosts).returncode == 0
    assert write_targets(tmp_path / "targets" / "dcgm", "run-a", "9400", "1", env=hosts).returncode == 0
    done = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout + done.stderr, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr  # both file_sd globs matched a file
    (tmp_path / "targets" / "broken.json").write_text('[{"targets": ["a:1"], "labels": {"job": 3}}]')
    done = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0  # the check reads the targets files: it can fail


# -- dashboard ------------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name our exporter can produce, read from a real registry (CUDA-only families
    are declared even on a CPU run, so their names are listed too)."""
    cfg = load_config("tiny", ["metrics.peak_tflops=1", "metrics.ceiling_tflops=1"])
    metrics = TrainingMetrics(cfg, rank=0, local_rank=0, world_size=1, node="n")
    names = set()
    for family in metrics.registry.collect():
        names.update(s.name for s in family.samples)
        if family.type == "gauge":
            names.add(family.name)
    return names


def test_dashboard_queries_use_only_exported_metrics():
    exported = exported_metric_names()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, target in queries:
        names = METRIC_SELECTOR.findall(target["expr"])
        assert names, (title, target["expr"])
        if is_dcgm(target["expr"]):
            continue  # NVIDIA's exporter's names; the optional GPU row holds exactly these (test below)
        unknown = [n for n in names if n not in exported]
        assert not unknown, f"panel {title!r} queries metrics the exporter does not export: {unknown}"
        assert 'job=~"$job"' in target["expr"], (title, target["expr"])  # follows the job variable


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "node", "rank"} <= set(variables)
    assert "label_values(mimae_run_info" in variables["job"]["definition"]
    assert variables["rank"]["multi"] and variables["rank"]["includeAll"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Throughput", "MFU", "Step time quantiles", "Data-wait fraction", "stragglers", "Loss terms",
                   "Learning rate", "Gradient norm", "Skipped steps", "Rejected samples", "Memory",
                   "Checkpoint age", "DCGM"):
        assert wanted in titles, wanted
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var in GRAFANA_BUILTINS, (panel["title"], var)
    dcgm_rows = [p for p in panels if p["type"] == "row" and "DCGM" in p["title"]]
    assert len(dcgm_rows) == 1 and dcgm_rows[0]["collapsed"] and "optional" in dcgm_rows[0]["title"]
    assert all(is_dcgm(t["expr"]) for p in dcgm_rows[0]["panels"] for t in p["targets"])


def test_grafana_provisioning_files():
    datasources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/mimae_prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1 and datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/mimae_dashboards.yaml").read_text())
    assert providers["apiVersion"] == 1 and providers["providers"][0]["type"] == "file"
    assert providers["providers"][0]["options"]["path"]
