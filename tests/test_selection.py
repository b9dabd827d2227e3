import math

import pytest
import torch

from svg2.selection import centroid_scores, min_key_clusters, select_target_density, select_top_p


def test_scores_are_size_weighted_softmax():
    cq = torch.randn(2, 3, 8)
    ck = torch.randn(2, 5, 8)
    sizes = torch.tensor([[1, 2, 0, 4, 3], [5, 5, 5, 5, 5]])
    p = centroid_scores(cq, ck, sizes)
    s = (cq @ ck.transpose(1, 2)) / math.sqrt(8)
    expect = sizes[:, None, :] * torch.exp(s)
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(p, expect.float(), rtol=1e-5, atol=1e-6)
    assert (p[0, :, 2] == 0).all()  # empty cluster weighs 0
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3])
def test_top_p_keeps_shortest_prefix_and_minimum(top_p, ratio):
    torch.manual_seed(1)
    scores = torch.softmax(torch.randn(3, 7, 20) * 2, dim=-1)
    bm = select_top_p(scores, top_p, ratio)
    m = min_key_clusters(ratio, 20)
    sorted_p, order = scores.sort(-1, descending=True)
    for n in range(3):
        for i in range(7):
            kept = bm[n, i][order[n, i]]
            cnt = int(kept.sum())
            # kept set is a prefix of the ranking
            assert kept[:cnt].all() and not kept[cnt:].any()
            mass = sorted_p[n, i].cumsum(0)
            shortest = int((mass < top_p).sum()) + 1
            assert cnt == max(min(shortest, 20), m)


def test_top_p_one_keeps_all():
    scores = torch.softmax(torch.randn(1, 4, 6) * 50, dim=-1)  # many underflow to ~0
    assert select_top_p(scores, 1.0, 0.0).all()


def test_min_key_clusters():
    assert min_key_clusters(0.1, 1000) == 100
    assert min_key_clusters(0.1, 5) == 1
    assert min_key_clusters(0.0, 5) == 1


@pytest.mark.parametrize("target", [0.05, 0.1, 0.25, 0.4, 0.8])
def test_target_density_within_one_pair(target):
    torch.manual_seed(2)
    n, cq, ck = 2, 9, 15
    scores = torch.softmax(torch.randn(n, cq, ck) * 2, dim=-1)
    qs = torch.randint(1, 30, (n, cq))
    ks = torch.randint(1, 30, (n, ck))
    bm = select_target_density(scores, qs, ks, target, min_kc_ratio=0.0)
    cost = qs[:, :, None].double() * ks[:, None, :].double()
    total = qs.sum(-1).double() * ks.sum(-1).double()
    kept = (cost * bm).sum((-1, -2))
    for b in range(n):
        assert kept[b] >= target * total[b] - 1e-6  # reaches the target ...
        # ... and removing the largest kept pair would fall below it (overshoot of at most one pair)
        assert kept[b] - cost[b][bm[b]].max() < target * total[b]
    assert bm.any(-1).all()  # every query cluster keeps at least one key cluster


def test_target_density_prefers_mass_per_pair():
    scores = torch.tensor([[[0.5, 0.5]]])
    qs = torch.tensor([[10]])
    ks = torch.tensor([[1, 9]])  # same mass, cluster 0 is 9x cheaper
    bm = select_target_density(scores, qs, ks, 0.05, min_kc_ratio=0.0)
    assert bm.tolist() == [[[True, False]]]
