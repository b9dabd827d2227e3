import pytest
import torch
import torch.nn.functional as F

from svg2 import ClusterLayout, ClusterState, SVG2Config, dense_attention, svg2_attention
from tests.helpers import assert_fa_rule, clustered_qkv, masked_reference

SMALL = dict(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, kmeans_iters_step=2)


def test_top_p_one_equals_dense():
    q, k, v = clustered_qkv(b=2, h=3, s=333, d=64)
    out, layout = svg2_attention(q, k, v, SVG2Config(top_p=1.0, **SMALL))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert layout.density() == 1.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,h,s,d", [(1, 1, 17, 64), (2, 3, 201, 64), (1, 2, 129, 128), (3, 1, 64, 128)])
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_equals_masked_dense(b, h, s, d, top_p):
    q, k, v = clustered_qkv(b=b, h=h, s=s, d=d, seed=s)
    out, layout = svg2_attention(q, k, v, SVG2Config(top_p=top_p, **SMALL))
    assert_fa_rule(out, q, k, v, layout.to_dense())
    assert 0 < layout.density() <= 1


def test_a_batch_clusters_each_item_as_alone():
    # Cold k-means starts draw per head, not per (batch, head) row: item i of a batch gets the layout and output
    # it gets alone, wherever it sits in the batch (batched harness runs, resumed with other neighbours).
    q, k, v = clustered_qkv(b=3, h=2, s=201, d=64, seed=4)
    cfg = SVG2Config(top_p=0.7, **SMALL)
    out, layout = svg2_attention(q, k, v, cfg)
    for i in (0, 2):
        alone, alone_layout = svg2_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], cfg)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(layout.to_dense()[i:i + 1], alone_layout.to_dense())


def test_one_token_and_empty_clusters():
    # Hand-built layout: cluster sizes include 1-token and empty clusters.
    b, h, s, d = 1, 2, 9, 64
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    lq = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 3]).expand(b, h, s)  # cluster 1 empty, cluster 3 one token
    lk = torch.tensor([4, 0, 0, 0, 0, 2, 2, 2, 2]).expand(b, h, s)  # cluster 1, 3 empty, 4 one token
    bm = torch.zeros(b, h, 4, 5, dtype=torch.bool)
    bm[..., 0, 0] = bm[..., 2, 4] = bm[..., 2, 2] = bm[..., 3, 4] = True
    bm[..., 1, :] = True  # empty query cluster selecting everything must change nothing
    layout = ClusterLayout.from_labels(lq, lk, bm)
    out, _ = svg2_attention(q, k, v, SVG2Config(), layout=layout)
    ref = masked_reference(q, k, v, layout.to_dense())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_more_clusters_than_tokens_is_capped():
    q, k, v = clustered_qkv(b=1, h=2, s=12, d=64)
    out, layout = svg2_attention(q, k, v, SVG2Config(num_q_centroids=100, num_k_centroids=500))
    assert layout.num_q_clusters == 12 and layout.num_k_clusters == 12
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, layout.to_dense()), rtol=1e-5, atol=1e-5)


def test_default_settings_error_is_small_on_clustered_data():
    q, k, v = clustered_qkv(b=1, h=2, s=1024, d=64, clusters=10, spread=0.3)
    out, layout = svg2_attention(q, k, v, SVG2Config(num_q_centroids=32, num_k_centroids=64))
    ref = F.scaled_dot_product_attention(q, k, v)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert layout.density() < 0.6
    assert rel < 0.25  # top_p = 0.9 drops ~10% of the estimated mass


@pytest.mark.parametrize("padded", [False, True])
def test_joint_text_tokens(padded):
    b, h, sv, t, d = 2, 2, 60, 7, 64
    q, k, v = clustered_qkv(b=b, h=h, s=sv + t, d=d)
    tm = None
    if padded:
        tm = torch.ones(b, t, dtype=torch.bool)
        tm[0, 4:] = False
        tm[1, 1] = False  # padding need not be trailing
    cfg = SVG2Config(top_p=0.7, **SMALL)
    out, layout = svg2_attention(q, k, v, cfg, num_text_tokens=t, text_mask=tm)
    assert_fa_rule(out, q, k, v, layout.to_dense())
    # top_p = 1 with padding equals the dense model's masked attention
    out1, _ = svg2_attention(q, k, v, cfg.replace(top_p=1.0), num_text_tokens=t, text_mask=tm)
    torch.testing.assert_close(out1, dense_attention(q, k, v, num_text_tokens=t, text_mask=tm),
                               rtol=1e-5, atol=1e-5)


def test_state_warm_start_and_shape_change():
    q, k, v = clustered_qkv(b=1, h=2, s=200, d=64)
    st = ClusterState()
    cfg = SVG2Config(**SMALL)
    svg2_attention(q, k, v, cfg, st)
    c1 = st.q_centroids.clone()
    assert st.calls == 1 and c1.shape == (2, 8, 64)
    svg2_attention(q, k, v, cfg, st)
    assert st.calls == 2
    q2, k2, v2 = clustered_qkv(b=2, h=2, s=200, d=64)  # batch changed: cold start, no crash
    svg2_attention(q2, k2, v2, cfg, st)
    assert st.q_centroids.shape == (4, 8, 64)
    st.reset()
    assert st.q_centroids is None and st.calls == 0


def test_half_precision_inputs():
    q, k, v = clustered_qkv(b=1, h=2, s=100, d=64, dtype=torch.float16)
    out, layout = svg2_attention(q, k, v, SVG2Config(**SMALL))
    assert out.dtype == torch.float16
    ref = masked_reference(q, k, v, layout.to_dense())
    assert (out.double() - ref).abs().max() < 5e-3


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "batch, heads, seqlen, headdim"),
        (lambda q, k, v: (q, k[:, :, :10], v), ValueError, "same shape"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "dtype"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
        (lambda q, k, v: (q.clone().index_fill_(2, torch.tensor([3]), float("nan")), k, v), ValueError, "NaN"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    q, k, v = clustered_qkv(b=1, h=1, s=20, d=64)
    with pytest.raises(exc, match=match):
        svg2_attention(*mutate(q, k, v), SVG2Config(**SMALL))


def test_bad_text_arguments():
    q, k, v = clustered_qkv(b=1, h=1, s=20, d=64)
    with pytest.raises(ValueError, match="num_text_tokens"):
        svg2_attention(q, k, v, num_text_tokens=20)
    with pytest.raises(ValueError, match="text_mask"):
        svg2_attention(q, k, v, num_text_tokens=3, text_mask=torch.ones(1, 4, dtype=torch.bool))


def test_unknown_kernel_lists_variants():
    q, k, v = clustered_qkv(b=1, h=1, s=20, d=64)
    with pytest.raises(KeyError, match="unknown attention kernel"):
        svg2_attention(q, k, v, SVG2Config(attention_kernel="nope", **SMALL))
