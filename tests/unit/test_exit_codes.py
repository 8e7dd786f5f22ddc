"""The exit statuses are written once (mimae_scale/exit_codes.py): the launcher's shell constants and
docs/CLUSTER.md's table must say the same."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from mimae_scale.exit_codes import EXIT_DISK_FULL, EXIT_ERROR, EXIT_OK, EXIT_REQUEUE, exit_codes
from tests.helpers import REPO


def test_module_codes_are_distinct_and_named():
    codes = exit_codes()
    assert {"EXIT_OK", "EXIT_ERROR", "EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_REQUEUE", "EXIT_DISK_FULL"} <= set(codes)
    assert len(set(codes.values())) == len(codes), codes


def test_launcher_constants_equal_the_module():
    text = (REPO / "launch" / "common.sh").read_text()
    shell = {f"EXIT_{name}": int(value) for name, value in re.findall(r"^readonly MIMAE_EXIT_(\w+)=(\d+)$", text, re.M)}
    # the launcher acts on these; any other MIMAE_EXIT_* must still be one of the module's
    assert {"EXIT_OK", "EXIT_CONFIG", "EXIT_REQUEUE", "EXIT_DISK_FULL"} <= set(shell), shell
    codes = exit_codes()
    assert {name: codes.get(name) for name in shell} == shell
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    literal = re.findall(r"\b(?:exit|mimae_die|mimae_after_ranks)\s+[0-9]+", code)
    assert not literal, f"launch/common.sh exits with a number instead of a MIMAE_EXIT_* constant: {literal}"


def test_cluster_doc_table_lists_exactly_the_module_codes():
    text = (REPO / "docs" / "CLUSTER.md").read_text()
    section = re.search(r"^## Exit codes\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "docs/CLUSTER.md has no '## Exit codes' section"
    rows = [int(code) for code in re.findall(r"^\|\s*(\d+)\s*\|[^|\n]+\|[^|\n]+\|\s*$", section.group(1), re.M)]
    assert sorted(rows) == sorted(exit_codes().values()), rows


@pytest.mark.parametrize(("rc", "usr2", "requeued", "status"), [
    (EXIT_DISK_FULL, 0, False, EXIT_DISK_FULL),
    (EXIT_DISK_FULL, 1, False, EXIT_DISK_FULL),  # not even after USR2: the same full disk would wait
    (EXIT_ERROR, 1, True, EXIT_OK),  # the rule 74 is the exception to
    (EXIT_REQUEUE, 1, True, EXIT_OK),
])
def test_launcher_never_requeues_a_full_disk(tmp_path, rc, usr2, requeued, status):
    """launch/common.sh's decision once the ranks are gone, with a recording `scontrol` on PATH."""
    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    script = f'source "{REPO / "launch" / "common.sh"}"; MIMAE_GOT_USR2={usr2}; mimae_after_ranks {rc}'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"})
    assert done.returncode == status, done.stderr
    assert calls.exists() == requeued, done.stderr
    if rc == EXIT_DISK_FULL:
        assert "disk full" in done.stderr and "not requeueing" in done.stderr
