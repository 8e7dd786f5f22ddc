"""docs/GPU.md's device plan adds up: within 10 minutes of device time with one machine start by its
own estimate, the proof (env, kernels, step) in the first call, each command inside its call's
limit, every flag one the bench takes, every carried path one the bundle has, and the machine
given back at the end."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from mimae_scale import gpubench

ROOT = Path(__file__).resolve().parents[2]
PLAN = (ROOT / "docs" / "GPU.md").read_text().split("## The device plan", 1)[1].split("\n## ", 1)[0]
BUDGET_MIN = 10  # the device time the plan must fit (issue 23), one machine start included
CALL_SH_RESERVE_S = 10  # device/call.sh keeps this much of its limit for the last write


def table() -> dict[str, tuple[float, float]]:
    """step -> (estimate, at its limit) in minutes, from the plan's table."""
    rows = {}
    for name, estimate, limit in re.findall(r"^\| ([^|]+?) \| \**([\d.]+)(?: min)?\** \| ([\d.]+)", PLAN, re.M):
        rows[name] = (float(estimate), float(limit))
    return rows


def calls() -> list[dict]:
    found = []
    for block in re.findall(r"```text\n(.*?)```", PLAN, re.S):
        carry = re.search(r"carry:\s+(\[.*?\])", block).group(1)
        found.append({"carry": json.loads(carry), "timeout_s": int(re.search(r"timeout_s:\s+(\d+)", block).group(1)),
                      "command": shlex.split(re.search(r"command:\s+(.*)", block).group(1))})
    return found


def test_the_plan_fits_10_minutes_with_one_start_by_its_own_estimate() -> None:
    rows = table()
    assert rows["machine start (first call)"][0] >= 1  # the device notes: "a minute or more"
    parts = {name: value for name, value in rows.items() if name != "total"}
    assert sum(e for e, _ in parts.values()) == rows["total"][0] <= BUDGET_MIN, rows
    assert sum(limit for _, limit in parts.values()) == rows["total"][1] < 15, rows  # inside the lease at limits
    assert list(rows)[-2:] == ["give back", "total"]
    assert "give_back" in PLAN.rsplit("**Call 2**", 1)[1]


def test_each_call_runs_inside_its_limit_with_the_proof_first() -> None:
    plan_calls, rows = calls(), table()
    assert len(plan_calls) == 2
    parser = argparse.ArgumentParser()
    gpubench.add_arguments(parser)
    limits = [v[1] for k, v in rows.items() if k.startswith("call ")]
    for number, (call, limit_min) in enumerate(zip(plan_calls, limits, strict=True), 1):
        bash, script, sections, limit, *options = call["command"]
        assert (bash, script) == ("bash", "device/call.sh"), call
        assert int(limit) + CALL_SH_RESERVE_S <= call["timeout_s"] <= limit_min * 60, (number, call)
        args = parser.parse_args(["--only", sections, *options])  # every option is one the bench takes
        assert args.time_limit_s is None or args.time_limit_s < int(limit), call
        if number == 1:
            assert sections.split(",") == ["env", "kernels", "step", "kernel-time"]
        else:
            assert sections == "decode,train"


def test_each_call_carries_what_the_bundle_has_and_fits_the_carry_limit() -> None:
    bundle_sh = (ROOT / "device" / "bundle.sh").read_text()
    for call in calls():
        for path in call["carry"]:
            folder, name = path.split("/", 1)
            assert folder == ".device_bundle" and name in ("install.sh", "MANIFEST", "wheels"), path
            assert name in bundle_sh
        assert not any("parts/" in p for p in call["carry"])  # DALI's parts need the same warm machine
