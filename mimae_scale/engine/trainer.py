"""The training loop: a DeepSpeed engine around the task's model (MI-MAE pretraining, or a ViT
classifier fine-tuned or probed: mimae_scale.engine.tasks), checkpoints, signals and non-finite steps.

Host synchronisation happens only at control points (every ``train.log_every`` steps, and the
last step): one small all-reduce carries the loss sums for the log line, the stop request of any
rank and rank 0's "a timed checkpoint is due", so every rank takes the same decisions. DeepSpeed's
optimiser wrappers read one overflow flag on the host per optimiser step (that is how they skip a
non-finite step on every rank); nothing else in ``train_step`` waits for the device.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mimae_scale.config import Config, dump_yaml, grad_accumulation
from mimae_scale.data import TrainLoader, build_train_loader
from mimae_scale.engine import faults
from mimae_scale.engine.checkpoint import (
    CONFIG_KEY,
    CheckpointManager,
    CheckpointMismatch,
    Complete,
    RngStreams,
    RunConfig,
    TrainState,
    check_resumable,
    load_universal,
    rank_file,
)
from mimae_scale.engine.distributed import DistEnv, init_process_group, pick_device
from mimae_scale.engine.ds_config import build_ds_config, write_ds_config
from mimae_scale.engine.optim import LRSchedule, build_optimizer, peak_lr
from mimae_scale.engine.reporting import ConsoleSink, JsonlSink, MetricsSink, StepTiming
from mimae_scale.engine.signals import StopRequest
from mimae_scale.engine.tasks import build_task
from mimae_scale.engine.tracking import trackers
from mimae_scale.exit_codes import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from mimae_scale.metrics import LOSS_TERMS, TrainingMetrics
from mimae_scale.precision import autocast, deepspeed_bf16, input_dtype, resolve_precision

log = logging.getLogger("mimae_scale.engine")


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean over this rank's micro-batches, detached, on the device
    terms: dict[str, torch.Tensor]
    applied: bool  # DeepSpeed took the optimiser step (False: non-finite on some rank, skipped everywhere)
    lr: float


@dataclass
class Interval:
    """Sums since the last control point, kept on the device so that no step waits for it."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    applied_steps: int = 0
    steps: int = 0
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def mask_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The masks of (rank, step, micro-batch) depend on nothing else, so a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)


