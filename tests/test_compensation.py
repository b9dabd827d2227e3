"""Compensation of skipped key clusters and layout reuse (issue 17), on the CPU.

References are float64 masked-dense computations of the exact formula: one softmax over the selected token keys
plus one pseudo-key per skipped non-empty key cluster (logit ``q . c_j * scale + log n_j``, value ``mean(v_j)``),
with centroids and mean values taken from the current K and V under the layout's labels.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import svg2.attention as attention_mod
from svg2 import ClusterLayout, ClusterState, SVG2Config, dense_attention, svg2_attention
from svg2.compensation import (
    KeySummary,
    _centroid_attention_flex,
    centroid_attention,
    compensate,
    compensation_bias,
    merge_attention,
    segment_means,
    summarize_key_clusters,
)
from tests.helpers import clustered_qkv, compensated_reference

SMALL = dict(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, kmeans_iters_step=2)


def _hand_layout(b=1, h=2):
    """9 video tokens; query cluster 1 and key clusters 1, 3 empty; key cluster 4 holds one token."""
    lq = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 3]).expand(b, h, 9)
    lk = torch.tensor([4, 0, 0, 0, 0, 2, 2, 2, 2]).expand(b, h, 9)
    bm = torch.zeros(b, h, 4, 5, dtype=torch.bool)
    bm[..., 0, 0] = bm[..., 2, 4] = bm[..., 3, 2] = True
    return ClusterLayout.from_labels(lq, lk, bm)


# ------------------------------------------------------------------------------------------- building blocks


def test_merge_attention_is_softmax_over_the_union():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, 12, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 3, 12, 4, generator=g, dtype=torch.float64)
    a, bb = slice(0, 7), slice(7, 12)
    out_a, out_b = torch.softmax(s[..., a], -1) @ v[..., a, :], torch.softmax(s[..., bb], -1) @ v[..., bb, :]
    out, lse = merge_attention(out_a, torch.logsumexp(s[..., a], -1), out_b, torch.logsumexp(s[..., bb], -1))
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)


def test_merge_attention_empty_sets():
    out_a = torch.randn(4, 3)
    ninf = torch.full((4,), float("-inf"))
    lse_a = torch.randn(4)
    out, lse = merge_attention(out_a, lse_a, torch.randn(4, 3), ninf)  # B empty: exactly A
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = merge_attention(torch.randn(4, 3), ninf, out_a, lse_a)  # A empty: exactly B
    assert torch.equal(out, out_a)
    out, lse = merge_attention(torch.randn(4, 3), ninf, torch.randn(4, 3), ninf)  # both empty: 0, -inf
    assert torch.equal(out, torch.zeros(4, 3)) and torch.isneginf(lse).all()


def test_segment_means_contiguous_clusters_and_empty():
    x = torch.randn(2, 3, 11, 5)
    sizes = torch.tensor([3, 0, 6, 1]).expand(2, 3, 4)  # 10 rows in clusters, the 11th is past the end
    m = segment_means(x, sizes)
    assert m.dtype == torch.float32 and m.shape == (2, 3, 4, 5)
    torch.testing.assert_close(m[:, :, 0], x[:, :, 0:3].mean(2))
    assert torch.equal(m[:, :, 1], torch.zeros(2, 3, 5))
    torch.testing.assert_close(m[:, :, 2], x[:, :, 3:9].mean(2))
    torch.testing.assert_close(m[:, :, 3], x[:, :, 9])


def test_kmeans_centroids_are_the_means_of_the_current_keys():
    # Compensation takes k-means' last update as centroids: they must equal the segment means of these K.
    q, k, v = clustered_qkv(b=1, h=2, s=240, d=32)
    built = attention_mod._build_clusters(q, k, SVG2Config(**SMALL), ClusterState(), num_text_tokens=0,
                                          text_mask=None, scale=None, timer=None)
    ks = torch.gather(k, 2, built.layout.k_perm[..., None].expand(-1, -1, -1, 32))
    torch.testing.assert_close(built.k_centroids, segment_means(ks, built.layout.k_sizes), rtol=1e-5, atol=1e-5)


def _summary_and_inputs(seed=0, sq=40, cq=3, ck=6, d=16, empty=(2,)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, sq, d, generator=g)
    sizes = torch.randint(1, 9, (1, 2, ck), generator=g)
    for j in empty:
        sizes[..., j] = 0
    summ = KeySummary(torch.randn(1, 2, ck, d, generator=g), torch.randn(1, 2, ck, d, generator=g), sizes)
    skipped = torch.rand(1, 2, cq, ck, generator=g) < 0.6
    skipped[..., 0, :] = False  # query cluster 0 skips nothing
    labels = torch.randint(0, cq, (1, 2, sq), generator=g)
    return q, summ, skipped, labels


def test_centroid_attention_torch_is_the_formula():
    q, summ, skipped, labels = _summary_and_inputs()
    out, lse, used = centroid_attention(q, summ, skipped, labels, 0.25, backend="torch")
    assert used == "torch"
    bias = compensation_bias(summ.sizes, skipped)  # (1, 2, Cq, Ck)
    logits = q.double() @ summ.centroids.double().transpose(-1, -2) * 0.25
    logits = logits + torch.gather(bias.double(), 2, labels[..., None].expand(-1, -1, -1, bias.shape[-1]))
    ref_lse = torch.logsumexp(logits, -1)
    ref = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0) @ summ.value_means.double()
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    rows0 = labels == 0
    assert torch.isneginf(lse[rows0]).all() and (out[rows0] == 0).all()
    # Empty clusters weigh 0 whatever their (stale) centroid and mean are.
    garbage = KeySummary(summ.centroids.clone(), summ.value_means.clone(), summ.sizes)
    garbage.centroids[..., 2, :] = 1e3
    garbage.value_means[..., 2, :] = -1e3
    out2, lse2, _ = centroid_attention(q, garbage, skipped, labels, 0.25, backend="torch")
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_centroid_attention_flex_score_mod_matches_torch():
    # FlexAttention's unfused eager path on the CPU checks the score_mod (bias lookup, padding to 128 keys).
    q, summ, skipped, labels = _summary_and_inputs(seed=1, ck=37, cq=4)
    bias = compensation_bias(summ.sizes, skipped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_f, lse_f = _centroid_attention_flex(q, summ, bias, labels, 0.3, compiled=False)
    out_t, lse_t, _ = centroid_attention(q, summ, skipped, labels, 0.3, backend="torch")
    torch.testing.assert_close(lse_f, lse_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_f.float(), out_t, rtol=1e-5, atol=1e-5)


def test_auto_falls_back_to_torch_when_flex_fails_and_says_so(monkeypatch):
    import svg2.compensation as comp

    q, summ, skipped, labels = _summary_and_inputs()
    monkeypatch.setattr(comp, "_flex_unsupported", lambda q: [])  # pretend flex could run here

    def broken(*a, **kw):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(comp, "_centroid_attention_flex", broken)
    with pytest.warns(RuntimeWarning, match="no kernel for you"):
        out, lse, used = centroid_attention(q, summ, skipped, labels, 0.25)
    assert used == "torch (flex failed)"
    ref, ref_lse, _ = centroid_attention(q, summ, skipped, labels, 0.25, backend="torch")
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    with pytest.raises(RuntimeError, match="no kernel"):  # named explicitly: no fallback
        centroid_attention(q, summ, skipped, labels, 0.25, backend="flex")


def test_centroid_attention_refusals():
    q, summ, skipped, labels = _summary_and_inputs()
    with pytest.raises(ValueError, match="backend"):
        centroid_attention(q, summ, skipped, labels, 0.25, backend="cuda-magic")
    with pytest.raises(NotImplementedError, match="flex compensation cannot run"):
        centroid_attention(q, summ, skipped, labels, 0.25, backend="flex")
    with pytest.raises(ValueError, match="q_labels"):
        centroid_attention(q, summ, skipped, labels[..., :-1], 0.25)
    with pytest.raises(TypeError, match="bool"):
        centroid_attention(q, summ, skipped.int(), labels, 0.25)
    with pytest.raises(ValueError, match="must match q"):
        compensate(q[..., :-1, :], torch.zeros(1, 2, 39), q, summ, skipped, labels, 0.25)


# ------------------------------------------------------------------------------------ compensated svg2 call


@pytest.mark.parametrize("b,h,s,d", [(1, 1, 33, 32), (2, 2, 201, 64), (1, 3, 150, 128)])
@pytest.mark.parametrize("top_p", [0.3, 0.8])
def test_compensated_svg2_equals_formula(b, h, s, d, top_p):
    q, k, v = clustered_qkv(b=b, h=h, s=s, d=d, seed=s)
    st = ClusterState()
    out, lay = svg2_attention(q, k, v, SVG2Config(top_p=top_p, compensate=True, **SMALL), st)
    assert st.last_kernels["lse"] == "torch" and st.last_kernels["compensation"] == "torch"
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compensated_low_precision_within_twice_the_torch_error(dtype):
    q, k, v = clustered_qkv(b=1, h=2, s=180, d=64, seed=3)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    out, lay = svg2_attention(q, k, v, SVG2Config(top_p=0.5, compensate=True, **SMALL))
    ref = compensated_reference(q, k, v, lay)
    same = compensated_reference(q, k, v, lay, dtype=dtype)
    err = (out.double() - ref).abs().max().item()
    err_torch = (same.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


def test_nothing_skipped_equals_dense():
    q, k, v = clustered_qkv(b=2, h=2, s=150, d=32)
    out, lay = svg2_attention(q, k, v, SVG2Config(top_p=1.0, compensate=True, **SMALL))
    assert lay.density() == 1.0
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_everything_in_one_skipped_cluster_gives_the_mean_value():
    # One key cluster holds every key; query cluster 0 skips it (nothing computed exactly): its rows get the
    # mean of all values; query cluster 1 computes it: dense attention.
    q, k, v = (torch.randn(1, 2, 10, 16) for _ in range(3))
    lq = torch.tensor([0] * 4 + [1] * 6).expand(1, 2, 10)
    bm = torch.tensor([[False], [True]]).expand(1, 2, 2, 1)
    lay = ClusterLayout.from_labels(lq, torch.zeros(1, 2, 10, dtype=torch.long), bm)
    out, _ = svg2_attention(q, k, v, SVG2Config(compensate=True), layout=lay)
    torch.testing.assert_close(out[:, :, :4], v.mean(2, keepdim=True).expand(1, 2, 4, 16), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :, 4:], F.scaled_dot_product_attention(q, k, v)[:, :, 4:], rtol=1e-5,
                               atol=1e-6)


def test_empty_clusters_weigh_zero_and_one_token_clusters_are_exact():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    lay = _hand_layout()
    out, _ = svg2_attention(q, k, v, SVG2Config(compensate=True), layout=lay)
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay), rtol=1e-5, atol=1e-5)
    # A skipped one-token cluster compensates exactly: its centroid is its key and its mean its value.
    bm1 = lay.block_map.clone()
    bm1[..., 2, 4] = False
    lay1 = ClusterLayout.from_labels(lay.q_labels, lay.k_labels, bm1)
    out1, _ = svg2_attention(q, k, v, SVG2Config(compensate=True), layout=lay1)
    torch.testing.assert_close(out1[:, :, 3:8], out[:, :, 3:8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_text_tokens_stay_exact(padded):
    b, h, sv, t, d = 2, 2, 70, 6, 32
    q, k, v = clustered_qkv(b=b, h=h, s=sv + t, d=d, seed=5)
    tm = None
    if padded:
        tm = torch.ones(b, t, dtype=torch.bool)
        tm[0, 3:] = False
        tm[1, 0] = False
    cfg = SVG2Config(top_p=0.5, compensate=True, **SMALL)
    out, lay = svg2_attention(q, k, v, cfg, num_text_tokens=t, text_mask=tm)
    # Text queries attend densely (exactly what the dense model computes), video rows follow the formula.
    dense = dense_attention(q, k, v, num_text_tokens=t, text_mask=tm)
    torch.testing.assert_close(out[:, :, sv:], dense[:, :, sv:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay, text_mask=tm), rtol=2e-5,
                               atol=2e-5)
    if padded:  # padded text keys never leak in, not even through compensation
        v2 = v.clone()
        v2[0, :, sv + 3:] = 1e4
        out2, _ = svg2_attention(q, k, v2, cfg, num_text_tokens=t, text_mask=tm, layout=lay)
        torch.testing.assert_close(out2[0], out[0], rtol=1e-5, atol=1e-5)
    # Nothing skipped: the dense model's output, text padding included.
    out1, _ = svg2_attention(q, k, v, cfg.replace(top_p=1.0), num_text_tokens=t, text_mask=tm)
    torch.testing.assert_close(out1, dense, rtol=1e-5, atol=1e-5)


def test_compensation_improves_on_dropping_on_clustered_data():
    q, k, v = clustered_qkv(b=1, h=2, s=512, d=64, clusters=10)
    cfg = SVG2Config(num_q_centroids=16, num_k_centroids=32, target_density=0.15)
    ref = F.scaled_dot_product_attention(q, k, v)
    rel = lambda o: ((o - ref).norm() / ref.norm()).item()  # noqa: E731
    dropped, lay = svg2_attention(q, k, v, cfg)
    kept, _ = svg2_attention(q, k, v, cfg.replace(compensate=True), layout=lay)
    assert rel(kept) < rel(dropped)


def test_given_key_summary_is_used():
    q, k, v = clustered_qkv(b=1, h=2, s=90, d=32)
    cfg = SVG2Config(top_p=0.5, compensate=True, **SMALL)
    out, lay = svg2_attention(q, k, v, cfg)
    ks = torch.gather(k, 2, lay.k_perm[..., None].expand(-1, -1, -1, 32))
    vs = torch.gather(v, 2, lay.k_perm[..., None].expand(-1, -1, -1, 32))
    summ = summarize_key_clusters(ks, vs, lay.k_sizes)
    out2, _ = svg2_attention(q, k, v, cfg, layout=lay, key_summary=summ)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    zero = KeySummary(summ.centroids, torch.zeros_like(summ.value_means), summ.sizes)
    out3, _ = svg2_attention(q, k, v, cfg, layout=lay, key_summary=zero)
    assert not torch.allclose(out3, out)


def test_compensated_lse_is_the_augmented_logsumexp_and_comes_from_the_kernel():
    t = 4
    q, k, v = clustered_qkv(b=1, h=2, s=96 + t, d=32, seed=7)
    st = ClusterState()
    out, lse, lay = svg2_attention(q, k, v, SVG2Config(top_p=0.5, compensate=True, **SMALL), st,
                                   num_text_tokens=t, return_lse=True)
    assert st.last_kernels["lse"] == st.last_kernels["attention"] == "torch"  # the kernel's own LSE
    b, h, s, d = q.shape
    sv, ck = s - t, lay.num_k_clusters
    onehot = F.one_hot(lay.k_labels, ck).double()
    n = onehot.sum(2)
    cent = onehot.transpose(-1, -2) @ k[:, :, :sv].double() / n.clamp_min(1)[..., None]
    s_tok = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)).masked_fill(~lay.to_dense(), float("-inf"))
    skipped = ~torch.gather(lay.block_map, 2, lay.q_labels[..., None].expand(b, h, sv, ck)) & (n > 0)[:, :, None]
    s_cen = (q[:, :, :sv].double() @ cent.transpose(-1, -2) / math.sqrt(d) + n.log()[:, :, None]).masked_fill(
        ~skipped, float("-inf"))
    s_cen = torch.cat([s_cen, torch.full((b, h, t, ck), float("-inf"), dtype=torch.float64)], 2)
    ref = torch.logsumexp(torch.cat([s_tok, s_cen], -1), -1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay), rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------- layout reuse


def _count_kmeans(monkeypatch) -> list[int]:
    calls = []
    real = attention_mod.kmeans

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(attention_mod, "kmeans", counting)
    return calls


@pytest.mark.parametrize("every", [1, 2, 3])
def test_layout_every_clusters_every_nth_call(monkeypatch, every):
    calls = _count_kmeans(monkeypatch)
    st = ClusterState()
    cfg = SVG2Config(top_p=0.6, layout_every=every, compensate=True, **SMALL)
    reused = []
    for step in range(7):
        q, k, v = clustered_qkv(b=1, h=2, s=100, d=32, seed=step)
        svg2_attention(q, k, v, cfg, st)
        reused.append(st.last_layout_reused)
    builds = [i for i, r in enumerate(reused) if not r]
    assert builds == list(range(0, 7, every))
    assert len(calls) == 2 * len(builds)  # one k-means on Q and one on K per build
    assert st.calls == len(builds)


def test_reused_layout_takes_current_keys_and_values(monkeypatch):
    st = ClusterState()
    cfg = SVG2Config(top_p=0.5, layout_every=2, compensate=True, **SMALL)
    q0, k0, v0 = clustered_qkv(b=1, h=2, s=100, d=32, seed=0)
    _, lay0 = svg2_attention(q0, k0, v0, cfg, st)
    q1, k1, v1 = clustered_qkv(b=1, h=2, s=100, d=32, seed=1)
    out1, lay1 = svg2_attention(q1, k1, v1, cfg, st)
    assert st.last_layout_reused and lay1 is lay0
    # The layout (labels, selection) of step 0; centroids, means, keys and values of step 1.
    torch.testing.assert_close(out1.double(), compensated_reference(q1, k1, v1, lay0), rtol=2e-5, atol=2e-5)


def test_layout_reuse_skips_stale_shapes_and_resets():
    st = ClusterState()
    cfg = SVG2Config(top_p=0.5, layout_every=4, **SMALL)
    svg2_attention(*clustered_qkv(b=1, h=2, s=100, d=32), cfg, st)
    svg2_attention(*clustered_qkv(b=1, h=2, s=120, d=32), cfg, st)  # another length: a fresh layout
    assert not st.last_layout_reused
    svg2_attention(*clustered_qkv(b=1, h=2, s=120, d=32), cfg, st)
    assert st.last_layout_reused
    st.reset()
    assert st.layout is None and st.layout_uses == 0


def test_layout_every_one_keeps_nothing():
    st = ClusterState()
    svg2_attention(*clustered_qkv(b=1, h=2, s=80, d=32), SVG2Config(**SMALL), st)
    assert st.layout is None and not st.last_layout_reused


# -------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("value,exc,match", [(0, ValueError, "number of denoising steps"),
                                             (-2, ValueError, ">= 1"), (1.5, TypeError, "must be an int"),
                                             (True, TypeError, "must be an int")])
def test_layout_every_is_validated(value, exc, match):
    with pytest.raises(exc, match=match):
        SVG2Config(layout_every=value)


def test_compensate_must_be_bool():
    with pytest.raises(TypeError, match="compensate must be a bool"):
        SVG2Config(compensate="yes")
    assert SVG2Config(compensate=True, layout_every=4).to_dict()["layout_every"] == 4


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_flex_compensation_matches_torch_on_gpu():
    q, summ, skipped, labels = _summary_and_inputs(seed=2, sq=1000, cq=7, ck=300, d=128)
    q = q.cuda().to(torch.bfloat16)
    summ = KeySummary(summ.centroids.cuda(), summ.value_means.cuda(), summ.sizes.cuda())
    skipped, labels = skipped.cuda(), labels.cuda()
    out_f, lse_f, used = centroid_attention(q, summ, skipped, labels, 0.09, backend="flex")
    assert used == "flex"  # auto takes the fused Triton kernel now (tests/test_compensation_kernel.py)
    out_t, lse_t, _ = centroid_attention(q, summ, skipped, labels, 0.09, backend="torch")
    finite = torch.isfinite(lse_t)
    assert torch.equal(finite, torch.isfinite(lse_f))
    torch.testing.assert_close(lse_f[finite], lse_t[finite], rtol=1e-2, atol=2e-2)  # bf16 q, k
    torch.testing.assert_close(out_f.float(), out_t, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_compensated_call_on_gpu_within_twice_the_torch_error(kernel):
    q, k, v = (x.cuda().to(torch.bfloat16) for x in clustered_qkv(b=1, h=4, s=2048, d=128, clusters=12))
    st = ClusterState()
    cfg = SVG2Config(num_q_centroids=32, num_k_centroids=64, target_density=0.2, compensate=True,
                     attention_kernel=kernel)
    out, lay = svg2_attention(q, k, v, cfg, st)
    assert st.last_kernels["compensation"] == "triton_sorted" and st.last_kernels["lse"] == st.last_kernels["attention"]
    ref = compensated_reference(q.cpu(), k.cpu(), v.cpu(), lay.to("cpu"))
    same = compensated_reference(q.cpu(), k.cpu(), v.cpu(), lay.to("cpu"), dtype=torch.bfloat16)
    err = (out.cpu().double() - ref).abs().max().item()
    err_torch = (same.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch, st.last_kernels)
