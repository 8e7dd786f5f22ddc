"""What makes one device call of `mimae-bench gpu` safe (docs/GPU.md): the kernel proof without the
bundle's packages, the install's outcome in the JSON, train.py on this checkout within the deadline."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mimae_scale
from mimae_scale.gpubench import Context, read_install_log
from mimae_scale.gpubench.data import TRAIN_MARGIN_S, checkout_env, train, train_timeout

ROOT = Path(__file__).resolve().parents[2]


def context(tmp_path: Path, ends_in: float | None) -> Context:
    ends_at = None if ends_in is None else time.monotonic() + ends_in
    return Context(device=torch.device("cpu"), smoke=True, scratch=tmp_path, args=argparse.Namespace(),
                   ends_at=ends_at)


def test_train_timeout_is_what_is_left_before_the_deadline(tmp_path) -> None:
    assert 100 - TRAIN_MARGIN_S - 2 < train_timeout(context(tmp_path, 100)) <= 100 - TRAIN_MARGIN_S
    assert train_timeout(context(tmp_path, None)) == 240  # no deadline: the smoke run's fixed limit
    with pytest.raises(TimeoutError, match="--deadline-s"):
        train_timeout(context(tmp_path, TRAIN_MARGIN_S + 20))


def test_the_train_section_does_not_start_train_py_past_the_deadline(tmp_path) -> None:
    ctx = context(tmp_path, 5)
    with pytest.raises(TimeoutError, match="too little to start train.py"):
        train(ctx)
    assert "command" not in ctx.result


def test_train_py_imports_this_checkout_even_where_a_wheel_comes_first(tmp_path, monkeypatch) -> None:
    wheel = tmp_path / "site" / "mimae_scale"  # a stale installed copy, first on the path
    wheel.mkdir(parents=True)
    (wheel / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(wheel.parent))
    probe = [sys.executable, "-c", "import mimae_scale; print(mimae_scale.__file__)"]

    def imported(env: dict[str, str]) -> Path:
        out = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        return Path(out.strip()).resolve()

    assert imported(dict(os.environ)) == (wheel / "__init__.py").resolve()  # what train.py used to get
    assert imported(checkout_env()) == Path(mimae_scale.__file__).resolve()
    assert checkout_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(wheel.parent)]


def test_install_log_outcomes(tmp_path) -> None:
    log = tmp_path / "install.log"
    log.write_text("install.sh: DeepSpeed ... installed\ninstall.sh exit status 0\n")
    assert read_install_log(log)["ok"] and read_install_log(log)["exit_status"] == 0
    log.write_text("ERROR: Wheel 'deepspeed' is invalid\ninstall.sh exit status 1\n")
    failed = read_install_log(log)
    assert not failed["ok"] and failed["exit_status"] == 1 and "invalid" in failed["log_tail"]
    log.write_text("killed half-way\n")
    assert read_install_log(log)["exit_status"] is None and not read_install_log(log)["ok"]
    assert "no such file" in read_install_log(tmp_path / "missing.log")["log_tail"]
