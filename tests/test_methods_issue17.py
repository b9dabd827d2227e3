"""svg_ear, sol_attn, and the compensate / layout_every options of every cluster or block method (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import svg2.attention as attention_mod
from svg2 import SVG2Config
from svg2.compensation import segment_means
from svg2.methods import AttentionContext, MethodState, build_method
from svg2.methods.sol_attn import select_threshold
from svg2.methods.svg_ear import ear_log_error, ear_select
from svg2.selection import min_key_clusters
from tests.helpers import clustered_qkv, compensated_reference

SHAPE = (4, 4, 4)  # frames, height, width in tokens
SV = math.prod(SHAPE)
SPARSE = dict(dense_steps_frac=0.0, dense_layers=0)
SMALL = dict(num_q_centroids=6, num_k_centroids=12, kmeans_iters_init=8, kmeans_iters_step=2, **SPARSE)


def _ctx(state=None, step=5, text=0, text_mask=None, **kw) -> AttentionContext:
    return AttentionContext(layer_index=1, step_index=step, num_steps=10, num_text_tokens=text, text_mask=text_mask,
                            state=state or MethodState(), extra={"video_shape": SHAPE}, **kw)


def _qkv(seed=0, text=0, b=1, h=2, d=32):
    return clustered_qkv(b=b, h=h, s=SV + text, d=d, clusters=5, seed=seed)


# ---------------------------------------------------------------------------------------------- SVG-EAR probe


def test_ear_log_error_is_the_blockwise_formula():
    g = torch.Generator().manual_seed(0)
    n, cq, ck, d = 2, 3, 5, 8
    sizes = torch.tensor([[4, 0, 3, 7, 1], [2, 5, 0, 6, 2]])
    s = int(sizes.sum(-1).max()) + 2  # two rows past the last cluster in one head: ignored
    ks = torch.randn(n, s, d, generator=g)
    vs = torch.randn(n, s, d, generator=g)
    qc = torch.randn(n, cq, d, generator=g)
    kc, vm = segment_means(ks[:, None], sizes[:, None])[:, 0], segment_means(vs[:, None], sizes[:, None])[:, 0]
    scale = 0.4
    out = ear_log_error(qc, ks, vs, kc, vm, sizes, scale)
    ref = torch.empty(n, cq, ck, dtype=torch.float64)
    mag = torch.empty(n, cq, ck, dtype=torch.float64)  # size of the expanded terms: fp32 cancels below ~1e-6 of it
    for i in range(n):
        start = 0
        for j in range(ck):
            rows = slice(start, start + int(sizes[i, j]))
            start += int(sizes[i, j])
            for r in range(cq):
                a = ks[i, rows].double() @ qc[i, r].double() * scale
                c = kc[i, j].double() @ qc[i, r].double() * scale
                x, y = a.exp()[:, None] * vs[i, rows].double(), c.exp() * vm[i, j].double()
                ref[i, r, j] = ((x - y) ** 2).sum().clamp_min(1e-8)
                mag[i, r, j] = (x**2).sum() + len(x) * (y**2).sum()
    got = out.double().exp()
    assert ((got - ref).abs() <= 1e-4 * ref + 1e-5 * mag + 1e-8).all()
    assert (out >= math.log(1e-8) - 1e-6).all()
    # A one-token cluster is its own centroid: no error beyond rounding.
    assert (got[0, :, 4] <= 1e-5 * mag[0, :, 4] + 1e-8).all()


def _route_inputs(seed=0, n=2, cq=4, ck=10):
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(n, cq, ck, generator=g) * 2, -1)
    q_sizes = torch.randint(1, 30, (n, cq), generator=g)
    k_sizes = torch.randint(0, 20, (n, ck), generator=g)
    log_err = torch.randn(n, cq, ck, generator=g) * 3
    return log_err, scores, q_sizes, k_sizes


def _svg2_budget(scores, q_sizes, k_sizes, top_p, min_kc_ratio):
    sp, order = scores.sort(-1, descending=True)
    rank = torch.arange(scores.shape[-1])
    keep = ((sp.cumsum(-1) - sp) <= top_p) | (rank < min_key_clusters(min_kc_ratio, scores.shape[-1]))
    area = q_sizes[..., None].double() * k_sizes[:, None, :].double()
    return (torch.gather(area, -1, order) * keep).sum(-1), area


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_ear_select_spends_svg2_budget_on_error_per_cost(top_p):
    log_err, scores, qs, ks = _route_inputs()
    bm = ear_select(log_err, scores, qs, ks, top_p=top_p, min_kc_ratio=0.1, guaranteed_ratio=0.1)
    budget, area = _svg2_budget(scores, qs, ks, top_p, 0.1)
    cost = (area * bm).sum(-1)
    top1 = scores.argmax(-1, keepdim=True)
    assert torch.gather(bm, -1, top1).all()  # guaranteed: the best cluster by score (ceil(0.1 * 10) = 1)
    guaranteed_cost = torch.gather(area, -1, top1)[..., 0]
    # Within budget, overshooting by at most the last block taken (or the guaranteed ones alone).
    largest = area.amax(-1)
    assert (cost <= torch.maximum(budget, guaranteed_cost) + largest).all()
    # The routed clusters are the best by value among the non-guaranteed ones: any unrouted non-empty cluster
    # with a higher value must not have fit.
    value = log_err.double() - torch.log(area)
    for i in range(bm.shape[0]):
        for r in range(bm.shape[1]):
            taken = bm[i, r].clone()
            taken[top1[i, r]] = False
            if taken.any():
                worst = value[i, r][taken].min()
                better = (~bm[i, r]) & (value[i, r] > worst) & (area[i, r] > 0)
                assert not better.any(), (i, r)
    assert not (bm & (ks == 0)[:, None, :] & ~torch.zeros_like(bm).scatter_(-1, top1, True)).any()


def test_ear_select_edge_cases():
    log_err, scores, qs, ks = _route_inputs(seed=1)
    assert ear_select(log_err, scores, qs, ks, top_p=1.0, min_kc_ratio=0.1).all()
    bm = ear_select(log_err, scores, qs, ks, top_p=0.9, min_kc_ratio=0.1, target_density=0.3)
    area = qs[..., None].double() * ks[:, None, :].double()
    density = (area * bm).sum((-1, -2)) / (qs.sum(-1) * ks.sum(-1)).double()
    assert (density >= 0.3 - 1e-9).all() and (density <= 0.3 + area.amax((-1, -2)) / area.sum((-1, -2)) * 2).all()
    # Doubling a block's error moves it ahead of an equal-cost block.
    le = torch.zeros(1, 1, 3)
    sc = torch.tensor([[[0.5, 0.25, 0.25]]])
    ones = torch.ones(1, 1, dtype=torch.long)
    k3 = torch.tensor([[4, 4, 4]])
    le[..., 2] = 1.0
    bm = ear_select(le, sc, ones, k3, top_p=0.4, min_kc_ratio=0.0, guaranteed_ratio=0.0)
    # budget: clusters 0 and 1 (mass before cluster 1 = 0.5 > 0.4 -> only cluster 0): 4 pairs -> the best value
    assert bm.tolist() == [[[False, False, True]]]


# -------------------------------------------------------------------------------------------- SVG-EAR method


def test_svg_ear_output_is_the_compensated_formula_of_its_layout():
    q, k, v = _qkv()
    m = build_method("svg_ear", top_p=0.6, layout_every=2, **SMALL)  # layout_every keeps the layout to inspect
    st = MethodState()
    ctx = _ctx(st)
    out = m(q, k, v, ctx)
    lay = st.cluster_state(*ctx.site()).layout
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay), rtol=2e-5, atol=2e-5)
    row = st.resolved_records()[-1]
    assert row["method"] == "svg_ear" and row["lse"] == "torch" and row["compensation"] == "torch"
    assert 0 < row["density"] < 1 and row["layout_reused"] is False


def test_svg_ear_top_p_one_is_dense_and_text_is_exact():
    t = 5
    q, k, v = _qkv(text=t)
    tm = torch.ones(1, t, dtype=torch.bool)
    tm[0, 3:] = False
    ctx = _ctx(text=t, text_mask=tm)
    dense = attention_mod.dense_attention(q, k, v, num_text_tokens=t, text_mask=tm)
    out = build_method("svg_ear", top_p=1.0, **SMALL)(q, k, v, ctx)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    out = build_method("svg_ear", top_p=0.5, **SMALL)(q, k, v, _ctx(text=t, text_mask=tm))
    torch.testing.assert_close(out[:, :, SV:], dense[:, :, SV:], rtol=1e-5, atol=1e-5)


def test_svg_ear_beats_svg2_dropping_at_equal_density():
    q, k, v = clustered_qkv(b=1, h=2, s=512, d=64, clusters=10, seed=4)
    ref = F.scaled_dot_product_attention(q, k, v)
    rel = lambda o: ((o - ref).norm() / ref.norm()).item()  # noqa: E731
    kw = dict(num_q_centroids=16, num_k_centroids=32, kmeans_iters_init=10, target_density=0.15, **SPARSE)
    ear = build_method("svg_ear", **kw)(q, k, v, _ctx())
    drop = build_method("svg2", **kw)(q, k, v, _ctx())
    assert rel(ear) < rel(drop)


def test_svg_ear_refusals():
    with pytest.raises(ValueError, match="always compensates"):
        build_method("svg_ear", compensate=False)
    with pytest.raises(ValueError, match="always compensates"):
        build_method("svg_ear", cfg=SVG2Config())  # a plain SVG2Config drops: say so, don't guess
    with pytest.raises(ValueError, match="gamma"):
        build_method("svg_ear", gamma=-1.0)
    with pytest.raises(ValueError, match="guaranteed_ratio"):
        build_method("svg_ear", guaranteed_ratio=1.5)
    d = build_method("svg_ear").describe()
    assert d["compensate"] is True and d["gamma"] == 1.0 and d["guaranteed_ratio"] == 0.05


# ------------------------------------------------------------------------------------------------ sol_attn


def test_select_threshold_units_of_the_uniform_share():
    scores = torch.tensor([[[0.5, 0.3, 0.2, 0.0]]])
    sizes = torch.tensor([[8, 8, 8, 0]])  # 3 live blocks: uniform share 1/3
    assert select_threshold(scores, sizes, 1.0, 0.0).tolist() == [[[True, False, False, False]]]
    assert select_threshold(scores, sizes, 0.6, 0.0).tolist() == [[[True, True, True, False]]]
    assert select_threshold(scores, sizes, 10.0, 0.0).tolist() == [[[True, False, False, False]]]  # >= 1 block
    assert select_threshold(scores, sizes, 10.0, 0.5).tolist() == [[[True, True, False, False]]]


def test_sol_attn_compensates_block_means():
    q, k, v = _qkv(seed=2)
    m = build_method("sol_attn", block_size=8, **SPARSE)
    st = MethodState()
    out = m(q, k, v, _ctx(st))
    lay = m.layout(q, k, v, _ctx())
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay), rtol=2e-5, atol=2e-5)
    row = st.resolved_records()[-1]
    assert row["lse"] == "torch" and 0 < row["density"] < 1
    m2 = build_method("sol_attn", block_size=8, target_density=0.3, **SPARSE)
    assert m2.layout(q, k, v, _ctx()).density() == pytest.approx(0.3, abs=0.1)
    with pytest.raises(ValueError, match="always compensates"):
        build_method("sol_attn", compensate=False)
    with pytest.raises(ValueError, match="threshold"):
        build_method("sol_attn", threshold=-1.0)


# ---------------------------------------------------------------------------- options on every block method

BLOCK_METHODS = {
    "positional": dict(block_size=8, top_p=0.6),
    "svg1": dict(block_size=8, num_sampled_rows=16),
    "radial": dict(block_size=4),
    "sliding_tile": dict(tile_size=(1, 2, 2), window=(3, 1, 1)),
    "oracle": dict(partition="raster", block_size=4, target_density=0.3),
}


@pytest.mark.parametrize("name", list(BLOCK_METHODS))
def test_block_methods_compensate_with_current_block_means(name):
    q, k, v = _qkv(seed=3)
    m = build_method(name, compensate=True, **SPARSE, **BLOCK_METHODS[name])
    out = m(q, k, v, _ctx())
    lay = m.layout(q, k, v, _ctx())
    torch.testing.assert_close(out.double(), compensated_reference(q, k, v, lay), rtol=2e-5, atol=2e-5)
    assert m.describe()["compensate"] is True


@pytest.mark.parametrize("name", ["svg2", "positional", "svg_ear"])
def test_compensate_with_nothing_skipped_equals_dense(name):
    q, k, v = _qkv(seed=4)
    kw = dict(SMALL, top_p=1.0) if name != "positional" else dict(block_size=8, top_p=1.0, **SPARSE)
    kw = kw if name == "svg_ear" else {**kw, "compensate": True}
    out = build_method(name, **kw)(q, k, v, _ctx())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_nonsensical_combinations_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="computes every key exactly"):
        build_method("dense", compensate=True)
    with pytest.raises(ValueError, match="no sparse layout"):
        build_method("dense", layout_every=2)
    for name in ("radial", "sliding_tile"):
        with pytest.raises(ValueError, match="depends only on\\s+the video geometry"):
            build_method(name, layout_every=2)
    with pytest.raises(ValueError, match="dense\\s+attention at more than dense cost"):
        build_method("positional", block_size=1, compensate=True)
    with pytest.raises(ValueError, match="dense\\s+attention at more than dense cost"):
        build_method("oracle", partition="raster", block_size=1, compensate=True)
    with pytest.raises(ValueError, match="layout_every"):
        build_method("positional", layout_every=0)
    with pytest.raises(ValueError, match="layout_every"):
        build_method("svg2", layout_every=0)
    build_method("positional", block_size=1)  # one-token blocks without compensation stay allowed
    build_method("dense", compensate=False, layout_every=1)  # neutral values are fine


@pytest.mark.parametrize("every", [2, 3])
def test_block_method_layout_every_counts_layout_calls(monkeypatch, every):
    m = build_method("positional", block_size=8, top_p=0.6, layout_every=every, compensate=True, **SPARSE)
    calls = []
    real = m.layout_and_info
    monkeypatch.setattr(m, "layout_and_info", lambda *a: calls.append(1) or real(*a))
    st = MethodState()
    for step in range(6):
        q, k, v = _qkv(seed=step)
        m(q, k, v, _ctx(st, step=step))
    assert len(calls) == len(range(0, 6, every))
    assert [r["layout_reused"] for r in st.resolved_records()] == [i % every != 0 for i in range(6)]


def test_svg2_and_svg_ear_layout_every_count_kmeans(monkeypatch):
    calls = []
    real = attention_mod.kmeans
    monkeypatch.setattr(attention_mod, "kmeans", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for name in ("svg2", "svg_ear"):
        calls.clear()
        m = build_method(name, layout_every=2, compensate=True, **SMALL)
        st = MethodState()
        for step in range(5):
            q, k, v = _qkv(seed=step)
            m(q, k, v, _ctx(st, step=step))
            m(q, k, v, _ctx(st, step=step, branch="uncond"))  # its own site: its own layout
        assert len(calls) == 2 * 2 * 3, name  # (Q and K) x 2 branches x steps 0, 2, 4
        rows = st.resolved_records()
        assert [r["layout_reused"] for r in rows if r["branch"] == "cond"] == [False, True, False, True, False]