def configure_determinism(cfg: Config) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        # Filling every new tensor with NaN is a debugging aid, not part of determinism; DeepSpeed's
        # multi-GB communication buckets made it cost seconds per step.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, stop: StopRequest) -> None:
        self.cfg = cfg
        self.env = env
        self.stop = stop
        self.run_dir = Path(cfg.run_dir)
        self.device = pick_device(env)
        self.precision = resolve_precision(cfg, self.device)
        self.accumulation = grad_accumulation(cfg, env.world_size)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", env.rank, cfg.checkpoint.keep_last,
                                      on_set_aside=lambda tag: self.metrics.on_checkpoint_set_aside())
        self.sinks: list[MetricsSink] = []  # the metrics exporter appends itself here
        self.step = 0  # optimiser steps taken (skipped ones included: their data was consumed)
        self.consecutive_skips = 0
        self.dropped_micro_batches = 0
        self.nan_steps = faults.nan_loss_steps(env.rank)
        self.pending_eval: dict[str, float | int] = {}  # the task's evaluation, added to the next log record

    # -- set-up --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step. Raises CheckpointMismatch / ConfigError before any work."""
        import deepspeed

        cfg, env = self.cfg, self.env
        configure_determinism(cfg)
        newest = self.ckpt.newest()
        if newest is not None:  # refuse another method before anything is built
            check_resumable(newest, cfg, env.world_size, self.ckpt.root)
        init_process_group(env, self.device)

        self.loader: TrainLoader = build_train_loader(cfg, env.rank, env.world_size, self.device)
        self.steps_per_epoch = self.loader.steps_per_epoch // self.accumulation
        if self.steps_per_epoch < 1:
            raise RuntimeError(f"the loader gives {self.loader.steps_per_epoch} micro-batches per epoch, fewer "
                               f"than one optimiser step needs ({self.accumulation})")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.schedule = LRSchedule.from_config(cfg, self.steps_per_epoch)
        self.metrics = TrainingMetrics(cfg, env.rank, env.local_rank, env.world_size)  # this rank's exporter
        self.metrics.start(self.total_steps)
        self.sinks.append(self.metrics)

        self.task = build_task(cfg, env, self.device, fresh=newest is None)  # same initial weights on every rank
        model = self.task.model
        # DeepSpeed checks non-finite gradients itself whenever it wraps the optimiser (ZeRO 1-3, bf16)
        wrapped = cfg.engine.zero_stage > 0 or deepspeed_bf16(self.precision)
        optimizer = build_optimizer(model, cfg, wrapped_by_deepspeed=wrapped, device=self.device)
        self.ds_config = build_ds_config(cfg, self.accumulation, self.precision)
        # Another number of ranks or ZeRO stage than the checkpoint's: load it through DeepSpeed's
        # universal format
        self.relayout = newest is not None and (newest.world_size, newest.zero_stage) != (env.world_size,
                                                                                          cfg.engine.zero_stage)
        self.regroup = newest is not None and newest.world_size != env.world_size  # data positions regrouped
        if self.relayout:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.input_dtype = input_dtype(self.precision)

        random.seed(cfg.seed + env.rank)
        np.random.seed(cfg.seed + env.rank)
        torch.manual_seed(cfg.seed + env.rank)
        # What a checkpoint holds beside DeepSpeed's engine; replicated parts are saved once.
        self.state = TrainState()
        self.state.register(CONFIG_KEY, RunConfig(cfg), replicated=True)
        self.state.register("trainer", self, replicated=True)
        self.task.register(self.state)
        self.state.register("loader", self.loader, replicated=False)
        self.state.register("rng", RngStreams(self.device), replicated=False)
        self.ckpt.resume(self._load)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            write_ds_config(self.ds_config, self.run_dir / "ds_config.json")
            self.sinks += [JsonlSink(self.run_dir / "metrics.jsonl"), ConsoleSink(self.last_step)]
            self.sinks += trackers(cfg, self.run_dir, self.step, self.engine.module, self.device, self.metrics)
        self._log_settings()
        self.last_save = time.monotonic()

    def _load(self, chosen: Complete) -> None:
        """Load ``chosen`` into the engine and the TrainState (raises when it cannot)."""
        tag_dir = self.ckpt.root / chosen.tag
        if self.relayout:  # DeepSpeed's own loader re-partitions the universal copy for this layout
            path, client = load_universal(self.engine, self.ckpt.universal(chosen))
        else:
            path, client = self.engine.load_checkpoint(str(self.ckpt.root), tag=chosen.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        mine_file = tag_dir / rank_file(self.env.rank)  # absent for ranks the checkpoint did not have
        mine = torch.load(mine_file, map_location="cpu", weights_only=True) if mine_file.exists() else None
        self.state.load(client, mine, tag_dir, skip=("loader",) if self.regroup else ())
        if self.regroup:
            self._continue_epoch(chosen, tag_dir)
        if chosen.zero_stage != self.cfg.engine.zero_stage:
            log.warning("ZeRO stage changed (%d -> %d): weights and optimiser state re-partitioned through the "
                        "universal checkpoint", chosen.zero_stage, self.cfg.engine.zero_stage)
        log.info("resumed from %s: step %d, epoch %d, %d images seen", tag_dir, self.step,
                 self.step // self.steps_per_epoch, self.step * self.cfg.train.global_batch)

    def _continue_epoch(self, chosen: Complete, tag_dir: Path) -> None:
        """On another layout the loader positions of the old ranks do not apply one to one: every new
        rank reads all of them, and the new layout goes on with the interrupted epoch's unused samples
        in the steps that epoch had left (the step, the schedule and the RNG streams go on)."""
        old = [torch.load(tag_dir / rank_file(r), map_location="cpu", weights_only=True)["loader"]
               for r in range(chosen.world_size)]
        steps_left = (old[0]["pass_batches"] - old[0]["batch_in_epoch"]) // self.accumulation_at_load
        try:
            where = self.loader.continue_epoch(old, steps_left, self.accumulation)
        except ValueError as exc:  # e.g. another shard set: this run does not fit the sound checkpoint
            raise CheckpointMismatch(f"{tag_dir}: loader: {exc}") from None
        log.warning("layout changed (%d ranks -> %d) at step %d: epoch %d goes on with its %d samples not yet used "
                    "(%d used before the stop; %d read twice) in %d steps", chosen.world_size, self.env.world_size,
                    self.step, where["epoch"], where["left"], where["used"], where["repeated"],
                    self.loader.batches_left // self.accumulation)

    def state_dict(self) -> dict[str, int]:
        """The trainer's counters (a replicated TrainState component); epoch and samples for readers."""
        return {"step": self.step, "consecutive_skips": self.consecutive_skips, "accumulation": self.accumulation,
                "epoch": self.step // self.steps_per_epoch, "samples": self.step * self.cfg.train.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.accumulation_at_load = int(state["accumulation"])  # the old layout's batches per step

    def _log_settings(self) -> None:
        if not self.env.is_main:
            return
        env = self.env
        log.info("configuration (resolved):\n%s", dump_yaml(self.cfg).rstrip())
        log.info(
            "launcher %s, world size %d, device %s, precision %s, ZeRO stage %d | global batch %d = micro-batch %d "
            "x %d ranks x %d accumulation | %d steps per epoch (loader: %d micro-batches), %d epochs = %d steps, "
            "this run stops at step %d | lr peak %.3e (base %.3e x %d / 256), warm-up %d steps, cosine to %.3e | "
            "weight decay %.3g, betas %s, clipping %s | deterministic %s | checkpoints every %d steps or %.1f "
            "min, keep %d, in %s",
            env.launcher, env.world_size, self.device, self.precision, self.cfg.engine.zero_stage,
            self.cfg.train.global_batch, self.cfg.train.micro_batch, env.world_size, self.accumulation,
            self.steps_per_epoch, self.loader.steps_per_epoch, self.cfg.train.epochs, self.total_steps,
            self.last_step, peak_lr(self.cfg), self.cfg.optim.base_lr, self.cfg.train.global_batch,
            self.schedule.warmup_steps, self.cfg.optim.min_lr, self.cfg.optim.weight_decay, self.cfg.optim.betas,
            self.cfg.optim.clip_grad, self.cfg.deterministic, self.cfg.checkpoint.every_steps,
            self.cfg.checkpoint.every_minutes, self.cfg.checkpoint.keep_last, self.ckpt.root,
        )
        extra = self.loader.steps_per_epoch % self.accumulation
        if extra:
            log.warning("each epoch leaves %d of the loader's micro-batches unused (not a multiple of %d)",
                        extra, self.accumulation)
        if self.nan_steps:
            log.warning("fault injection: NaN loss at steps %s on rank %d", sorted(self.nan_steps), env.rank)

    # -- one optimiser step ----------------------------------------------------------------------

    def train_step(self, micro_batches: Iterator[dict[str, torch.Tensor]]) -> StepOutput:
        """Forward and backward on each of this rank's micro-batches, then DeepSpeed's optimiser step.

        DeepSpeed averages the gradients over micro-batches and ranks and steps the optimiser at the
        accumulation boundary. If any rank's gradients are not finite, it skips the step on every
        rank (``engine.was_step_applied()`` is False) and counts it in ``engine.skipped_steps``.
        """
        number = self.step + 1
        lr = self.schedule(self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise lr decay (fine-tuning)
        loss_sum = torch.zeros((), device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(micro_batches):
            generator = torch.Generator(self.device).manual_seed(mask_seed(self.cfg.seed, self.env.rank, number, micro))
            images = batch["images"].to(self.device, self.input_dtype, non_blocking=True)  # loaders pin host batches
            with autocast(self.precision, self.device):
                out = self.task.forward(self.engine, batch, images, generator, self.step, self.steps_per_epoch)
            loss = out.loss * float("nan") if number in self.nan_steps else out.loss
            # A non-finite loss must give non-finite gradients (DeepSpeed's skip test looks at those),
            # even when a term's gradient happens to stay finite. x1.0 is exact, so finite steps are unchanged.
            loss = loss * torch.where(torch.isfinite(loss), 1.0, float("nan")).detach()
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
            for name, value in out.terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.detach().float()
        self.step = number
        if self.engine.was_step_applied():
            self.task.after_step(self.engine, number)  # the weight EMA
        scale = 1.0 / self.accumulation
        return StepOutput(loss=loss_sum * scale, terms={k: v * scale for k, v in term_sums.items()},
                          applied=self.engine.was_step_applied(), lr=lr)

    # -- the loop ------------------------------------------------------------------------------

    def _micro_batches(self, epoch_iter: Iterator[dict], interval: Interval) -> Iterator[dict]:
        for _ in range(self.accumulation):
            waited = time.perf_counter()
            batch = next(epoch_iter)
            interval.data_wait_s += time.perf_counter() - waited
            yield batch

    def run(self) -> int:
        """Train until the schedule (or train.max_steps) ends; returns the exit status."""
        try:
            return self._train()
        finally:
            self.metrics.close()

    def _train(self) -> int:
        if self.step >= self.last_step:
            log.info("the checkpoint is at step %d, the run ends at step %d: nothing to do", self.step, self.last_step)
            return EXIT_OK
        interval = self._new_interval()
        epoch_iter: Iterator[dict] | None = None
        started_at = self.step
        wall = time.perf_counter()
        while self.step < self.last_step:
            if epoch_iter is None:
                epoch_iter = iter(self.loader)  # after a resume: the rest of the interrupted epoch
            step_started = time.perf_counter()
            wait_before = interval.data_wait_s
            out = self.train_step(self._micro_batches(epoch_iter, interval))
            if self.loader.batches_left < self.accumulation:  # epoch done: let the loader move to the next one
                self.dropped_micro_batches += sum(1 for _ in epoch_iter)
                epoch_iter = None
                self._evaluate(self.loader.epoch, at_epoch_end=True)  # the loader has moved on to the next epoch
            elif self.step == self.last_step:  # train.max_steps ends the run inside an epoch
                self._evaluate(self.step // self.steps_per_epoch, at_epoch_end=False)
            self._account(interval, out)
            timing = StepTiming(self.step, self.cfg.train.global_batch, time.perf_counter() - step_started,
                                interval.data_wait_s - wait_before, out.applied, self.engine.skipped_steps,
                                loss_finite=out.applied or math.isfinite(out.loss.item()))
            for sink in self.sinks:
                sink.on_step(timing)

            if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
                newest = self.ckpt.newest()
                log.error(
                    "stopping: %d consecutive optimiser steps (%d-%d) had a non-finite loss or gradient norm on at "
                    "least one rank and were skipped on all (train.max_consecutive_skips=%d). Nothing was written; "
                    "the last complete checkpoint is %s.", self.consecutive_skips,
                    self.step - self.consecutive_skips + 1, self.step, self.cfg.train.max_consecutive_skips,
                    self.ckpt.root / newest.tag if newest else "none (no checkpoint was written yet)",
                )
                return EXIT_NONFINITE

            stop, timed_save = False, False
            if self.step % self.cfg.train.log_every == 0 or self.step == self.last_step:
                stop, timed_save = self._control_point(interval, out)
                interval = self._new_interval()
            if stop or timed_save or self.step % self.cfg.checkpoint.every_steps == 0 or self.step == self.last_step:
                self.save()
            if stop and self.step < self.last_step:
                log.warning("stopped by %s after step %d; checkpoint written, exiting with %d (requeue)",
                            self.stop.name if self.stop.requested else "another rank's signal", self.step,
                            EXIT_REQUEUE)
                return EXIT_REQUEUE
        if self.env.is_main:
            self._summary(started_at, time.perf_counter() - wall)
        return EXIT_OK

    def _evaluate(self, epochs_done: int, at_epoch_end: bool) -> None:
        """The task's evaluation when due (kNN monitor; classifier top-1), on every rank, for the next log record."""
        final = self.step >= self.last_step
        self.task.synchronise(self.engine)
        self.pending_eval = self.task.evaluate(self.engine, epochs_done, at_epoch_end, final) or self.pending_eval

    def _new_interval(self) -> Interval:
        return Interval(loss=torch.zeros((), device=self.device))

    def _account(self, interval: Interval, out: StepOutput) -> None:
        interval.steps += 1
        if out.applied:
            self.consecutive_skips = 0
            interval.applied_steps += 1
            interval.loss += out.loss
            for name, value in out.terms.items():
                interval.terms[name] = interval.terms.get(name, 0.0) + value
        else:
            self.consecutive_skips += 1
            log.warning("step %d skipped on every rank: non-finite loss or gradient norm (this rank's loss %s; "
                        "%d in a row, DeepSpeed skipped_steps %d)", self.step, out.loss.item(),
                        self.consecutive_skips, self.engine.skipped_steps)

    def _control_point(self, interval: Interval, out: StepOutput) -> tuple[bool, bool]:
        """The one synchronisation of a log interval: agree on stopping and timed saves, and log."""
        names = sorted(out.terms)
        timed = self.env.is_main and time.monotonic() - self.last_save >= 60 * self.cfg.checkpoint.every_minutes
        values = [interval.loss, *(torch.as_tensor(interval.terms.get(n, 0.0), device=self.device) for n in names)]
        flags = [interval.applied_steps, float(self.stop.requested), float(timed)]
        packed = torch.stack([v.float().reshape(()) for v in values]).to(self.device)
        packed = torch.cat([packed, torch.tensor(flags, device=self.device)])
        dist.all_reduce(packed)  # sums: loss sums over ranks, applied-step counts, any rank's flags
        totals = packed.tolist()
        applied = totals[len(values)]
        mean = [v / applied if applied else math.nan for v in totals[: len(values)]]
        elapsed = time.perf_counter() - interval.started
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "samples": self.step * self.cfg.train.global_batch,
            "lr": out.lr,
            "loss": mean[0],
            **{(f"loss_{n}" if n in LOSS_TERMS else n): v for n, v in zip(names, mean[1:], strict=True)},
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "images_per_s": interval.steps * self.cfg.train.global_batch / elapsed,
            "step_s": elapsed / interval.steps,
            "data_wait_s": interval.data_wait_s / interval.steps,
            "skipped_steps": self.engine.skipped_steps,
            "skipped_samples": getattr(self.loader, "skipped_samples", 0),  # unusable samples the loader met
            **self.pending_eval,  # knn_* after a kNN monitor run; val_* (top-1 ...) after a classifier's
        }
        self.pending_eval = {}
        for sink in self.sinks:
            sink.on_log(record)
        return totals[len(values) + 1] > 0, totals[len(values) + 2] > 0

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        cfg = self.cfg
        marker = {"world_size": self.env.world_size, "zero_stage": cfg.engine.zero_stage,
                  "fingerprint": cfg.fingerprint(), "method": cfg.method(),
                  "samples": self.step * cfg.train.global_batch,
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        started = time.perf_counter()
        self.task.synchronise(self.engine)  # every rank's buffers equal what the checkpoint holds
        self.ckpt.save(self.engine, self.step, self.state, marker)
        self.metrics.on_checkpoint(time.perf_counter() - started, time.time())
        self.last_save = time.monotonic()

    def _summary(self, started_at: int, seconds: float) -> None:
        newest = self.ckpt.newest()
        log.info(
            "done: steps %d-%d (%d epochs of %d) in %.1f s on %d ranks; skipped steps %d; dropped micro-batches %d.\n"
            "  run directory  %s\n  metrics        %s\n  log            %s\n  checkpoint     %s (latest of %d kept)",
            started_at + 1, self.step, self.step // self.steps_per_epoch, self.cfg.train.epochs, seconds,
            self.env.world_size, self.engine.skipped_steps, self.dropped_micro_batches, self.run_dir.resolve(),
            (self.run_dir / "metrics.jsonl").resolve(), (self.run_dir / "train.log").resolve(),
            (self.ckpt.root / newest.tag).resolve() if newest else "none", len(self.ckpt.complete()),
        )
