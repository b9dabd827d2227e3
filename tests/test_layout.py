import pytest
import torch

from svg2 import ClusterLayout


def _layout(b=2, h=2, s=11, cq=3, ck=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lq = torch.randint(0, cq, (b, h, s), generator=g)
    lk = torch.randint(0, ck, (b, h, s), generator=g)
    bm = torch.rand(b, h, cq, ck, generator=g) > 0.5
    return ClusterLayout.from_labels(lq, lk, bm)


def test_density_matches_to_dense():
    lay = _layout()
    dense = lay.to_dense()
    assert dense.shape == (2, 2, 11, 11)
    torch.testing.assert_close(lay.density_per_head(), dense.double().mean((-1, -2)))
    assert abs(lay.density() + lay.sparsity() - 1) < 1e-12


def test_to_dense_definition():
    lay = _layout()
    m = lay.to_dense()
    for b in range(2):
        for h in range(2):
            for x in range(11):
                for y in range(11):
                    assert m[b, h, x, y] == lay.block_map[b, h, lay.q_labels[b, h, x], lay.k_labels[b, h, y]]


def test_permutation_makes_clusters_contiguous():
    lay = _layout(s=40)
    sorted_labels = torch.gather(lay.q_labels, 2, lay.q_perm)
    assert (sorted_labels.diff(dim=-1) >= 0).all()
    off = lay.q_offsets
    assert off.shape == (2, 2, 4) and (off[..., -1] == 40).all()
    for c in range(3):
        seg = sorted_labels[0, 0, off[0, 0, c]:off[0, 0, c + 1]]
        assert (seg == c).all()


def test_text_tokens_in_to_dense():
    lay = _layout(b=1, h=1, s=5)
    tm = torch.tensor([[True, False, True]])
    lay = ClusterLayout.from_labels(lay.q_labels, lay.k_labels, lay.block_map, num_text_tokens=3, text_mask=tm)
    m = lay.to_dense()
    assert m.shape == (1, 1, 8, 8)
    assert m[0, 0, :, 5:].tolist() == [[True, False, True]] * 8  # padded text key masked for every query
    assert m[0, 0, 5:, :5].all()  # text queries see all video keys


def test_repr_index_and_validation():
    lay = _layout()
    r = repr(lay)
    assert "ClusterLayout(batch=2, heads=2" in r and "density=" in r
    sub = lay[1, 0]
    assert sub.block_map.shape == (1, 1, 3, 4)
    torch.testing.assert_close(sub.density_per_head()[0, 0], lay.density_per_head()[1, 0])
    with pytest.raises(ValueError, match="q_sizes"):
        ClusterLayout(lay.q_labels, lay.k_labels, lay.q_sizes[..., :2], lay.k_sizes, lay.q_perm, lay.k_perm,
                      lay.block_map)
    with pytest.raises(TypeError, match="bool"):
        ClusterLayout.from_labels(lay.q_labels, lay.k_labels, lay.block_map.int())
