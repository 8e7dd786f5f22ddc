"""Prometheus metrics of a training process: one HTTP exporter per rank.

Each rank serves its own registry on ``cfg.metrics.port_base + local_rank`` at
``cfg.metrics.bind_address`` (no multiprocess mode, no pushgateway). Every series carries the
labels ``job``, ``rank`` and ``node``. The catalogue is in docs/METRICS.md.

:class:`TrainingMetrics` is one of the trainer's sinks (``mimae_scale.engine.reporting``): its
``on_step`` gets every optimiser step's :class:`StepTiming` (host timings, image counts, DeepSpeed's
skip flag) and its ``on_log`` the ``metrics.jsonl`` record of a log step, whose values the trainer
has already synchronised; ``on_checkpoint`` follows each complete checkpoint. Only Python numbers
are accepted: a tensor would make the update a hidden host-device synchronisation, so it is
refused with a TypeError.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server

import mimae_scale
from mimae_scale.config import Config, grad_accumulation
from mimae_scale.engine.reporting import StepTiming
from mimae_scale.flops import default_peak_tflops, measure_matmul_tflops, tokens_per_image, train_flops_per_image

log = logging.getLogger("mimae_scale.metrics")

LABELS = ("job", "rank", "node")
LOSS_TERMS = ("rec", "max", "min", "q")  # the model's terms; metrics.jsonl has them as loss_<term>
# CLUB critic health (mimae_scale.model.club), under these names in metrics.jsonl
CLUB_HEALTH = ("club_q_gain", "club_logvar_mean", "club_logvar_saturated")
# a classifier's held-out accuracy in metrics.jsonl -> (k, weights) of mimae_val_accuracy_ratio
VAL_ACCURACY = {"val_top1": ("1", "model"), "val_top5": ("5", "model"), "ema_val_top1": ("1", "ema"),
                "ema_val_top5": ("5", "ema")}

# Step durations from 1 ms (tiny CPU model) to 100 s, at most 1.5x apart, so quantiles interpolate
# within a narrow bucket at any scale.
STEP_BUCKETS = (*(float(f"{m}e{e}") for e in range(-3, 2) for m in (1, 1.5, 2, 3, 5, 7)), 100.0)


def job_name(cfg: Config) -> str:
    """The ``job`` label: ``metrics.job``, else $SLURM_JOB_NAME, else the run directory's name."""
    return cfg.metrics.job or os.environ.get("SLURM_JOB_NAME") or Path(cfg.run_dir).name or "mimae"


