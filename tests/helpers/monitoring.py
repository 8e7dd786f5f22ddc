"""The Grafana dashboard's queries and their checks against a real Prometheus, shared by the
monitoring tests (tests/integration/test_monitoring_*.py, test_scaleout.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import yaml

from tests.helpers.prometheus_tools import MONITORING, PrometheusServer

DASHBOARD = MONITORING / "grafana" / "mimae_throughput.json"
METRIC_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{")
RANKS = 2  # ranks of the monitored trainings: check_query wants one series per rank
RATE_WINDOW = "8s"  # stands in for Grafana's $__rate_interval: 8 scrapes at the test's 1 s interval
LOSS_TERMS = {"total", "rec", "max", "min", "q"}
CLUB_STATS = {"q_gain", "logvar_mean", "logvar_saturated"}


def dashboard_panels(panels: list[dict] | None = None) -> list[dict]:
    """Every panel, rows' nested (collapsed) panels included."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"] if panels is None else panels:
        out.append(panel)
        out.extend(dashboard_panels(panel.get("panels", [])))
    return out


def dashboard_queries() -> list[tuple[str, dict]]:
    """(panel title, target) for every query of every panel."""
    return [(p["title"], t) for p in dashboard_panels() for t in p.get("targets", [])]


def is_dcgm(expr: str) -> bool:
    """DCGM exporter metrics: optional panels, present only where NVIDIA's exporter runs."""
    return all(name.startswith("DCGM_FI_") for name in METRIC_SELECTOR.findall(expr))


def cuda_only(expr: str) -> bool:
    """Queries of GPU memory only: the exporter has these series on CUDA runs alone."""
    names = METRIC_SELECTOR.findall(expr)
    return bool(names) and all(n.startswith("mimae_gpu_memory_") for n in names)


def classifier_only(expr: str) -> bool:
    """Queries of a classifier's held-out accuracy: series only on fine-tuning and probing runs."""
    names = METRIC_SELECTOR.findall(expr)
    return bool(names) and all(n == "mimae_val_accuracy_ratio" for n in names)


def prometheus_config(workdir: Path) -> Path:
    """The shipped prometheus.yml with the test's short intervals; everything else as shipped."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = "1s"
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def grafana_substitute(expr: str, job: str) -> str:
    """What Grafana sends with job = ours, node and rank = All."""
    for name, value in (("$__rate_interval", RATE_WINDOW), ("$job", job), ("$node", ".*"), ("$rank", ".*")):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def check_query(prom: PrometheusServer, title: str, target: dict, job: str, classifier_run: bool = False) -> None:
    expr = grafana_substitute(target["expr"], job)
    result = prom.query(expr)
    where = f"panel {title!r}, query {expr}"
    if cuda_only(target["expr"]) and not torch.cuda.is_available():
        assert result == [], f"{where}: GPU memory series on a CPU run"
        return
    if classifier_only(target["expr"]) and not classifier_run:
        assert result == [], f"{where}: classifier accuracy on a pretraining run"
        return
    assert result, f"{where}: no data"
    for series in result:
        value = float(series["value"][1])
        assert math.isfinite(value), f"{where}: {series}"
        labels = series["metric"]
        for wanted in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
            assert wanted in labels, f"{where}: series without label {wanted}: {labels}"
        if "job" in labels:
            assert labels["job"] == job, f"{where}: {labels}"
    legend = target.get("legendFormat", "")
    if "{{rank}}" in legend:
        assert {s["metric"]["rank"] for s in result} == {str(r) for r in range(RANKS)}, where
    elif "{{term}}" in legend:
        assert {s["metric"]["term"] for s in result} == LOSS_TERMS, where
    elif "{{k}}" in legend:
        assert {(s["metric"]["k"], s["metric"]["weights"]) for s in result} >= {("1", "model"), ("5", "model")}, where
    elif "{{stat}}" in legend:
        assert {s["metric"]["stat"] for s in result} == CLUB_STATS, where
    else:
        assert len(result) == 1, f"{where}: expected one series, got {result}"
    if "by (job)" in expr:
        assert all(s["metric"].get("job") == job for s in result), where
