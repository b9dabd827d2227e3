"""Key-cluster ordering (svg2_kernels.order): a nearest-neighbour chain that changes tiling, never results."""

import pytest
import torch

from svg2 import SVG2Config, svg2_attention
from svg2_kernels.order import chain_order, chain_order_torch
from tests.helpers import assert_fa_rule, clustered_qkv

SMALL = dict(num_q_centroids=8, num_k_centroids=24, kmeans_iters_init=10, kmeans_iters_step=2, top_p=0.7)


def _runs(block_map: torch.Tensor, k_sizes: torch.Tensor) -> int:
    """Maximal stretches of selected (or empty) key clusters over all query clusters and heads."""
    cover = block_map | (k_sizes == 0).unsqueeze(-2)
    prev = torch.zeros_like(cover)
    prev[..., 1:] = cover[..., :-1]
    return int((cover & ~prev & block_map.any(-1, keepdim=True)).sum())


def test_chain_is_a_permutation_that_walks_groups():
    g = torch.Generator().manual_seed(0)
    groups = torch.randn(4, 16, generator=g) * 5
    # 4 tight groups of 6 centroids, interleaved in the input order
    c = (groups.repeat(6, 1) + 0.05 * torch.randn(24, 16, generator=g)).unsqueeze(0)
    order = chain_order_torch(c)[0]
    assert sorted(order.tolist()) == list(range(24))
    group_of = order % 4  # input index i belongs to group i % 4
    changes = int((group_of[1:] != group_of[:-1]).sum())
    assert changes == 3, f"the chain should leave each group once, changed group {changes} times"


def test_tiny_cluster_counts():
    c = torch.randn(2, 2, 8)
    assert torch.equal(chain_order(c), torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match=r"\(N, C, D\)"):
        chain_order(torch.randn(5, 8))


@pytest.mark.parametrize("seed", [0, 1])
def test_ordering_changes_tiling_not_results(seed):
    q, k, v = clustered_qkv(b=1, h=2, s=300, d=64, clusters=10, seed=seed)
    out_o, lay_o = svg2_attention(q, k, v, SVG2Config(**SMALL, order_key_clusters=True))
    out_p, lay_p = svg2_attention(q, k, v, SVG2Config(**SMALL, order_key_clusters=False))
    assert_fa_rule(out_o, q, k, v, lay_o.to_dense())
    # same clusters (the ordering renumbers them): same token mask, so the same attention
    assert torch.equal(lay_o.to_dense(), lay_p.to_dense())
    torch.testing.assert_close(out_o, out_p, rtol=1e-5, atol=1e-5)
    assert _runs(lay_o.block_map, lay_o.k_sizes) <= _runs(lay_p.block_map, lay_p.k_sizes)


def test_chain_order_is_a_custom_op():
    from svg2_kernels.order import _chain_order_op

    torch.library.opcheck(_chain_order_op, (torch.randn(2, 7, 4),), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(TypeError, match="float tensor"):
        chain_order(torch.zeros(1, 4, 3, dtype=torch.long))
