"""mimae-bench runs end to end and prints each pipeline beside its reference (tiny sizes)."""

from __future__ import annotations

from mimae_scale.bench import main


def test_bench_data_runs_every_backend_and_the_reference(capsys) -> None:
    argv = ["data", "--images", "20", "--image-side", "64", "--img-size", "32", "--batch", "4", "--batches", "2"]
    assert main([*argv, "--warmup", "1", "--rounds", "1", "--threads", "1", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference (webdataset+PIL+torchvision" in out
    assert "dali (cpu" in out and "webdataset (cpu" in out and out.count("x the reference") == 2


def test_bench_shards_runs(capsys) -> None:
    assert main(["shards", "--images", "10", "--rounds", "1"]) == 0
    assert "x the decode-only reference" in capsys.readouterr().out


def test_bench_checkpoint_runs_and_cleans_up(capsys, tmp_path) -> None:
    assert main(["checkpoint", "--config", "tiny", "--ranks", "2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny:" in out and "in 3 files" in out and "verification at resume" in out
    assert not list(tmp_path.iterdir())
