"""The offline bundle for the GPU machines (device/, docs/GPU.md), checked without building it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
CARRY_LIMIT = 64 * MIB  # what one device call carries, working tree included (/work/.library/device)


def fake_bundle(tmp_path: Path, manifest: str | None) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(ROOT / "device" / "install.sh", bundle / "install.sh")
    if manifest is not None:
        (bundle / "MANIFEST").write_text(manifest)
    return bundle


def run_install(bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "MIMAE_STAGE": str(tmp_path / "stage")}
    return subprocess.run(["bash", str(bundle / "install.sh")], capture_output=True, text=True, env=env, timeout=60)


def test_install_refuses_a_bundle_built_for_another_python_in_one_line(tmp_path) -> None:
    bundle = fake_bundle(tmp_path, "python 3.9\npart dali.tar.xz.00 1 x\n")
    (bundle / "wheels").mkdir()  # would be installed next: it must not be reached
    proc = run_install(bundle, tmp_path)
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "for Python 3.9" in proc.stderr and f"is {have}" in proc.stderr and "MANIFEST" in proc.stderr
    assert not (tmp_path / "stage").exists()  # refused before anything was staged or installed


def test_install_refuses_a_folder_without_manifest_in_one_line(tmp_path) -> None:
    proc = run_install(fake_bundle(tmp_path, None), tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "MANIFEST missing" in proc.stderr


def test_install_goes_on_for_the_bundles_own_python(tmp_path) -> None:
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    proc = run_install(fake_bundle(tmp_path, f"python {have}\n"), tmp_path)
    assert proc.returncode == 0, proc.stderr  # no wheels/, no parts: nothing to do, no refusal
    assert "Python" not in proc.stderr


def bundle_pins() -> dict[str, str]:
    """name -> version of every wheel device/bundle.sh puts in wheels/ by name (not the project's)."""
    text = (ROOT / "device" / "bundle.sh").read_text()
    block = re.search(r"PY_WHEELS=\((.*?)\)", text, re.S).group(1) + " " + re.search(r"DEEPSPEED=(\S+)", text).group(1)
    return {canonicalize_name(name): version for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([^\s)]+)", block)}


def test_every_requirement_of_the_bundled_wheels_is_carried_or_in_the_image() -> None:
    """A requirement the image may not meet (pydantic 2.14 needs typing-extensions >= 4.16, the
    image's version is unknown) must be carried, at a version that meets it. Read from the
    installed distributions of the same versions (CI pins them alike: constraints-ci.txt)."""
    pins = bundle_pins()
    image = {canonicalize_name(n) for n in (ROOT / "device" / "image_packages.txt").read_text().split()}
    checked = 0
    for name, version in pins.items():
        try:
            if metadata.version(name) != version:
                continue
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in pins:
                carried = pins[dep]
                assert req.specifier.contains(carried), f"bundle.sh: {name} {version} needs {req}, carries {carried}"
            elif dep not in image or dep == "typing-extensions":
                pytest.fail(f"bundle.sh: {name} {version} needs {req}: neither carried nor (known) in the image")
    assert checked >= 5, f"only {checked} of the bundle's pins are installed here at the same version"
    assert "typing-extensions" in pins


def test_the_carry_budget_leaves_2_mib_beside_todays_working_tree() -> None:
    budget = int(re.search(r"^budget_mib=(\d+)$", (ROOT / "device" / "bundle.sh").read_text(), re.M).group(1)) * MIB
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    assert CARRY_LIMIT - budget - tree >= 2 * MIB, f"bundle.sh budget {budget / MIB} MiB + tree {tree / MIB:.2f} MiB"


def test_cpu_results_are_ignored_and_gpu_results_are_not() -> None:
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("bench/results/2026-12-06-cpu.json")
    assert not ignored("bench/results/2026-12-06-nvidia-h100-80gb-hbm3.json")
