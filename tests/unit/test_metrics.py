"""The per-rank exporter (mimae_scale.metrics) and the FLOP counter (mimae_scale.flops)."""

from __future__ import annotations

import logging
import math
import random
import socket
import time
import urllib.error

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.flop_counter import FlopCounterMode

from mimae_scale.config import ConfigError, load_config
from mimae_scale.flops import default_peak_tflops, tokens_per_image, train_flops_per_image
from mimae_scale.metrics import CLUB_HEALTH, STEP_BUCKETS, TrainingMetrics, job_name
from mimae_scale.model import build_model
from mimae_scale.model.club import ClubCritic
from tests.helpers.metrics_inputs import log_record, timing, tiny_metrics_config
from tests.helpers.prometheus_tools import free_port_block, http_get

# -- FLOP counter -------------------------------------------------------------------------------


def test_flops_hand_count_vit_l16_k4():
    """ViT-L/16, K 4, ratio 0.75 at 224 px, written out term by term (N 196, L 49, patch 768 values)."""
    cfg = load_config("mimae_vit_l16")
    k, enc, dec = 4, 1 + 49, 1 + 196
    matmul = (
        768 * 1024 * 196  # patch embedding, once per image
        + 24 * (4 * 1024**2 + 2 * 1024 * 4096) * k * enc  # encoder blocks on K x (1+L) tokens
        + 1024 * 512 * k * enc  # decoder_embed
        + 8 * (4 * 512**2 + 2 * 512 * 2048) * k * dec  # decoder blocks on K x (1+N) tokens
        + 512 * 768 * k * dec  # decoder_pred
        + (1024 * 2048 + 2048 * 256) * k  # InfoNCE projector on K pooled views
        + 2 * 6 * (1024 * 512 + 512 * 768) * k * 49  # CLUB's q: two MLPs, 5 fits + L_min, K x L tokens
    )
    attention = 24 * k * enc**2 * 1024 + 8 * k * dec**2 * 512
    expected = 6 * matmul + 12 * attention
    assert train_flops_per_image(cfg) == expected
    # the plain-PyTorch reference step of this model is counted at about 493 GFLOP per image with q run
    # twice (one fit, L_min); our q takes 5 fits, 4 more passes of its two MLPs
    extra_q_passes = 6 * 2 * 4 * (1024 * 512 + 512 * 768) * k * 49
    assert abs((expected - extra_q_passes) / 493e9 - 1) < 0.02
    assert tokens_per_image(cfg) == k * (enc + dec)


@pytest.mark.parametrize(
    "overrides",
    [[], ["mask.num_masks=1", "loss.w_max=0", "loss.w_min=0"], ["mi.club.level=global", "mask.strategy=independent"],
     ["mi.club.level=image"]],
    ids=["mimae", "mae", "club-global", "club-image"],
)
def test_flops_match_torch_flop_counter(overrides, gen):
    """torch's FlopCounterMode on the real model's forward + backward, with the convention's known
    over-counts added back: every term of the analytic count is checked, to the FLOP."""
    cfg = load_config("tiny", overrides)
    model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit matmuls: FlopCounterMode does not count CPU SDPA
    batch = 3
    imgs = torch.randn(batch, 3, 32, 32, generator=gen)
    counter = FlopCounterMode(display=False)
    with counter:
        model(imgs, generator=gen, critic=ClubCritic(cfg)).loss.backward()

    m, k = cfg.model, cfg.mask.num_masks
    patch_dim, visible = 3 * 4 * 4, 16
    # what the convention counts (6 per matmul parameter and token) but autograd does not run:
    over = 2 * patch_dim * m.embed_dim * cfg.num_patches * batch  # no gradient for the input images
    if cfg.loss.w_min > 0:
        club = cfg.mi.club
        x_dim = 3 * {"token": 4, "global": club.global_size, "image": 32}[club.level] ** 2
        rows = {"token": k * visible, "global": k, "image": 1}[club.level] * batch
        # q's fits: z detached, no input gradient; L_min: q detached, no weight gradients (2 MLPs each)
        over += club.q_steps * 2 * 2 * m.embed_dim * club.hidden_dim * rows
        over += 2 * 2 * (m.embed_dim * club.hidden_dim + club.hidden_dim * x_dim) * rows
    if cfg.loss.w_max > 0:
        over -= 6 * (batch * k) ** 2 * cfg.mi.proj_dim  # InfoNCE similarity matrix: run, not counted
    assert counter.get_total_flops() == train_flops_per_image(cfg) * batch - over


def test_default_peaks():
    assert default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert default_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert default_peak_tflops("NVIDIA H200") == 989.0
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert default_peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert default_peak_tflops(None) is None


# -- exporter -----------------------------------------------------------------------------------


def _families(text: str) -> dict[str, list]:
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append(sample)
    return families


