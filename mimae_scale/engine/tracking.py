"""Run tracking for comparing runs side by side: TensorBoard event files and Weights & Biases, rank 0.

A :class:`TrackerSink` is one more :class:`~mimae_scale.engine.reporting.MetricsSink`: its ``on_log``
gets the very record that becomes a line of ``metrics.jsonl`` and logs each of its numbers under a
grouped tag (``loss/``, ``club/``, ``optim/``, ``speed/``, ``eval/``, ``progress/``), plus what the
Prometheus exporter derived from the same log step (model FLOP/s, MFU: read from it, not computed
again). ``metrics.jsonl`` stays the one record; the trackers are views of it. At start the resolved
config goes in as text (TensorBoard) or as the run's config (W&B); every
``tracking.image_every_steps`` steps, mimae-viz's reconstruction grid of a fixed batch as an image.

Open with ``tensorboard --logdir <run_dir>``; W&B honours its own environment (``WANDB_MODE=offline``
writes ``<run_dir>/wandb/offline-run-*`` without the network, ``wandb sync`` uploads it later).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimae_scale.config import Config, dump_yaml
from mimae_scale.engine.checkpoint import rng_state, set_rng_state
from mimae_scale.engine.reporting import StepTiming

log = logging.getLogger("mimae_scale.engine")

GRID_IMAGES = 4  # rows of the reconstruction grid: enough to judge, one small forward
WANDB_ID_FILE = "wandb_run_id"  # in the run directory: a resumed run goes on in the same W&B run
# record key -> tracker tag; keys not listed go under their prefix's group (loss_*, club_*, knn_*) or other/
TAGS = {"loss": "loss/total", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
        "images_per_s": "speed/images_per_s", "step_s": "speed/step_s", "data_wait_s": "speed/data_wait_s",
        "model_flops_per_s": "speed/model_flops_per_s", "mfu": "speed/mfu", "mfu_datasheet": "speed/mfu_datasheet",
        "epoch": "progress/epoch", "samples": "progress/samples", "skipped_steps": "progress/skipped_steps",
        "skipped_samples": "progress/skipped_samples"}
PREFIXES = {"loss_": "loss/", "club_": "club/", "knn_": "eval/knn_", "val_": "eval/val_", "ema_val_": "eval/ema_val_"}


def tag_of(key: str) -> str:
    if key in TAGS:
        return TAGS[key]
    for prefix, group in PREFIXES.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return f"other/{key}"


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of a log record's finite numbers (``step`` is the x axis, not a series)."""
    return {tag_of(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@contextlib.contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's generators as they were before (what a checkpoint saves): the
    grid's loader and forward must not shift the training's random streams."""
    saved = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(saved, device)


class ReconstructionGrid:
    """mimae-viz's picture (original, each mask's visible patches, each reconstruction) of one fixed
    batch, drawn with the model's current weights. The masks come from a fixed seed, and the global
    RNG streams are left as they were, so training (and an exact resume) does not notice."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, cfg: Config, device: torch.device) -> None:
        self.model, self.images, self.cfg, self.device = model, images, cfg, device

    def __call__(self):
        from mimae_scale.evaluation.viz import reconstruction_panels, render_grid

        with _rng_untouched(self.device):
            generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
            panels = reconstruction_panels(self.model, self.images, self.cfg.data.mean, self.cfg.data.std, generator)
        return render_grid(panels)


def fixed_batch(cfg: Config, device: torch.device, count: int = GRID_IMAGES) -> torch.Tensor:
    """The grid's images: the first of data.val_shards (the deterministic eval pipeline), else of the
    training shards through the same pipeline, else (synthetic data) the first synthetic batch."""
    from mimae_scale.evaluation.viz import first_images

    with _rng_untouched(device):
        shards = cfg.data.val_shards or (cfg.data.train_shards if cfg.data.backend != "synthetic" else "")
        if shards:
            from mimae_scale.evaluation.cli import eval_loader

            return first_images(eval_loader(cfg, shards, device, count), count)
        from mimae_scale.data.synthetic import SyntheticLoader

        return first_images(iter(SyntheticLoader(cfg, 0, 1, device)), count).float()


class TrackerSink:
    """TensorBoard and/or W&B, fed from the log records (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int,
                 derived: Callable[[], dict[str, float]] = dict,
                 grid: Callable[[], Any] | None = None) -> None:
        self.derived, self.grid, self.every = derived, grid, cfg.tracking.image_every_steps
        self._image_period: int | None = None  # step // every of the last image
        self.tb = self.wandb_run = None
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run repeats the steps after its checkpoint; TensorBoard then drops
            # the earlier events from there on, so each step shows once (as metrics.jsonl's last record)
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            text = "\n".join("    " + line for line in dump_yaml(cfg).splitlines())  # markdown: a code block
            self.tb.add_text("config", text, global_step=start_step)
            self.tb.flush()
        if cfg.tracking.wandb:
            self.wandb_run = _start_wandb(cfg, run_dir)
        atexit.register(self.close)  # the trainer has no close for sinks; at exit both are flushed

    def on_step(self, timing: StepTiming) -> None:
        pass

    def on_log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = scalars_of({**record, **self.derived()})
        image = self._image(step)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            if image is not None:
                self.tb.add_image("reconstruction", np.asarray(image), step, dataformats="HWC")
            self.tb.flush()  # log steps are rare: a crash loses nothing
        if self.wandb_run is not None:
            import wandb

            extra = {"reconstruction": wandb.Image(image)} if image is not None else {}
            self.wandb_run.log({**scalars, **extra}, step=step)

    def _image(self, step: int):
        """The grid at the first log step, then at the first log step of each image_every_steps period."""
        if self.grid is None or not self.every or step // self.every == self._image_period:
            return None
        self._image_period = step // self.every
        return self.grid()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(cfg: Config, run_dir: Path):
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    run = wandb.init(project=cfg.tracking.wandb_project, dir=str(run_dir), name=run_dir.resolve().name, id=run_id,
                     resume="allow", config=cfg.to_dict())
    id_file.write_text(run_id + "\n")
    return run


def trackers(cfg: Config, run_dir: Path, start_step: int, model: torch.nn.Module, device: torch.device,
             exporter: Any) -> list[TrackerSink]:
    """Rank 0's tracker sink, or none when tracking is off; ``exporter``: the Prometheus exporter
    (:class:`~mimae_scale.metrics.TrainingMetrics`), whose ``derived`` values of each log step are
    logged with the record. The grid's forward runs on rank 0 alone,
    which ZeRO 3 cannot do (its parameters are partitioned and gathered collectively): no images there."""
    t = cfg.tracking
    if not (t.tensorboard or t.wandb):
        return []
    grid = None
    if t.image_every_steps and cfg.task != "pretrain":
        log.info("tracking: no reconstruction images for task %s (a classifier reconstructs nothing)", cfg.task)
    elif t.image_every_steps and cfg.engine.zero_stage == 3:
        log.warning("tracking: no reconstruction images under ZeRO 3 (rank 0 alone cannot run the forward); "
                    "the scalars and the config are logged")
    elif t.image_every_steps:
        grid = ReconstructionGrid(model, fixed_batch(cfg, device), cfg, device)
    sink = TrackerSink(cfg, run_dir, start_step, lambda: exporter.derived, grid)
    log.info("tracking: %s", ", ".join(
        ([f"TensorBoard in {run_dir / 'tensorboard'}"] if t.tensorboard else [])
        + ([f"W&B project {t.wandb_project} (run {sink.wandb_run.id})"] if t.wandb else [])))
    return [sink]
