import pytest
import torch

from mimae_scale.masking import gather_visible, make_masks, num_visible, unshuffle_with_mask_tokens


@pytest.mark.parametrize(
    ("n", "k", "ratio"), [(196, 4, 0.75), (64, 4, 0.75), (256, 4, 0.75), (49, 2, 0.6), (100, 3, 0.7)]
)
def test_orthogonal_masks_are_disjoint_and_consistent(gen, n, k, ratio):
    b = 5
    ids_keep, ids_restore, mask = make_masks(b, n, k, ratio, "orthogonal", generator=gen)
    keep = num_visible(n, ratio)
    assert ids_keep.shape == (b * k, keep) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (b * k, n) and ids_restore.dtype == torch.int64
    assert mask.shape == (b * k, n) and mask.dtype == torch.float32
    for i in range(b):
        seen = torch.cat([ids_keep[i * k + j] for j in range(k)])
        assert seen.unique().numel() == k * keep  # visible sets are disjoint
        if k * keep == n:  # ... and partition the grid
            assert sorted(seen.tolist()) == list(range(n))
    for r in range(b * k):
        visible = set(ids_keep[r].tolist())
        assert mask[r].sum().item() == n - keep
        assert {p for p in range(n) if mask[r, p] == 0} == visible  # mask is the complement
        assert sorted(ids_restore[r].tolist()) == list(range(n))  # a permutation
        for p in range(n):  # ids_restore says where the patch sits; < L exactly when visible
            pos = ids_restore[r, p].item()
            assert (pos < keep) == (p in visible)
            if pos < keep:
                assert ids_keep[r, pos].item() == p


def test_masks_complement_to_full_grid_with_k_masks(gen):
    _, _, mask = make_masks(3, 196, 4, 0.75, generator=gen)
    # every patch is visible in exactly one of the 4 masks of its image
    hidden_count = mask.view(3, 4, 196).sum(dim=1)
    assert torch.equal(hidden_count, torch.full((3, 196), 3.0))


def test_independent_masks(gen):
    b, n, k = 64, 49, 4
    ids_keep, ids_restore, mask = make_masks(b, n, k, 0.75, "independent", generator=gen)
    keep = num_visible(n, 0.75)
    assert ids_keep.shape == (b * k, keep)
    assert torch.equal(mask.sum(1), torch.full((b * k,), float(n - keep)))
    overlaps = [
        len(set(ids_keep[i * k].tolist()) & set(ids_keep[i * k + 1].tolist())) for i in range(b)
    ]
    assert max(overlaps) > 0  # independent masks do overlap somewhere
    for r in range(b * k):
        assert torch.equal(torch.sort(ids_restore[r]).values, torch.arange(n))


def test_masks_deterministic_per_generator(seed):
    a = make_masks(4, 196, 4, 0.75, generator=torch.Generator().manual_seed(seed))
    b = make_masks(4, 196, 4, 0.75, generator=torch.Generator().manual_seed(seed))
    c = make_masks(4, 196, 4, 0.75, generator=torch.Generator().manual_seed(seed + 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not torch.equal(a[0], c[0])


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match="K \\* L <= N"):
        make_masks(2, 196, 5, 0.75)
    with pytest.raises(ValueError, match="strategy"):
        make_masks(2, 196, 4, 0.75, strategy="random")


def test_gather_and_unshuffle_against_loops(gen):
    b, n, d, k = 3, 16, 8, 4
    ids_keep, ids_restore, _ = make_masks(b, n, k, 0.75, generator=gen)
    tokens = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    pos = torch.randn(n, d, generator=gen, dtype=torch.float64)
    out = gather_visible(tokens, ids_keep, pos, k)
    keep = ids_keep.shape[1]
    for r in range(b * k):
        for j in range(keep):
            p = ids_keep[r, j]
            assert torch.allclose(out[r, j], tokens[r // k, p] + pos[p])

    latent = torch.randn(b * k, 1 + keep, d, generator=gen, dtype=torch.float64)
    mask_token = torch.randn(d, generator=gen, dtype=torch.float64)
    dpos = torch.randn(1 + n, d, generator=gen, dtype=torch.float64)
    full = unshuffle_with_mask_tokens(latent, ids_restore, mask_token, dpos)
    assert full.shape == (b * k, 1 + n, d)
    for r in range(b * k):
        assert torch.allclose(full[r, 0], latent[r, 0] + dpos[0])
        for p in range(n):
            i = ids_restore[r, p].item()
            expect = latent[r, 1 + i] if i < keep else mask_token
            assert torch.allclose(full[r, 1 + p], expect + dpos[1 + p])