def node_name() -> str:
    """The ``node`` label: Slurm's name for this node (what `scontrol show hostnames` lists, so it
    matches the targets file), else the short host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def model_name(cfg: Config) -> str:
    widths = {(768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
    m = cfg.model
    return f"{widths.get((m.embed_dim, m.depth), f'ViT-{m.embed_dim}x{m.depth}')}/{m.patch_size}"


def _number(name: str, value: Any) -> float:
    # bool is an int subclass but never a measurement; a tensor would force a device sync
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name}: expected a Python number, got {type(value).__name__}")
    return value


class TrainingMetrics:
    """The metrics of one rank. Create it on every rank, :meth:`start` it, :meth:`close` it at exit.

    With ``metrics.enabled`` false nothing is served, but the updates still work (and cost the
    same), so the trainer has one code path.
    """

    def __init__(
        self,
        cfg: Config,
        rank: int,
        local_rank: int,
        world_size: int,
        node: str | None = None,
        job: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.port = cfg.metrics.port_base + local_rank
        self.registry = CollectorRegistry()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.labels = {"job": job or job_name(cfg), "rank": str(rank), "node": node or node_name()}
        self._flops_per_image = train_flops_per_image(cfg)
        self._tokens_per_image = tokens_per_image(cfg)
        self._cuda = torch.cuda.is_available()
        device_name = torch.cuda.get_device_name() if self._cuda else None
        self.peak_tflops = cfg.metrics.peak_tflops or default_peak_tflops(device_name)
        # MFU's denominator: the configured ceiling, else one measured now on a GPU (~1 s), none on a CPU
        self.ceiling_tflops = cfg.metrics.ceiling_tflops or (
            measure_matmul_tflops(torch.device("cuda", torch.cuda.current_device())) if self._cuda else None
        )
        self._total_steps: int | None = None
        self._window_images = 0
        self._window_seconds = 0.0
        self._rejected = 0
        # what on_log derived from the record (model FLOP/s, MFU), for the run trackers to log as set here
        self.derived: dict[str, float] = {}

        reg = self.registry
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, process_cpu_seconds_total, ...

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=reg).labels(**self.labels)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, LABELS, registry=reg).labels(**self.labels)

        info = Info("mimae_run", "Settings of the run (value 1).", LABELS, registry=reg).labels(**self.labels)
        info.info({
            "model": model_name(cfg),
            "num_masks": str(cfg.mask.num_masks),
            "zero_stage": str(cfg.engine.zero_stage),
            "micro_batch": str(cfg.train.micro_batch),
            "global_batch": str(cfg.train.global_batch),
            "grad_accumulation": str(grad_accumulation(cfg, world_size)),
            "world_size": str(world_size),
            "peak_tflops": f"{self.peak_tflops:g}" if self.peak_tflops else "none",
            "ceiling_tflops": f"{self.ceiling_tflops:.4g}" if self.ceiling_tflops else "none",
            "device": device_name or "cpu",
            "config_fingerprint": cfg.fingerprint(),
            "version": mimae_scale.__version__,
        })

        # every optimiser step (host-side numbers only)
        self._steps = counter("mimae_steps", "Optimiser steps this process ran (skipped ones included).")
        self._images = counter("mimae_images", "Images this rank trained on.")
        self._step_seconds = Histogram(
            "mimae_step_duration_seconds", "Wall time of one optimiser step, data wait included.",
            LABELS, buckets=STEP_BUCKETS, registry=reg,
        ).labels(**self.labels)
        self._data_wait = counter("mimae_data_wait_seconds", "Time the step waited for the input pipeline.")
        self._last_step_time = gauge("mimae_last_step_timestamp_seconds", "Unix time the last step ended.")

        # log steps (values the trainer has synchronised for metrics.jsonl)
        self._images_per_s = gauge("mimae_images_per_second", "This rank's images/s since the previous log step.")
        self._tokens_per_s = gauge(
            "mimae_tokens_per_second",
            "This rank's transformer tokens/s (K views x (1+L encoder + 1+N decoder) per image).",
        )
        self._flops_per_s = gauge("mimae_model_flops_per_second", "This rank's model FLOP/s (docs/METRICS.md).")
        self._mfu = (
            gauge("mimae_model_flops_utilization_ratio",
                  "Model FLOP/s over the measured bf16 matmul ceiling in mimae_run_info (0-1).")
            if self.ceiling_tflops else None
        )
        self._mfu_datasheet = (
            gauge("mimae_model_flops_utilization_datasheet_ratio",
                  "Model FLOP/s over the data sheet's peak in mimae_run_info (0-1).")
            if self.peak_tflops else None
        )
        self._loss = Gauge("mimae_loss", "Training loss: total (the encoder's objective w_rec*rec + w_max*max + "
                           "w_min*min) and each term (q: the CLUB critic's own NLL).", (*LABELS, "term"), registry=reg)
        # no series on runs without L_min
        self._club = Gauge("mimae_club", "CLUB critic health: q_gain (nats/dim a z-blind Gaussian's NLL exceeds "
                           "q's; > 0: q uses z), logvar_mean, logvar_saturated (share at the logvar cap; 0 uncapped).",
                           (*LABELS, "stat"), registry=reg)
        self._loss_terms: dict[str, Any] = {}  # term -> labelled child, made at the first log (labels() is slow)
        self._lr = gauge("mimae_learning_rate", "Learning rate of the last step.")
        self._grad_norm = gauge("mimae_grad_norm", "Global gradient L2 norm before clipping.")
        # no series until the monitor first runs: a 0 before that would read as an accuracy
        self._knn_top1 = Gauge("mimae_knn_top1_ratio",
                               "Online kNN top-1 accuracy on data.val_shards at the last monitor run (0-1).",
                               LABELS, registry=reg)
        # fine-tuning and linear probing: top-1/top-5 on the held-out shards, of the model and of its EMA;
        # no series until the first evaluation
        self._val_accuracy = Gauge("mimae_val_accuracy_ratio",
                                   "Classifier accuracy on data.val_shards at the last evaluation (0-1); labels k "
                                   "(1: top-1, 5: top-5) and weights (model, ema).", (*LABELS, "k", "weights"),
                                   registry=reg)
        self._epoch = gauge("mimae_epoch", "Current epoch (0-based).")
        self._global_step = gauge("mimae_global_step", "Optimiser steps done in the run, resumed ones included.")
        self._progress = gauge("mimae_progress_ratio", "Fraction of the run's steps done (0-1).")

        # events
        self._skipped = counter("mimae_skipped_steps", "Steps not applied because some rank had a non-finite value.")
        self._nonfinite_loss = counter("mimae_nonfinite_loss_steps",
                                       "Skipped steps at which this rank's own loss was not finite.")
        self._rejected_samples = counter("mimae_rejected_samples", "Samples the input pipeline skipped as unusable.")
        self._ckpt_duration = Gauge(
            "mimae_checkpoint_save_duration_seconds", "Duration of the last checkpoint save.", LABELS, registry=reg
        )
        self._ckpt_time = Gauge(
            "mimae_checkpoint_last_complete_timestamp_seconds",
            "Unix time the last complete checkpoint was committed (its `latest` pointer moved).",
            LABELS, registry=reg,
        )
        self._set_aside = counter(
            "mimae_checkpoints_set_aside",
            "Checkpoints found damaged or unloadable at resume and renamed damaged_<tag> (rank 0 counts).",
        )
        # created per process only once CUDA is in use (absent on CPU runs)
        self._gpu_allocated = Gauge("mimae_gpu_memory_allocated_bytes", "Memory held by tensors.", LABELS,
                                    registry=reg)
        self._gpu_reserved = Gauge("mimae_gpu_memory_reserved_bytes", "Memory held by PyTorch's caching allocator.",
                                   LABELS, registry=reg)
        self._gpu_peak = Gauge("mimae_gpu_memory_max_allocated_bytes", "Peak memory held by tensors.", LABELS,
                               registry=reg)

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, total_steps: int) -> bool:
        """Serve /metrics (when ``metrics.enabled``); ``total_steps`` is the run's schedule length.

        Returns whether the exporter serves. A port that cannot be bound (another job on the node
        holds it) is logged as an error naming the setting, and training goes on without this
        rank's exporter: Prometheus shows the target down, and a requeued multi-day run is not
        lost to its monitoring.
        """
        self._total_steps = total_steps
        if not self.cfg.metrics.enabled:
            return False
        if self._server is None:
            address = self.cfg.metrics.bind_address
            try:
                self._server, self._thread = start_http_server(self.port, addr=address, registry=self.registry)
            except OSError as exc:
                log.error("metrics: cannot serve on %s:%d (metrics.port_base %d + local rank): %s; this rank trains "
                          "without its exporter", address, self.port, self.cfg.metrics.port_base, exc)
                return False
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    # -- updates ---------------------------------------------------------------------------------

    def on_step(self, timing: StepTiming) -> None:
        """Every optimiser step (a :class:`MetricsSink` call): host timings, DeepSpeed's skip flag."""
        images = _number("images", timing.images) // self.world_size  # timing.images is the global batch
        step_s = _number("step_s", timing.step_s)
        self._steps.inc()
        self._images.inc(images)
        self._step_seconds.observe(step_s)
        self._data_wait.inc(_number("data_wait_s", timing.data_wait_s))
        self._last_step_time.set(time.time())
        if not timing.applied:
            self._skipped.inc()
            if not timing.loss_finite:
                self._nonfinite_loss.inc()
        self._window_images += images
        self._window_seconds += step_s

    def on_log(self, record: dict[str, Any]) -> None:
        """A log step (a :class:`MetricsSink` call): the metrics.jsonl record (step, epoch, lr, loss,
        loss_<term>, grad_norm, skipped_samples), values the trainer has already synchronised.

        Throughput is this rank's images over the summed step time since the previous log step.
        """
        self.derived = {}
        if self._window_seconds > 0:
            images_per_s = self._window_images / self._window_seconds
            self._images_per_s.set(images_per_s)
            self._tokens_per_s.set(images_per_s * self._tokens_per_image)
            flops = images_per_s * self._flops_per_image
            self._flops_per_s.set(flops)
            self.derived["model_flops_per_s"] = flops
            if self._mfu is not None:
                self.derived["mfu"] = flops / (self.ceiling_tflops * 1e12)
                self._mfu.set(self.derived["mfu"])
            if self._mfu_datasheet is not None:
                self.derived["mfu_datasheet"] = flops / (self.peak_tflops * 1e12)
                self._mfu_datasheet.set(self.derived["mfu_datasheet"])
        self._window_images, self._window_seconds = 0, 0.0

        step = _number("step", record["step"])
        self._global_step.set(step)
        self._epoch.set(_number("epoch", record["epoch"]))
        if self._total_steps:
            self._progress.set(min(step / self._total_steps, 1.0))
        self._lr.set(_number("lr", record["lr"]))
        self._set_loss("total", _number("loss", record["loss"]))
        for term in LOSS_TERMS:
            key = f"loss_{term}"
            if key in record:
                self._set_loss(term, _number(key, record[key]))
        for name in CLUB_HEALTH:
            if name in record:
                self._club.labels(**self.labels, stat=name.removeprefix("club_")).set(_number(name, record[name]))
        if record.get("grad_norm") is not None:
            self._grad_norm.set(_number("grad_norm", record["grad_norm"]))
        self._set_rejected_samples(_number("skipped_samples", record["skipped_samples"]))
        if "knn_top1" in record:  # the online kNN monitor ran since the previous log step
            self._knn_top1.labels(**self.labels).set(_number("knn_top1", record["knn_top1"]))
        for key, (k, weights) in VAL_ACCURACY.items():  # a classifier was evaluated since the previous log step
            if key in record:
                self._val_accuracy.labels(**self.labels, k=k, weights=weights).set(_number(key, record[key]))
        if self._cuda and torch.cuda.is_initialized():
            # allocator bookkeeping on the host: no device synchronisation
            self._gpu_allocated.labels(**self.labels).set(torch.cuda.memory_allocated())
            self._gpu_reserved.labels(**self.labels).set(torch.cuda.memory_reserved())
            self._gpu_peak.labels(**self.labels).set(torch.cuda.max_memory_allocated())

    def _set_loss(self, term: str, value: float) -> None:
        child = self._loss_terms.get(term)
        if child is None:
            child = self._loss_terms[term] = self._loss.labels(**self.labels, term=term)
        child.set(value)

    def _set_rejected_samples(self, total: int) -> None:
        """The loader's running count of unusable samples, which only grows (restored on resume)."""
        if total < self._rejected:
            log.error("metrics: the loader's skipped_samples went down from %d to %d; counting from there",
                      self._rejected, total)
        else:
            self._rejected_samples.inc(total - self._rejected)
        self._rejected = total

    def on_checkpoint(self, duration_s: float, completed_unix_time: float) -> None:
        """A checkpoint became complete (every rank wrote it, `latest` moved)."""
        self._ckpt_duration.labels(**self.labels).set(_number("duration_s", duration_s))
        self._ckpt_time.labels(**self.labels).set(_number("completed_unix_time", completed_unix_time))

    def on_checkpoint_set_aside(self) -> None:
        """A damaged checkpoint was renamed out of the way at resume (the previous one is used)."""
        self._set_aside.inc()
