"""Call 1 of docs/GPU.md rehearsed on the CPU, in a fresh environment that sees only a stand-in for
the GPU image's packages (device/image_standin.py: torch, Triton, pip, ...; no project, DeepSpeed,
pydantic or DALI), with bundles that are broken on purpose:

- a corrupt DeepSpeed wheel: install.sh fails, and the env and kernels sections (and kernel-time)
  are still in $OUT; the step section, which needs DeepSpeed, fails on its own;
- a bundle built for another Python: install.sh stops with one line, the kernels still run;
- a call cut off at its limit still brings back what finished;
- the sections in-process with DeepSpeed, pydantic, webdataset and DALI unimportable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """A fresh venv (no pip of its own) whose only packages are the image stand-in's."""
    base = tmp_path_factory.mktemp("image")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, str(ROOT / "device" / "image_standin.py"), "--from", sys.prefix,
                    str(base / "site")], check=True, capture_output=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "image.pth").write_text(f"{base / 'site'}\n")
    return venv / "bin"


def bundle(tmp_path: Path, python: str) -> Path:
    out = tmp_path / "bundle"
    (out / "wheels").mkdir(parents=True)
    shutil.copy(ROOT / "device" / "install.sh", out / "install.sh")
    (out / "MANIFEST").write_text(f"python {python}\n")
    # not a zip at all: pip must reject it
    (out / "wheels" / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"deliberately broken\n")
    return out


def call(bin_dir: Path, bundle_dir: Path, out: Path, sections: str) -> subprocess.CompletedProcess:
    out.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out), "MIMAE_BUNDLE": str(bundle_dir),
           "MIMAE_STAGE": str(out.parent / "stage"), "PIP_CONFIG_FILE": "/dev/null", "HOME": os.environ["HOME"],
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "")}
    return subprocess.run(["bash", "device/call.sh", sections, "300", "--device", "cpu", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)


def sections_in(out: Path) -> dict:
    (path,) = out.glob("*-cpu.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_call_1_with_a_broken_wheel_still_brings_back_the_kernel_proof(image_python, tmp_path) -> None:
    assert subprocess.run([image_python / "python3", "-c", "import deepspeed"], capture_output=True).returncode
    proc = call(image_python, bundle(tmp_path, PYTHON), tmp_path / "out", "env,kernels,step,kernel-time")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    data = sections_in(tmp_path / "out")
    assert data["install"]["exit_status"] not in (0, None), data["install"]
    assert "deepspeed-0.19.8-py3-none-any.whl is invalid" in data["install"]["log_tail"]  # pip ran and refused it
    status = {name: s["status"] for name, s in data["sections"].items()}
    assert status == {"env": "ok", "kernels": "ok", "step": "error", "kernel-time": "ok"}, log[-3000:]
    assert len(data["sections"]["kernels"]["result"]) == 2 * 2 * 7  # every check ran: shapes x dtypes x cases
    assert data["sections"]["env"]["result"]["versions"]["deepspeed"] is None
    assert (tmp_path / "out" / "install.log").read_text().endswith(f"exit status {data['install']['exit_status']}\n")


@pytest.mark.slow
def test_a_call_cut_off_at_its_limit_still_brings_back_what_finished(tmp_path) -> None:
    """The project's own environment, a bundle with nothing to install, and a limit the kernels
    cannot meet (full shapes in Triton's interpreter): env is in $OUT, kernels as far as it got."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "bundle").mkdir()
    shutil.copy(ROOT / "device" / "install.sh", tmp_path / "bundle" / "install.sh")
    (tmp_path / "bundle" / "MANIFEST").write_text(f"python {PYTHON}\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(out),
           "MIMAE_BUNDLE": str(tmp_path / "bundle"), "MIMAE_STAGE": str(tmp_path / "stage")}
    proc = subprocess.run(["bash", "device/call.sh", "env,kernels", "50", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-2000:]  # timeout's: the bench was killed
    data = sections_in(out)
    assert data["install"]["ok"] and data["sections"]["env"]["status"] == "ok"
    assert data["sections"]["kernels"]["status"] == "running"  # cut off: the JSON says where


@pytest.mark.slow
def test_a_bundle_for_another_python_stops_install_sh_with_one_line(image_python, tmp_path) -> None:
    proc = call(image_python, bundle(tmp_path, "3.9"), tmp_path / "out", "env,kernels")
    install = (tmp_path / "out" / "install.log").read_text().splitlines()
    assert len(install) == 2 and install[1] == "install.sh exit status 1", install
    assert f"bundle is for Python 3.9, but python3 is {PYTHON}" in install[0]
    assert not (tmp_path / "stage").exists()
    data = sections_in(tmp_path / "out")
    assert [s["status"] for s in data["sections"].values()] == ["ok", "ok"], proc.stdout[-2000:]


@pytest.mark.slow
def test_the_kernel_proof_runs_without_the_bundle_and_records_a_failed_install(tmp_path) -> None:
    """`mimae-bench gpu` with DeepSpeed, pydantic, webdataset and DALI unimportable (what a failed
    install leaves on the GPU image)."""
    log = tmp_path / "install.log"
    log.write_text("ERROR: Wheel 'deepspeed' is invalid\ninstall.sh exit status 1\n")
    blocked = ["deepspeed", "pydantic", "webdataset", "nvidia.dali"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from mimae_scale.bench import main; "
            f"sys.exit(main(['gpu', '--device', 'cpu', '--smoke', '--only', 'env,kernels,step', "
            f"'--out', {str(tmp_path)!r}, '--install-log', {str(log)!r}]))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # the install and step failed
    assert "install FAILED (exit status 1)" in proc.stdout
    data = json.loads(next(tmp_path.glob("*-cpu.json")).read_text())
    assert data["install"]["exit_status"] == 1 and not data["install"]["ok"]
    sections = data["sections"]
    assert sections["env"]["status"] == "ok" and sections["kernels"]["status"] == "ok"
    assert sections["step"]["status"] == "error" and "deepspeed" in sections["step"]["error"]
