"""``mimae-bench gpu``: prove and time the whole system on the device it runs on, in one command.

Sections run in this order; each one's result is written to ``<out>/<date>-<device>.json`` as soon
as it finishes (the file is rewritten atomically and merged with one already there for the same
day and device, so three calls on one machine fill one file, and a run cut short keeps what it did):

- ``env``: versions, device, driver, processors.
- ``kernels``: the six Triton kernels forward and backward, fp32 and bf16, at the ViT-B/L/H shapes
  and odd ones, against float64 math, every output buffer poisoned with NaN first.
- ``kernel-time``: each kernel's forward and backward time beside the plain-PyTorch reference and
  the byte floor (bytes of the dtypes actually used / device copy bandwidth measured here).
- ``step``: the real ``Trainer.train_step`` through DeepSpeed on a device-resident batch for MI-MAE
  and MAE at ViT-B and ViT-L, in both precision modes (and compiled), beside a plain-PyTorch step
  and a bf16 matmul ceiling measured in the same process.
- ``decode``: DALI mixed decode through the project's pipeline, threads x ``hw_decoder_load``,
  beside torchvision's GPU decode of the same JPEGs.
- ``train``: ``train.py`` for 40 steps fed by DALI: images/s and the data-wait share.

``--smoke`` runs every section at tiny shapes (with ``--device cpu``: on the CPU, kernels in
Triton's interpreter, DALI's CPU pipeline); CI runs it. Exit status 1 when a section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimae_scale.fileio import write_json_atomic

SECTIONS = ("env", "kernels", "kernel-time", "step", "decode", "train")


@dataclass
class Context:
    """What every section gets: the device, smoke or full sizes, a scratch folder shared by the
    sections (decode's shards feed train), ``result`` to fill and ``record`` to save it so far."""

    device: torch.device
    smoke: bool
    scratch: Path
    args: argparse.Namespace
    record: Callable[[], None] = lambda: None
    result: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() after which no new measurement starts

    def out_of_time(self) -> bool:
        """True once past --time-limit-s: the section records where it stopped and returns."""
        if self.deadline is None or time.monotonic() < self.deadline:
            return False
        self.result["stopped"] = "time limit (--time-limit-s): the rest was not measured"
        return True

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


class ResultsFile:
    """``<out>/<UTC date>-<device>.json``: {"device", "runs": [...], "sections": {name: {...}}}."""

    def __init__(self, out_dir: Path, device: torch.device, options: dict[str, Any]) -> None:
        self.path = out_dir / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{device_slug(device)}.json"
        self.data: dict[str, Any] = {"schema": "mimae-bench-gpu/1", "device": device_slug(device), "runs": [],
                                     "sections": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        self.data["runs"].append({"options": options, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data, default=str)


def env_section(ctx: Context) -> None:
    import platform
    import subprocess
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    dists = ("mimae-scale", "torch", "triton", "deepspeed", "nvidia-dali-cuda130", "torchvision", "timm",
             "webdataset", "prometheus-client", "numpy")
    out = ctx.result
    out.update({
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": {d: version(d) for d in dists},
        "torch_cuda": torch.version.cuda,
        "device": str(ctx.device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    })
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["nvidia_smi"] = f"unavailable: {exc}"


def _sections() -> dict[str, Callable[[Context], None]]:
    from mimae_scale.gpubench import data, kernels, step

    return {"env": env_section, "kernels": kernels.correctness, "kernel-time": kernels.timing,
            "step": step.section, "decode": data.decode, "train": data.train}


def _names(text: str | None) -> list[str]:
    names = [n for n in (text or "").split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"mimae-bench gpu: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    p.add_argument("--smoke", action="store_true", help="every section at tiny sizes (CI)")
    p.add_argument("--only", help=f"comma-separated sections to run ({','.join(SECTIONS)})")
    p.add_argument("--skip", help="comma-separated sections not to run")
    p.add_argument("--out", default="bench/results", help="folder of the results JSON")
    p.add_argument("--step-configs", default="mimae_l,mae_l,mimae_b,mae_b,finetune_b",
                   help="step section models: mimae_b, mimae_l, mae_b, mae_l (ViT-B/16, ViT-L/16), finetune_b "
                        "(MAE's ViT-B/16 fine-tuning)")
    p.add_argument("--step-precisions", default="bf16,amp", help="step section: engine.precision values")
    p.add_argument("--step-compile", default="mimae_l", help="step configs also run with engine.compile=true")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="start no new measurement after this many seconds (what was measured is kept)")


def main(args: argparse.Namespace) -> int:
    only, skip = _names(args.only), _names(args.skip)
    wanted = [s for s in SECTIONS if (not only or s in only) and s not in skip]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mimae-bench gpu: --device cuda, but torch sees no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    elif "mimae_scale.kernels" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors run interpreted
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    results = ResultsFile(Path(args.out), device, options)
    sections = _sections()
    failed = []
    with tempfile.TemporaryDirectory(prefix="mimae-bench-") as scratch:
        deadline = time.monotonic() + args.time_limit_s if args.time_limit_s else None
        ctx = Context(device=device, smoke=args.smoke, scratch=Path(scratch), args=args, record=results.write,
                      deadline=deadline)
        ctx.log(f"mimae-bench gpu on {device} ({'smoke' if args.smoke else 'full'}): {', '.join(wanted)}; "
                f"results in {results.path}")
        for name in wanted:
            entry: dict[str, Any] = {"status": "running", "smoke": args.smoke,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": {}}
            results.data["sections"][name] = entry
            ctx.result = entry["result"]
            if ctx.out_of_time():
                entry["status"] = "skipped"
                results.write()
                continue
            began = time.perf_counter()
            ctx.log(f"section {name} ...")
            try:
                sections[name](ctx)
                entry["status"] = "ok"
            except Exception as exc:  # a failed section is recorded and the next one still runs
                entry["status"] = "error"
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()[-4000:]
                failed.append(name)
                ctx.log(f"section {name} FAILED: {entry['error']}")
            entry["seconds"] = round(time.perf_counter() - began, 2)
            results.write()
            ctx.log(f"section {name}: {entry['status']} in {entry['seconds']:.1f} s")
    ctx.log(f"wrote {results.path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
