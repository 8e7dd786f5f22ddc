"""The exit statuses are written once (mimae_scale/exit_codes.py): the launcher's shell constants and
docs/CLUSTER.md's table must say the same."""

from __future__ import annotations

import re

from mimae_scale.exit_codes import exit_codes
from tests.helpers import REPO


def test_module_codes_are_distinct_and_named():
    codes = exit_codes()
    assert {"EXIT_OK", "EXIT_ERROR", "EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_REQUEUE"} <= set(codes)
    assert len(set(codes.values())) == len(codes), codes


def test_launcher_constants_equal_the_module():
    text = (REPO / "launch" / "common.sh").read_text()
    shell = {f"EXIT_{name}": int(value) for name, value in re.findall(r"^readonly MIMAE_EXIT_(\w+)=(\d+)$", text, re.M)}
    # the launcher acts on these three; any other MIMAE_EXIT_* must still be one of the module's
    assert {"EXIT_OK", "EXIT_CONFIG", "EXIT_REQUEUE"} <= set(shell), shell
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
