"""What one training step communicates under each ZeRO stage: DeepSpeed's own count against ours.

    python launch/comm_check.py                 # 2 CPU processes (gloo), tiny config, ZeRO 0-3
    python launch/comm_check.py --sizes-only    # parameter counts of the shipped configs (meta device)

Each stage builds our MI-MAE and a real DeepSpeed engine with ``deepspeed.initialize``, turns on
DeepSpeed's communication logger (``comms_logger`` in the DeepSpeed config), takes two warm-up
steps, clears the log, takes ``--steps`` optimiser steps and reads ``deepspeed.comm.log_summary``.
The table printed beside it is :func:`predicted_bytes`, the accounting ``docs/SCALING.md`` uses
for ViT-B/L/H. Only DeepSpeed's collectives are logged; the InfoNCE all-gather of the projected
views goes through ``torch.distributed`` directly and is accounted for separately in SCALING.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

# ZeRO 3 keeps parameters of at most this many elements gathered (DeepSpeed default 1e5, which would
# keep every tensor of the tiny model); 1000 makes its weight matrices move as big models' do.
PERSISTENCE = 1000
WARMUP_STEPS = 2
# All-reduces of at most this many bytes are control scalars (gradient norm, overflow flags), not
# payload: counted apart, as their number depends on DeepSpeed's internals (clipping, optimiser wrapper).
SCALAR_BYTES = 64
SHIPPED = ("mimae_vit_b16", "mimae_vit_l16", "mimae_vit_h14", "mae_vit_b16")


def _meta_model(config: str, overrides: tuple[str, ...]) -> torch.nn.Module:
    from mimae_scale.config import load_config
    from mimae_scale.model import build_model

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        return build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)


def parameter_numels(config: str, overrides: tuple[str, ...] = ()) -> list[int]:
    return [p.numel() for p in _meta_model(config, overrides).parameters() if p.requires_grad]


def parameter_counts(config: str, overrides: tuple[str, ...] = ()) -> dict[str, int]:
    """Trainable parameters of our model, by part, built on the meta device (no memory, no time)."""
    model = _meta_model(config, overrides)
    parts = {"encoder": 0, "decoder": 0, "mi_heads": 0}
    for name, p in model.named_parameters():
        if name.startswith(("decoder", "mask_token")):
            part = "decoder"
        elif name.startswith(("projector", "approx")):  # InfoNCE projector, CLUB approximation network
            part = "mi_heads"
        else:
            part = "encoder"
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def predicted_bytes(stage: int, numels: list[int], world: int, elem_bytes: int) -> dict[str, int]:
    """Payload bytes per rank per optimiser step, logged as DeepSpeed (0.16+) implements each stage.

    ``numels``: the trainable parameter tensors' sizes. DeepSpeed's logger records the *input* tensor
    of each call: the whole bucket for all_reduce, this rank's shard for all_gather_into_tensor, the
    whole (padded) tensor for reduce_scatter_tensor. Control scalars are not payload (``SCALAR_BYTES``).
    - 0: the gradients all-reduced once per optimiser step.
    - 1, 2: the same all-reduce of the gradients (DeepSpeed's default ``use_multi_rank_bucket_allreduce``
      all-reduces each bucket and every rank keeps its partition; it is not a reduce-scatter), and
      after the step each rank's shard of the updated parameters all-gathered (one flat partition
      per parameter group, padded to a multiple of the world size).
    - 3 (DeepSpeed's defaults ``stage3_max_live_parameters`` = ``stage3_max_reuse_distance`` = 1e9,
      more than any of our models): every parameter all-gathered once per step (shards of
      ceil(numel/world)): the big ones before their forward, kept for their backward; the small
      "persistent" ones (<= ``stage3_param_persistence_threshold``) right after the optimiser step.
      Every gradient reduce-scattered (padded to a multiple of the world size). A model larger than
      those limits is gathered a second time for the backward.
    """
    total = sum(numels)
    if stage == 0:
        return {"all_reduce": total * elem_bytes}
    if stage in (1, 2):
        return {"all_reduce": total * elem_bytes, "all_gather_into_tensor": _ceil_div(total, world) * elem_bytes}
    shards = sum(_ceil_div(n, world) for n in numels)
    return {"all_gather_into_tensor": shards * elem_bytes, "reduce_scatter_tensor": shards * world * elem_bytes}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.comm as ds_comm

    from mimae_scale.config import grad_accumulation, load_config
    from mimae_scale.engine.ds_config import build_ds_config
    from mimae_scale.engine.optim import build_optimizer
    from mimae_scale.model import build_model

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for stage in args.stages:
        # the trainer's own DeepSpeed config and optimiser (train.global_batch = one micro-batch per rank)
        micro = load_config(args.config, args.overrides).train.micro_batch
        cfg = load_config(args.config, [*args.overrides, f"engine.zero_stage={stage}",
                                        f"train.global_batch={micro * world}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.mask, cfg.mi, cfg.loss, kernels=cfg.kernels.enabled)
        ds_config = build_ds_config(cfg, grad_accumulation(cfg, world), "fp32")  # gloo on CPUs: fp32
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE
        ds_config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
        optimizer = build_optimizer(model, cfg, wrapped_by_deepspeed=stage > 0, device=torch.device("cpu"))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        images = torch.randn(micro, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
        for step in range(WARMUP_STEPS + args.steps):
            if step == WARMUP_STEPS:  # set-up traffic (ZeRO 3 records and checks its fetch order) is over
                ds_comm.barrier()
                ds_comm.comm.comms_logger.reset_data()
            loss = engine(images, generator=torch.Generator().manual_seed(step)).loss
            engine.backward(loss)
            engine.step()
        ds_comm.comm.comms_logger.enabled = False  # log_summary's own barrier is not a step's traffic
        summary = ds_comm.log_summary(return_dict=True)
        ds_comm.comm.comms_logger.reset_data()
        ds_comm.comm.comms_logger.enabled = True
        if rank == 0:
            per_op = {}
            for op, sizes in summary["summary"].items():
                counts = [0, 0, 0, 0]  # payload calls, payload bytes, scalar calls, scalar bytes
                for size, rec in sizes.items():
                    kind = 2 if op == "all_reduce" and int(size) <= SCALAR_BYTES else 0
                    counts[kind] += rec["count"]
                    counts[kind + 1] += rec["count"] * rec["msg_size_bytes"]
                per_op[op] = tuple(c / args.steps for c in counts)
            results.put((stage, per_op))
        del engine, optimizer, model
    ds_comm.barrier()


def measure(args: argparse.Namespace) -> list[tuple[int, dict[str, tuple[float, float]]]]:
    from mimae_scale.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_worker, args=(args.world, free_port(), args, results), nprocs=args.world,
                       start_method="spawn", join=True)
    return sorted((results.get() for _ in args.stages), key=lambda r: r[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--sizes-only", action="store_true", help="print the shipped configs' parameter counts")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    from mimae_scale.exit_codes import EXIT_ERROR, EXIT_OK

    print("| config | encoder | decoder (+ mask token) | MI heads | total |")
    print("|---|---:|---:|---:|---:|")
    for name in (*SHIPPED, args.config) if args.sizes_only else (args.config,):
        parts = parameter_counts(name, tuple(args.overrides) if name == args.config else ())
        print(f"| {name} | {parts['encoder']:,} | {parts['decoder']:,} | {parts['mi_heads']:,} | {parts['total']:,} |")
    if args.sizes_only:
        return EXIT_OK

    numels = parameter_numels(args.config, tuple(args.overrides))
    params = sum(numels)
    print(f"\n{args.world} processes (gloo, fp32), {args.config}: {params:,} parameters; bytes per rank per optimiser "
          "step as DeepSpeed's comms logger records them (message = the call's input tensor)\n")
    print("| ZeRO stage | collective | payload calls/step | logged bytes/step | predicted bytes/step | "
          "logged/predicted | scalar calls/step (bytes) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ok = True
    for stage, per_op in measure(args):
        predicted = predicted_bytes(stage, numels, args.world, 4)
        for op in sorted(set(per_op) | set(predicted)):
            calls, logged, scalar_calls, scalar_bytes = per_op.get(op, (0.0, 0.0, 0.0, 0.0))
            want = predicted.get(op, 0)
            ratio = logged / want if want else float("inf") if logged else 1.0
            ok &= abs(ratio - 1.0) < 0.01
            print(f"| {stage} | {op} | {calls:g} | {logged:,.0f} | {want:,} | {ratio:.4f} | "
                  f"{scalar_calls:g} ({scalar_bytes:g}) |")
    print(f"\n{'all collectives within 1% of the prediction' if ok else 'MISMATCH against the prediction'}")
    return EXIT_OK if ok else EXIT_ERROR


if __name__ == "__main__":
    # Run as a script, Python puts launch/ first on sys.path; nothing there shadows a library, but the
    # repository root must be importable when the package is not installed.
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
