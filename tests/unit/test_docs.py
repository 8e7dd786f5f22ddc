"""The repository stands alone and its docs cannot drift: no file points outside it, every link and
path the docs name exists, the README's layout covers the tree, and the configuration table lists
exactly the Config dataclasses' keys and defaults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mimae_scale.config import Config

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
OUTSIDE = re.compile(r"\.\./shared|\bSPEC\.md|\bTARGETS\.md|\bSERVICES\.md|\bCOMMON\.md")
TOP_DIRS = "docs|launch|mimae_scale|kernels|data_tools|tests|device"
DOC_PATH = re.compile(rf"\b((?:{TOP_DIRS})/[\w./-]+\.(?:md|py|sh|yaml|yml|json|txt))")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next heading of level 1 or 2)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Cells of a markdown table's body rows (header and rule skipped); `\\|` stays inside a cell."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in tracked():
        if path.suffix in {".png", ".jpg", ".tar", ".idx"} or path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not offenders, offenders


def test_every_relative_link_resolves_with_its_anchor():
    broken = []
    for doc in docs():
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a URL, not a file in the repository
                continue
            name, _, anchor = target.partition("#")
            dest = (doc.parent / name).resolve() if name else doc
            if not dest.exists() or REPO not in [dest, *dest.parents]:
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file in the repository)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not broken, broken


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for doc in docs():
        for name in DOC_PATH.findall(doc.read_text()):
            if "*" not in name and "<" not in name and not (REPO / name).exists():
                missing.append(f"{doc.relative_to(REPO)}: {name}")
    assert not missing, missing


def test_readme_layout_names_existing_paths_and_covers_the_tree():
    rows = table_rows(section((REPO / "README.md").read_text(), "Layout"))
    named: set[str] = set()
    missing = []
    for where, what in rows:
        paths = re.findall(r"`([^`]+)`", where)
        named.update(p.rstrip("/") for p in paths)
        for path in paths:
            if not (REPO / path).exists():
                missing.append(path)
        # files named in the description live in the row's (first) directory
        base = next((REPO / p for p in paths if (REPO / p).is_dir()), None)
        for name in re.findall(r"`([\w.-]+\.(?:py|sh|yaml|json))`", what):
            if base is None or not (base / name).exists():
                missing.append(f"{name} (row {paths})")
    assert not missing, missing

    files = [p.relative_to(REPO) for p in tracked()]
    top = {f.parts[0] for f in files if len(f.parts) > 1 or not f.name.startswith(".")} - {"README.md"}
    packages = {f"mimae_scale/{f.parts[1]}" for f in files if f.parts[0] == "mimae_scale" and len(f.parts) > 2}
    modules = {str(f) for f in files if f.parts[0] == "mimae_scale" and len(f.parts) == 2
               and f.suffix == ".py" and f.name != "__init__.py"}
    launch = {f"launch/{f.name}" for f in files if f.parts[0] == "launch" and len(f.parts) == 2}
    layout_text = "\n".join(" ".join(row) for row in rows)
    uncovered = sorted(p for p in top if not any(n == p or n.startswith(f"{p}/") for n in named))
    uncovered += sorted(p for p in packages | modules if p not in named)
    uncovered += sorted(p for p in launch if Path(p).name not in layout_text)
    assert not uncovered, f"README's layout leaves out {uncovered}"


def config_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a Config, dotted, with its default as YAML would read it (tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(config_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


def test_configuration_table_lists_every_key_with_its_default():
    rows = table_rows(section((REPO / "docs" / "TRAINING.md").read_text(), "Configuration keys"))
    documented: dict[str, Any] = {}
    problems = []
    for row in rows:
        cells = [re.fullmatch(r"`(.*)`", row[0]), re.fullmatch(r"`(.*)`", row[1])] if len(row) == 3 else []
        assert all(cells), f"row {row}: expected | `key` | `default` | meaning |"
        key, default, meaning = cells[0].group(1), cells[1].group(1), row[2]
        if key in documented:
            problems.append(f"{key}: listed twice")
        documented[key] = yaml.safe_load(default)
        if not meaning:
            problems.append(f"{key}: no meaning given")
    actual = config_keys(Config())
    problems += [f"{k}: missing from the table" for k in sorted(actual.keys() - documented.keys())]
    problems += [f"{k}: not a Config key" for k in sorted(documented.keys() - actual.keys())]
    for key in sorted(actual.keys() & documented.keys()):
        want, got = actual[key], documented[key]
        if isinstance(want, float) and isinstance(got, (int, float, str)) and not isinstance(got, bool):
            got = float(got)  # YAML 1.1 reads 1e-3 as a string; config.py accepts it as a number too
        if got != want or type(got) is not type(want):
            problems.append(f"{key}: table says {got!r}, config.py has {want!r}")
    assert not problems, problems