def _one(families: dict[str, list], name: str, **labels: str) -> float:
    matches = [s for s in families[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, families.get(name))
    return matches[0].value


def test_exporter_values_and_labels(seed):
    rng = random.Random(seed)
    base = free_port_block(2)
    cfg = tiny_metrics_config(base, "metrics.peak_tflops=0.5", "metrics.ceiling_tflops=0.4")
    metrics = TrainingMetrics(cfg, rank=3, local_rank=1, world_size=2, node="nodeA")
    assert metrics.start(total_steps=40)
    try:
        # per rank: 32 of the global batch of 64; the last two steps skipped, one for this rank's NaN loss
        steps = [(64, rng.uniform(0.01, 0.2), rng.uniform(0.0, 0.005)) for _ in range(rng.randint(3, 9))]
        for i, (images, seconds, wait) in enumerate(steps):
            skipped = i >= len(steps) - 2
            metrics.on_step(timing(images, seconds, wait, applied=not skipped, loss_finite=i != len(steps) - 1))
        record = log_record(rng, step=10, epoch=1.25, skipped_samples=2)
        metrics.on_log(record)
        text_before_knn = http_get(f"http://127.0.0.1:{base + 1}/metrics")
        metrics.on_log({**record, "skipped_samples": 5, "knn_top1": 0.375,  # the online kNN monitor ran
                        "val_top1": 0.625, "val_top5": 0.875, "ema_val_top1": 0.6875})  # and a classifier's
        completed = time.time()
        metrics.on_checkpoint(1.25, completed)
        text = http_get(f"http://127.0.0.1:{base + 1}/metrics")  # port_base + local rank
    finally:
        metrics.close()

    fam = _families(text)
    labels = {"job": "unit", "rank": "3", "node": "nodeA"}
    for name, samples in fam.items():
        if name.startswith("mimae_"):
            for sample in samples:
                assert {k: sample.labels[k] for k in labels} == labels, (name, sample.labels)
    images = sum(s[0] for s in steps) // 2
    seconds = sum(s[1] for s in steps)
    assert _one(fam, "mimae_steps_total") == len(steps)
    assert _one(fam, "mimae_images_total") == images
    assert _one(fam, "mimae_step_duration_seconds_count") == len(steps)
    assert math.isclose(_one(fam, "mimae_step_duration_seconds_sum"), seconds, rel_tol=1e-9)
    for le in STEP_BUCKETS:
        expected = sum(s[1] <= le for s in steps)
        assert _one(fam, "mimae_step_duration_seconds_bucket", le=repr(float(le))) == expected
    assert math.isclose(_one(fam, "mimae_data_wait_seconds_total"), sum(s[2] for s in steps), rel_tol=1e-9)
    rate = images / seconds
    assert math.isclose(_one(fam, "mimae_images_per_second"), rate, rel_tol=1e-9)
    assert math.isclose(_one(fam, "mimae_tokens_per_second"), rate * tokens_per_image(cfg), rel_tol=1e-9)
    flops = rate * train_flops_per_image(cfg)
    assert math.isclose(_one(fam, "mimae_model_flops_per_second"), flops, rel_tol=1e-9)
    assert math.isclose(_one(fam, "mimae_model_flops_utilization_ratio"), flops / 0.4e12, rel_tol=1e-9)
    assert math.isclose(_one(fam, "mimae_model_flops_utilization_datasheet_ratio"), flops / 0.5e12, rel_tol=1e-9)
    for term in ("rec", "max", "min", "q"):
        assert _one(fam, "mimae_loss", term=term) == record[f"loss_{term}"]
    assert _one(fam, "mimae_loss", term="total") == record["loss"]
    for name in CLUB_HEALTH:
        assert _one(fam, "mimae_club", stat=name.removeprefix("club_")) == record[name]
    assert _one(fam, "mimae_learning_rate") == record["lr"]
    assert _one(fam, "mimae_grad_norm") == record["grad_norm"]
    assert _one(fam, "mimae_global_step") == 10
    assert _one(fam, "mimae_epoch") == 1.25
    assert _one(fam, "mimae_progress_ratio") == 10 / 40
    assert _one(fam, "mimae_skipped_steps_total") == 2
    assert _one(fam, "mimae_nonfinite_loss_steps_total") == 1
    assert _one(fam, "mimae_rejected_samples_total") == 5
    assert _one(fam, "mimae_checkpoint_save_duration_seconds") == 1.25
    assert _one(fam, "mimae_knn_top1_ratio") == 0.375
    assert not _families(text_before_knn).get("mimae_knn_top1_ratio")  # no series before the monitor ran
    assert _one(fam, "mimae_val_accuracy_ratio", k="1", weights="model") == 0.625
    assert _one(fam, "mimae_val_accuracy_ratio", k="5", weights="model") == 0.875
    assert _one(fam, "mimae_val_accuracy_ratio", k="1", weights="ema") == 0.6875
    assert len(fam["mimae_val_accuracy_ratio"]) == 3  # no EMA top-5 was reported
    assert not _families(text_before_knn).get("mimae_val_accuracy_ratio")
    assert _one(fam, "mimae_checkpoint_last_complete_timestamp_seconds") == completed
    info = fam["mimae_run_info"][0].labels
    assert (info["num_masks"], info["zero_stage"], info["world_size"]) == ("4", "1", "2")
    assert (info["micro_batch"], info["global_batch"], info["grad_accumulation"]) == ("32", "64", "1")
    assert info["peak_tflops"] == "0.5" and info["ceiling_tflops"] == "0.4" and info["version"]
    assert "process_resident_memory_bytes" in fam
    if not torch.cuda.is_initialized():
        assert "mimae_gpu_memory_allocated_bytes" not in fam  # declared, but no series on a CPU run


def test_no_mfu_without_a_peak_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU's default peak applies here")
    metrics = TrainingMetrics(tiny_metrics_config(free_port_block(1)), rank=0, local_rank=0, world_size=1)
    metrics.on_step(timing(32, 0.1, 0.0))
    metrics.on_log(log_record(random.Random(0)))
    names = {s.name for m in metrics.registry.collect() for s in m.samples}
    assert "mimae_model_flops_per_second" in names
    assert "mimae_model_flops_utilization_ratio" not in names
    assert "mimae_model_flops_utilization_datasheet_ratio" not in names


def test_tensors_are_refused_and_counts_only_grow(caplog):
    """A tensor would make an update a hidden device sync: refused. A count that shrinks is logged."""
    metrics = TrainingMetrics(tiny_metrics_config(free_port_block(1)), rank=0, local_rank=0, world_size=1)
    with pytest.raises(TypeError, match="step_s"):
        metrics.on_step(timing(32, torch.tensor(0.1), 0.0))
    rng = random.Random(0)
    with pytest.raises(TypeError, match="loss_rec"):
        metrics.on_log(log_record(rng, loss_rec=torch.tensor(1.0)))
    for total in (4, 3, 6):
        metrics.on_log(log_record(rng, skipped_samples=total))
    assert "skipped_samples went down from 4 to 3" in caplog.text
    names = {s.name: s.value for m in metrics.registry.collect() for s in m.samples}
    assert names["mimae_rejected_samples_total"] == 4 + 3


def test_two_ranks_in_one_process_and_port_in_use(caplog):
    base = free_port_block(2)
    cfg = tiny_metrics_config(base)
    ranks = [TrainingMetrics(cfg, rank=r, local_rank=r, world_size=2, node="n") for r in (0, 1)]
    try:
        for r in ranks:
            assert r.start(total_steps=10)
        for r, m in enumerate(ranks):
            m.on_step(timing(64 * (r + 1), 0.1, 0.0))
        for r in (0, 1):
            fam = _families(http_get(f"http://127.0.0.1:{base + r}/metrics"))
            assert _one(fam, "mimae_images_total", rank=str(r)) == 32 * (r + 1)
        clash = TrainingMetrics(cfg, rank=2, local_rank=1, world_size=2)
        with caplog.at_level(logging.ERROR, logger="mimae_scale.metrics"):
            assert clash.start(total_steps=10) is False  # logged; training goes on unexported
        assert f"cannot serve on 127.0.0.1:{base + 1} (metrics.port_base {base}" in caplog.text
        clash.on_step(timing(64, 0.1, 0.0))
        clash.close()
        assert _one(_families(http_get(f"http://127.0.0.1:{base + 1}/metrics")), "mimae_images_total") == 64
    finally:
        for r in ranks:
            r.close()
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{base}/metrics", timeout=1)  # closed


def test_disabled_serves_nothing():
    base = free_port_block(1)
    metrics = TrainingMetrics(tiny_metrics_config(base, "metrics.enabled=false"), rank=0, local_rank=0, world_size=1)
    assert metrics.start(total_steps=1) is False
    metrics.on_step(timing(32, 0.1, 0.0))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", base)) != 0
    metrics.close()


def test_job_label(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    assert job_name(load_config("tiny")) == "tiny"  # run_dir runs/tiny
    monkeypatch.setenv("SLURM_JOB_NAME", "vitl-1600")
    assert job_name(load_config("tiny")) == "vitl-1600"
    assert job_name(load_config("tiny", ["metrics.job=mine"])) == "mine"
    with pytest.raises(ConfigError, match="metrics.job"):
        load_config("tiny", ["metrics.job=a b"])


def test_metric_updates_cost_under_one_percent_of_the_tiny_step():
    """The benchmark's measurement (python -m mimae_scale.metrics_bench), with fewer repeats."""
    from mimae_scale.metrics_bench import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(tiny_metrics_config(free_port_block(1)), steps=3, updates=2000)
    finally:
        torch.set_num_threads(threads)
    print(f"step {result.step_s * 1e3:.1f} ms, updates {result.update_s * 1e6:.1f} us, {result.ratio:.5%}")
    assert result.update_s > 0 and result.ratio < 0.01
