"""The repository stands alone: no file points readers outside it, and every doc it names exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"\.\./shared|\bSPEC\.md|\bTARGETS\.md|\bSERVICES\.md|\bCOMMON\.md")
DOC_PATH = re.compile(r"\b((?:docs|launch|mimae_scale|kernels|data_tools|tests)/[\w./-]+\.(?:md|py|sh|yaml|json))")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in tracked():
        if path.suffix in {".png", ".jpg", ".tar", ".idx"} or path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not offenders, offenders


def test_every_path_the_docs_name_exists():
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)  # markdown links, not URLs
        for name in [*links, *DOC_PATH.findall(text)]:
            base = doc.parent if name.startswith(".") else REPO
            if "*" not in name and "<" not in name and not (base / name).exists():
                missing.append(f"{doc.relative_to(REPO)}: {name}")
    assert not missing, missing
