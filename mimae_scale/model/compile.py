"""``engine.compile``: torch.compile of the transformer blocks, where nearly all FLOPs are.

Each timm ``Block`` is compiled in place (``nn.Module.compile``), so parameter names, state dicts,
checkpoints and DeepSpeed's view of the module are unchanged. The masking, gather/unshuffle and the
loss terms stay eager: they are data-dependent (Triton kernels on a GPU) and cheap. All blocks of
one width share one compiled graph (same code, same shapes): the encoder and the decoder each
compile once, forward and backward.
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of the encoder and decoder; returns how many."""
    blocks = [*model.blocks, *model.decoder_blocks]
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
