"""The communication model behind docs/SCALING.md: bytes, times and efficiency per ZeRO stage.

    python launch/scaling_model.py        # prints the tables of docs/SCALING.md

Parameter counts come from our model (built on the meta device, ``comm_check.parameter_numels``);
per-GPU compute from the measured reference throughputs of the H200 reference figures (docs/PERFORMANCE.md). Which
collectives each stage runs, and their sizes, are the ones ``launch/comm_check.py`` verifies
against DeepSpeed's communication logger. Everything else is an assumption stated here.
"""

from __future__ import annotations

from dataclasses import dataclass

from comm_check import parameter_counts

GLOBAL_BATCH = 4096
WORLDS = (8, 64, 512)
BF16 = 2

# Per-GPU bandwidth per direction, GB/s, and the share of it NCCL reaches on large messages (assumed).
LINKS = {"NVLink 4 (H100 SXM)": 450.0, "IB 400 Gb/s per GPU": 50.0, "IB 200 Gb/s per GPU": 25.0}
LINK_EFFICIENCY = 0.8
BACKWARD_SHARE = 2 / 3  # of a micro-batch's compute; the forward is the other third
RECOMMENDED_BUCKET = 50_000_000  # reduce_bucket_size / allgather_bucket_size, elements
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


@dataclass(frozen=True)
class Model:
    config: str
    label: str
    images_per_s: float  # one GPU, training step, measured (H200 reference) or derived
    source: str
    micro_cap: int  # the launcher's MIMAE_MAX_MICRO_BATCH


def step_flops_per_image(config: str, num_masks: int = 4, ratio: float = 0.75) -> float:
    """6 x parameters x tokens: the encoder sees K x (N(1-ratio) + cls) tokens, the decoder K x (N + 1)."""
    patches = {"mimae_vit_b16": 196, "mimae_vit_l16": 196, "mimae_vit_h14": 256}[config]
    parts = parameter_counts(config)
    encoder_tokens = num_masks * (patches * (1 - ratio) + 1)
    decoder_tokens = num_masks * (patches + 1)
    return 6 * (parts["encoder"] * encoder_tokens + (parts["decoder"] + parts["mi_heads"]) * decoder_tokens)


def models() -> list[Model]:
    vit_l = 590.0  # MI-MAE K=4 ViT-L/16, batch 128, H200, eager reference (H200 reference)
    vit_h = vit_l * step_flops_per_image("mimae_vit_l16") / step_flops_per_image("mimae_vit_h14")
    return [
        Model("mimae_vit_b16", "ViT-B/16", 1035.0, "measured (H200 reference, batch 256, H200 eager)", 64),
        Model("mimae_vit_l16", "ViT-L/16", vit_l, "measured (H200 reference, batch 128, H200 eager)", 64),
        Model("mimae_vit_h14", "ViT-H/14", vit_h, "ViT-L's rate x FLOP ratio (not measured)", 32),
        Model("mimae_vit_l16", "ViT-L/16 at goal", 900.0, "the H200 reference goal (faster compute hides less)", 64),
    ]


def micro_and_accumulation(world: int, cap: int) -> tuple[int, int]:
    per_gpu = GLOBAL_BATCH // world
    micro = max(d for d in range(1, min(cap, per_gpu) + 1) if per_gpu % d == 0)
    return micro, per_gpu // micro


def wire_bytes(stage: int, params: int, world: int, elem_bytes: int = BF16) -> dict[str, float]:
    """Bytes each GPU sends (and receives) per micro-batch / per optimiser step, ring algorithms.

    all_reduce moves 2(n-1)/n of the buffer, all_gather and reduce_scatter (n-1)/n of the full size.
    Returns {"per_micro": ..., "per_step": ...}: ZeRO 2 and 3 reduce gradients every micro-batch
    (each rank keeps only its gradient partition), ZeRO 0 and 1 only at the accumulation boundary.
    """
    size = params * elem_bytes
    ring = (world - 1) / world
    if stage == 0:
        return {"per_micro": 0.0, "per_step": 2 * ring * size}
    if stage == 1:
        return {"per_micro": 0.0, "per_step": 3 * ring * size}  # all-reduce grads + all-gather params
    if stage == 2:
        return {"per_micro": 2 * ring * size, "per_step": ring * size}
    return {"per_micro": 2 * ring * size, "per_step": 0.0}  # all-gather params + reduce-scatter grads


