import numpy as np
import pytest
import torch

from svg2.clustering import init_centroids, kmeans
from tests.helpers import clustered_qkv


def test_shapes_sizes_and_means():
    q, _, _ = clustered_qkv(b=2, h=3, s=301, d=16)
    x = q.reshape(6, 301, 16)
    r = kmeans(x, 12, iters=10, seed=0)
    assert r.labels.shape == (6, 301) and r.labels.dtype == torch.long
    assert r.centroids.shape == (6, 12, 16) and r.centroids.dtype == torch.float32
    assert torch.equal(r.sizes.sum(-1), torch.full((6,), 301))
    # centroids are the means of the returned clusters
    for c in range(12):
        m = r.labels[0] == c
        if m.any():
            torch.testing.assert_close(r.centroids[0, c], x[0][m].mean(0), rtol=1e-4, atol=1e-5)


def test_deterministic_under_seed():
    x = torch.randn(4, 200, 8)
    a = kmeans(x, 10, iters=5, seed=3)
    b = kmeans(x, 10, iters=5, seed=3)
    c = kmeans(x, 10, iters=5, seed=4)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)


def test_init_uses_distinct_points():
    x = torch.randn(3, 50, 4)
    c = init_centroids(x, 50, seed=0)
    for i in range(3):
        assert torch.unique(c[i], dim=0).shape[0] == 50


def test_warm_start_zero_iters_returns_previous_assignment():
    q, _, _ = clustered_qkv(b=1, h=2, s=400, d=16, clusters=5)
    x = q.reshape(2, 400, 16)
    first = kmeans(x, 8, iters=60, seed=0)  # converged
    again = kmeans(x, 8, iters=0, init=first.centroids)
    assert torch.equal(again.labels, first.labels)
    torch.testing.assert_close(again.centroids, first.centroids)


def test_empty_cluster_keeps_centroid_and_no_nan():
    x = torch.zeros(1, 10, 2)
    x[0, 5:] = 1.0
    init = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]])
    r = kmeans(x, 3, iters=3, init=init)
    assert torch.isfinite(r.centroids).all()
    assert r.sizes[0, 2] == 0
    torch.testing.assert_close(r.centroids[0, 2], init[0, 2])


def test_clusters_capped_at_sequence_length():
    x = torch.randn(2, 5, 4)
    r = kmeans(x, 50, iters=3)
    assert r.centroids.shape == (2, 5, 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch, num_points, dim"):
        kmeans(torch.randn(5, 4), 2, iters=1)
    with pytest.raises(ValueError, match="warm-start centroids"):
        kmeans(torch.randn(2, 10, 4), 3, iters=1, init=torch.randn(2, 4, 4))
    with pytest.raises(KeyError, match="unknown k-means kernel"):
        kmeans(torch.randn(2, 10, 4), 3, iters=1, kernel="nope")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inertia_close_to_sklearn(seed):
    sklearn = pytest.importorskip("sklearn.cluster")
    q, _, _ = clustered_qkv(b=1, h=1, s=600, d=16, clusters=8, seed=seed)
    x = q.reshape(1, 600, 16)
    init = init_centroids(x, 10, seed=seed)
    ours = kmeans(x, 10, iters=50, init=init)
    km = sklearn.KMeans(n_clusters=10, init=init[0].double().numpy(), n_init=1, max_iter=50, tol=0.0,
                        algorithm="lloyd").fit(x[0].double().numpy())
    assert float(ours.inertia(x)[0]) <= 1.05 * float(km.inertia_)
    assert np.isfinite(km.inertia_)


def test_head_slice_draws_what_an_all_heads_call_draws():
    """A call that holds heads 2..3 of 4 (a Ulysses rank) gets, head for head, the cold start and the layout of
    one call over all heads: the slice is an explicit argument, not ambient state."""
    from svg2 import SVG2Config, build_layout
    from svg2.clustering import HeadSlice

    q, k, _ = clustered_qkv(b=2, h=4, s=96, d=16)
    full = init_centroids(q.reshape(8, 96, 16), 6, seed=0, heads=HeadSlice(0, 4, 4)).view(2, 4, 6, 16)
    # ... and every batch entry draws what it draws alone (a video batched with others starts the same).
    alone = init_centroids(q[1:].reshape(4, 96, 16), 6, seed=0, heads=HeadSlice(0, 4, 4))
    assert torch.equal(full[1], alone.view(4, 6, 16))
    part = init_centroids(q[:, 2:].reshape(4, 96, 16), 6, seed=0, heads=HeadSlice(2, 2, 4)).view(2, 2, 6, 16)
    assert torch.equal(part, full[:, 2:])
    assert not torch.equal(init_centroids(q[:, 2:].reshape(4, 96, 16), 6, seed=0).view(2, 2, 6, 16), full[:, 2:])

    cfg = SVG2Config(num_q_centroids=6, num_k_centroids=8, kmeans_iters_init=3)
    whole = build_layout(q, k, cfg)
    sliced = build_layout(q[:, 2:], k[:, 2:], cfg, heads=HeadSlice(2, 2, 4))
    assert torch.equal(sliced.q_labels, whole.q_labels[:, 2:]) and torch.equal(sliced.block_map, whole.block_map[:, 2:])

    with pytest.raises(ValueError, match="first \\+ count <= total"):
        HeadSlice(3, 2, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        init_centroids(q[:, :3].reshape(6, 96, 16), 6, seed=0, heads=HeadSlice(0, 4, 4))
