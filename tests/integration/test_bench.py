"""mimae-bench runs end to end and prints each pipeline beside its reference (tiny sizes)."""

from __future__ import annotations

import json

import pytest

from mimae_scale.bench import main
from mimae_scale.gpubench import SECTIONS


def test_bench_data_runs_every_backend_and_the_reference(capsys) -> None:
    argv = ["data", "--images", "20", "--image-side", "64", "--img-size", "32", "--batch", "4", "--batches", "2"]
    assert main([*argv, "--warmup", "1", "--rounds", "1", "--threads", "1", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference (webdataset+PIL+torchvision" in out
    assert "dali (cpu" in out and "webdataset (cpu" in out and out.count("x the reference") == 2


def test_bench_shards_runs(capsys) -> None:
    assert main(["shards", "--images", "10", "--rounds", "1"]) == 0
    assert "x the decode-only reference" in capsys.readouterr().out


def test_bench_relayout_runs(capsys) -> None:
    assert main(["relayout", "--samples", "2503", "--per-tar", "100", "--ranks", "3", "--lookups", "500"]) == 0
    out = capsys.readouterr().out
    assert "2503 samples in 26 index files" in out and "per-sample lookup" in out, out


def test_bench_gpu_smoke_runs_every_section_on_the_cpu(tmp_path, capsys) -> None:
    """`mimae-bench gpu --device cpu --smoke`: all six sections at tiny sizes, each written to the JSON."""
    assert main(["gpu", "--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu.json")
    sections = json.loads(path.read_text())["sections"]
    assert list(sections) == list(SECTIONS)
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert sections["env"]["result"]["versions"]["torch"]
    checks = sections["kernels"]["result"]
    assert len(checks) == 2 * 2 * 7 and all(row["ok"] for row in checks.values())  # shapes x dtypes x cases
    timed = sections["kernel-time"]["result"]
    assert timed["tiny/gather_visible"]["floor_fwd_ms"] > 0 and timed["odd/info_nce"]["reference_bwd_ms"] > 0
    step = sections["step"]["result"]
    assert step["ceiling_tflops"] > 0
    for run in ("mimae_b/plain", "mimae_b/bf16", "mimae_b/amp", "mae_b/plain", "mae_b/bf16", "mae_b/amp"):
        row = step["runs"][run]
        assert row["images_per_s"] > 0 and row["model_tflops"] > 0 and row["forward_ms"] > 0, run
    assert step["runs"]["mimae_b/amp"]["applied"] and step["runs"]["mae_b/bf16"]["engine_over_plain"] > 0
    decode = sections["decode"]["result"]
    assert decode["torchvision_images_per_s"] > 0 and len(decode["dali"]) == 2
    train = sections["train"]["result"]
    assert train["steps"] == 4 and train["images_per_s"] > 0 and 0 <= train["data_wait_share"] < 1


def test_bench_gpu_only_and_skip_choose_sections(tmp_path) -> None:
    assert main(["gpu", "--device", "cpu", "--smoke", "--out", str(tmp_path), "--only", "env,kernels",
                 "--skip", "kernels"]) == 0
    (path,) = tmp_path.glob("*.json")
    assert list(json.loads(path.read_text())["sections"]) == ["env"]
    assert main(["gpu", "--device", "cpu", "--smoke", "--out", str(tmp_path / "late"), "--only", "kernels",
                 "--time-limit-s", "1e-9"]) == 0  # past the limit: recorded as skipped, nothing measured
    (path,) = (tmp_path / "late").glob("*.json")
    assert json.loads(path.read_text())["sections"]["kernels"]["status"] == "skipped"
    with pytest.raises(SystemExit, match="unknown section"):
        main(["gpu", "--device", "cpu", "--only", "nope"])


def test_bench_checkpoint_runs_and_cleans_up(capsys, tmp_path) -> None:
    assert main(["checkpoint", "--config", "tiny", "--ranks", "2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny:" in out and "in 3 files" in out and "verification at resume" in out
    assert not list(tmp_path.iterdir())