def exposed_seconds(stage: int, params: int, world: int, bandwidth: float, micro_s: float, accumulation: int,
                    overlap: bool, bucket: int) -> float:
    """Communication time not hidden behind compute, per optimiser step.

    With overlap, gradient buckets are reduced while the backward runs: all but the last bucket hide
    behind the backward (2/3 of a micro-batch), the last one is always exposed. ZeRO 3 prefetches
    parameters during the forward (1/3). The ZeRO 1/2 parameter all-gather after the optimiser step
    is exposed. Without overlap everything is exposed.
    """
    bw = bandwidth * 1e9 * LINK_EFFICIENCY
    ring = (world - 1) / world
    grad_reduce = (2 if stage in (0, 1, 2) else 1) * ring * params * BF16 / bw  # all-reduce, or reduce-scatter
    last_bucket = grad_reduce * min(1.0, bucket / params)

    def hidden(total: float, window: float, tail: float) -> float:
        return total if not overlap else tail + max(0.0, total - tail - window)

    if stage == 0:  # DeepSpeed all-reduces after the backward when ZeRO is off
        return grad_reduce
    params_gather = ring * params * BF16 / bw
    if stage == 1:
        return hidden(grad_reduce, BACKWARD_SHARE * micro_s, last_bucket) + params_gather
    if stage == 2:
        return accumulation * hidden(grad_reduce, BACKWARD_SHARE * micro_s, last_bucket) + params_gather
    first_bucket = params_gather * min(1.0, bucket / params)
    per_micro = (hidden(params_gather, (1 - BACKWARD_SHARE) * micro_s, first_bucket)
                 + hidden(grad_reduce, BACKWARD_SHARE * micro_s, last_bucket))
    return accumulation * per_micro


def efficiency(model: Model, stage: int, world: int, bandwidth: float, overlap: bool, bucket: int) -> float:
    params = parameter_counts(model.config)["total"]
    micro, accumulation = micro_and_accumulation(world, model.micro_cap)
    compute = GLOBAL_BATCH / world / model.images_per_s
    exposed = exposed_seconds(stage, params, world, bandwidth, micro / model.images_per_s, accumulation, overlap,
                              bucket)
    return compute / (compute + exposed)


def link_for(world: int) -> list[str]:
    return ["NVLink 4 (H100 SXM)"] if world <= 8 else ["IB 400 Gb/s per GPU", "IB 200 Gb/s per GPU"]


def main() -> None:
    ms = models()
    print("## Parameters and compute per GPU\n")
    print("| model | parameters | bf16 size | fp32 size | img/s per GPU | source | GFLOP per image (6·params·tokens) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for m in ms:
        p = parameter_counts(m.config)["total"]
        print(f"| {m.label} | {p / 1e6:.1f} M | {p * BF16 / 1e9:.3f} GB | {p * 4 / 1e9:.3f} GB | "
              f"{m.images_per_s:.0f} | {m.source} | {step_flops_per_image(m.config) / 1e9:.0f} |")

    print("\n## Bytes each GPU sends per optimiser step (bf16; fp32 doubles them) and their time on the wire\n")
    print(f"Global batch {GLOBAL_BATCH}; micro-batch × A accumulation steps per GPU; ring algorithms; time at "
          f"{LINK_EFFICIENCY:.0%} of the link, nothing overlapped. Cells: GB / seconds.\n")
    print("| model | GPUs | micro × A | compute s/step | link | ZeRO 0 | ZeRO 1 | ZeRO 2 | ZeRO 3 |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for m in ms:
        p = parameter_counts(m.config)["total"]
        for n in WORLDS:
            micro, acc = micro_and_accumulation(n, m.micro_cap)
            compute = GLOBAL_BATCH / n / m.images_per_s
            for link in link_for(n):
                cells = []
                for stage in range(4):
                    w = wire_bytes(stage, p, n)
                    total = w["per_step"] + acc * w["per_micro"]
                    cells.append(f"{total / 1e9:.2f} / {total / (LINKS[link] * 1e9 * LINK_EFFICIENCY):.3f}")
                print(f"| {m.label} | {n} | {micro} × {acc} | {compute:.3f} | {link} | " + " | ".join(cells) + " |")

    print("\n## Predicted scaling efficiency (compute / (compute + exposed communication))\n")
    print("DeepSpeed defaults: overlap_comm off (ZeRO 1/2), buckets 5e8 elements. Tuned: overlap_comm on, "
          "reduce_bucket_size = allgather_bucket_size = 5e7.\n")
    print("| model | GPUs | link | ZeRO 0 | ZeRO 1 default | ZeRO 1 tuned | ZeRO 2 tuned | ZeRO 3 tuned |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for m in ms:
        for n in WORLDS:
            for link in link_for(n):
                bw = LINKS[link]
                cells = [
                    efficiency(m, 0, n, bw, False, DEEPSPEED_DEFAULT_BUCKET),
                    efficiency(m, 1, n, bw, False, DEEPSPEED_DEFAULT_BUCKET),
                    efficiency(m, 1, n, bw, True, RECOMMENDED_BUCKET),
                    efficiency(m, 2, n, bw, True, RECOMMENDED_BUCKET),
                    efficiency(m, 3, n, bw, True, RECOMMENDED_BUCKET),
                ]
                print(f"| {m.label} | {n} | {link} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")


if __name__ == "__main__":
    main()
