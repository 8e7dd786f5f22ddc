"""The global InfoNCE over two real ranks (gloo) against one rank with twice the rows."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimae_scale import losses
from mimae_scale.engine.distributed import free_port
from mimae_scale.model.mimae import info_nce_over_ranks
from mimae_scale.ops import REFERENCE


def _global_info_nce_rank(rank: int, world: int, port: int, z_all: torch.Tensor, valid: torch.Tensor,
                          k: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = z_all.shape[0] // world
        z = z_all[rank * rows:(rank + 1) * rows].clone().requires_grad_()
        loss = info_nce_over_ranks(z, valid[rank * rows:(rank + 1) * rows], k, 0.2, REFERENCE)
        loss.backward()
        # the engine averages gradients over ranks: that is what the parameters receive
        queue.put((rank, loss.item(), (z.grad / world).clone()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_info_nce_two_ranks_equals_one_rank_with_twice_the_rows(gen):
    """2 ranks x B images (padding on one rank) = 1 rank x 2B images: loss and gradients."""
    k, images, world = 4, 6, 2
    z_all = torch.randn(world * images * k, 16, generator=gen, dtype=torch.float64)
    valid = torch.ones(world * images, dtype=torch.bool)
    valid[-2:] = False  # the last rank's epoch-end padding
    rows_valid = valid.repeat_interleave(k)
    single = z_all.clone().requires_grad_()
    want = losses.info_nce(single, k, 0.2, rows_valid)
    want.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_global_info_nce_rank, args=(r, world, port, z_all, rows_valid, k, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict((r, (loss, grad)) for r, loss, grad in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rows = images * k
    for rank, (loss, grad) in results.items():
        assert loss == pytest.approx(want.item(), rel=1e-12)
        torch.testing.assert_close(grad, single.grad[rank * rows:(rank + 1) * rows], rtol=1e-10, atol=1e-12)
