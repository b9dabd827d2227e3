"""analysis.recall: attention recall / output error vs density, the Q/K/V recorder, sweeps and the plot."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.recall import (
    MethodSpec,
    QKVRecorder,
    RecordingMethod,
    attention_recall,
    load_qkv_records,
    main,
    method_layout,
    plot_recall,
    recall_sweep,
    sample_rows,
    summarize,
)
from analysis.synthetic import synthetic_qkv
from svg2.attention import dense_attention
from svg2.attention_structure import BOUND, HeadStats, classify_heads, head_stats, recall_bound
from svg2.methods import AttentionContext, MethodState, build_method
from svg2.synthetic import VideoShape, clustered_qkv
from svg2.testbed.structure import head_type_markdown, summarize_by

SHAPE = (4, 4, 4)
SV = math.prod(SHAPE)
SPARSE = dict(dense_steps_frac=0.0, dense_layers=0)


def _ctx(**kw):
    return AttentionContext(state=MethodState(), extra={"video_shape": SHAPE}, **kw)


def test_dense_and_full_layouts_have_full_recall():
    q, k, v = synthetic_qkv(SHAPE, ("spatial", "semantic"), head_dim=16)
    res = attention_recall(q, k, v, None)
    assert torch.all(res.recall == 1) and torch.all(res.rel_error == 0)
    full = build_method("positional", block_size=4, top_p=1.0, **SPARSE).layout(q, k, v, _ctx())
    res = attention_recall(q, k, v, full, num_rows=None)
    torch.testing.assert_close(res.recall, torch.ones_like(res.recall))
    assert float(res.rel_error.max()) < 1e-12 and float(res.density.min()) == 1.0


def test_recall_and_error_match_a_direct_computation():
    q, k, v = synthetic_qkv(SHAPE, ("spatial", "temporal"), head_dim=16, num_text_tokens=3, seed=4)
    text_mask = torch.tensor([[True, False, True]])
    ctx = _ctx(num_text_tokens=3, text_mask=text_mask)
    method = build_method("sliding_tile", tile_size=(1, 2, 2), window=(1, 1, 3), **SPARSE)
    layout = method.layout(q, k, v, ctx)
    rows = sample_rows(SV, 20, seed=1)
    res = attention_recall(q, k, v, layout, rows=rows, num_text_tokens=3, text_mask=text_mask)
    mask = layout.to_dense()[:, :, rows]  # (B, H, r, S) with text columns
    real = torch.ones(q.shape[2], dtype=torch.bool)
    real[SV:] = text_mask[0]
    p = torch.softmax((q[:, :, rows] @ k.transpose(-1, -2) / 4.0).masked_fill(~real, float("-inf")), -1)
    torch.testing.assert_close(res.recall.float(), (p * mask).sum(-1).mean(-1))
    # The output error is the error of the method's actual output on those rows.
    out = method(q, k, v, _ctx(num_text_tokens=3, text_mask=text_mask))[:, :, rows]
    ref = dense_attention(q, k, v, num_text_tokens=3, text_mask=text_mask)[:, :, rows]
    err = (out - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1)
    torch.testing.assert_close(res.rel_error.float(), err, atol=1e-5, rtol=1e-4)


def test_oracle_beats_positional_blocks_on_semantic_heads():
    q, k, v = synthetic_qkv((4, 8, 8), ("semantic", "spatial"), head_dim=16, seed=5)
    pos = build_method("positional", block_size=8, target_density=0.25, **SPARSE)
    ora = build_method("oracle_raster", block_size=8, target_density=0.25, **SPARSE)
    r_pos = attention_recall(q, k, v, method_layout(pos, q, k, v, _ctx()))
    r_ora = attention_recall(q, k, v, method_layout(ora, q, k, v, _ctx()))
    assert torch.all(r_ora.recall >= r_pos.recall - 1e-9)


def test_recorder_saves_selected_calls_only(tmp_path):
    q, k, v = synthetic_qkv(SHAPE, ("spatial", "temporal", "semantic"), head_dim=16)
    rec = QKVRecorder(tmp_path / "qkv", layers=[1], steps=[2, 3], branches=["cond"], heads=[0, 2])
    method = RecordingMethod(build_method("dense"), rec)
    for layer in range(3):
        for step in range(4):
            for branch in ("cond", "uncond"):
                ctx = _ctx(layer_index=layer, step_index=step, num_steps=4, branch=branch)
                torch.testing.assert_close(method(q, k, v, ctx), dense_attention(q, k, v))
    assert [p.name for p in rec.written] == ["qkv_L001_S002_cond.pt", "qkv_L001_S003_cond.pt"]
    records = list(load_qkv_records(tmp_path / "qkv"))
    assert len(records) == 2
    r0 = records[0]
    assert r0["q"].dtype == torch.float16 and tuple(r0["q"].shape) == (1, 2, SV, 16)
    assert r0["heads"] == [0, 2] and r0["layer"] == 1 and r0["step"] == 2 and r0["video_shape"] == SHAPE
    torch.testing.assert_close(r0["k"].float(), k[:, [0, 2]], atol=1e-2, rtol=1e-2)

    specs = [MethodSpec("svg1", "svg1", dict(block_size=8, density=0.3)),
             MethodSpec("svg2", "svg2", dict(num_q_centroids=4, num_k_centroids=8, kmeans_iters_init=5)),
             MethodSpec("dense", "dense", {})]
    rows = recall_sweep(records, specs, num_rows=32)
    assert len(rows) == 2 * 3 * 2  # records x specs x heads
    assert {r["head"] for r in rows} == {0, 2}
    summary = summarize(rows)
    dense = next(s for s in summary if s["method"] == "dense")
    assert dense["recall"] == 1.0 and dense["density"] == 1.0
    assert all(0 < s["recall"] <= 1 and 0 < s["density"] <= 1 for s in summary)
    path = plot_recall(rows, tmp_path / "plot" / "recall.png", title="test")
    assert path.exists() and path.stat().st_size > 1000


def test_cli_on_synthetic_heads(tmp_path, capsys):
    main(["--synthetic", "2,4,4", "--kinds", "spatial,temporal", "--head-dim", "16", "--densities", "0.3",
          "--block-size", "8", "--tile-size", "1,2,2", "--centroids", "4,8", "--num-rows", "16",
          "--out", str(tmp_path / "r.png"), "--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    for name in ("svg2", "svg1", "positional", "radial", "sliding_tile", "exact-score"):
        assert name in out
    # 7 methods and the bound at the one target density, 2 heads each
    assert (tmp_path / "r.png").exists() and (tmp_path / "r.csv").read_text().count("\n") == 1 + 8 * 2


def test_recorder_during_a_tiny_wan_generation(tmp_path):
    from svg2 import enable_svg2
    from svg2.harness.models import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    recorder = QKVRecorder(tmp_path, layers=[1], steps=[2], heads=[1])
    handle = enable_svg2(pipe, method=RecordingMethod(build_method("dense"), recorder))
    with torch.no_grad():
        pipe(prompt="a red ball", negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=3,
             guidance_scale=5.0, output_type="pt", max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert sorted(p.name for p in recorder.written) == ["qkv_L001_S002_cond.pt", "qkv_L001_S002_uncond.pt"]
    records = list(load_qkv_records(tmp_path))
    assert records[0]["q"].shape[:2] == (1, 1) and records[0]["num_steps"] == 3
    rows = recall_sweep(records, [MethodSpec("positional", "positional", dict(block_size=4, top_p=0.5))],
                        num_rows=16)
    assert len(rows) == 2 and all(0 < r["recall"] <= 1 for r in rows)


def test_recall_bound_is_the_top_k_mass_and_no_method_beats_it():
    q, k, v = synthetic_qkv(SHAPE, ("spatial", "temporal", "semantic", "random"), head_dim=16, num_text_tokens=3,
                            seed=2)
    text_mask = torch.tensor([[True, True, False]])
    ctx_kw = dict(num_text_tokens=3, text_mask=text_mask)
    for dens in (0.1, 0.25):
        bound = recall_bound(q, k, dens, **ctx_kw)
        # brute force: the top d * Sv^2 video pairs of the head, plus the (always kept) real text mass
        real = torch.ones(q.shape[2], dtype=torch.bool)
        real[SV:] = text_mask[0]
        scores = q[:, :, :SV].double() @ k.double().transpose(-1, -2) / 4.0
        p = torch.softmax(scores.masked_fill(~real, float("-inf")), -1)
        text_mass = p[..., SV:].sum((-1, -2))
        p = p[..., :SV]
        srt = p.flatten(2).sort(-1, descending=True).values
        whole = math.floor(dens * SV * SV)
        top = srt[..., :whole].sum(-1) + (dens * SV * SV - whole) * srt[..., whole]
        torch.testing.assert_close(bound.pooled, (text_mass + top) / SV)
        assert torch.all(bound.per_row <= bound.pooled + 1e-12)
        # every method at (at most) that density keeps at most the bound, head by head
        for name, kw in (("positional", dict(block_size=4, min_kc_ratio=0.0)), ("oracle_raster", dict(block_size=4)),
                         ("oracle_raster", dict(block_size=1)),
                         ("svg2", dict(num_q_centroids=8, num_k_centroids=16, min_kc_ratio=0.0)),
                         ("oracle_kmeans", dict(num_q_centroids=8, num_k_centroids=16))):
            layout = method_layout(build_method(name, target_density=dens, **SPARSE, **kw), q, k, v, _ctx(**ctx_kw))
            res = attention_recall(q, k, v, layout, num_rows=None, **ctx_kw)
            at = recall_bound(q, k, float(res.density.max()), **ctx_kw).pooled  # the bound at its own density
            assert torch.all(res.recall <= at + 1e-9), (name, kw, res.recall, at)
        # token-level greedy selection on exact weights reaches it (up to its mandatory best key per row)
        tok = build_method("oracle_raster", block_size=1, target_density=dens, **SPARSE)
        res = attention_recall(q, k, v, method_layout(tok, q, k, v, _ctx(**ctx_kw)), num_rows=None, **ctx_kw)
        assert torch.all(res.recall >= bound.pooled - 0.03)


def test_exact_score_raster_selection_is_not_an_upper_bound():
    """The old 'oracle' greedily maximises recall over raster blocks only: SVG2's clusters beat it on clustered
    heads at the same density, and the top-k bound stays above both."""
    shape = VideoShape(2, 4, 8, 12)
    q, k, v = clustered_qkv(shape, head_dim=32, dtype=torch.float32, seed=0, components=24)
    ctx = AttentionContext(state=MethodState(), extra={"video_shape": (4, 8, 12)})
    dens = 0.25
    raster = build_method("oracle_raster", block_size=16, target_density=dens, **SPARSE)
    svg2 = build_method("svg2", num_q_centroids=16, num_k_centroids=48, kmeans_iters_init=20, min_kc_ratio=0.0,
                        target_density=dens, **SPARSE)
    r_raster = attention_recall(q, k, v, method_layout(raster, q, k, v, ctx), num_rows=None)
    r_svg2 = attention_recall(q, k, v, method_layout(svg2, q, k, v, ctx), num_rows=None)
    assert abs(float(r_svg2.density.mean()) - dens) < 0.01 and abs(float(r_raster.density.mean()) - dens) < 0.01
    assert torch.all(r_svg2.recall > r_raster.recall + 0.2)
    assert torch.all(recall_bound(q, k, float(r_svg2.density.max())).pooled >= r_svg2.recall)
    with pytest.warns(FutureWarning, match="oracle_raster"):
        old = build_method("oracle", block_size=16, target_density=dens, **SPARSE)
    assert torch.equal(method_layout(old, q, k, v, ctx).block_map, method_layout(raster, q, k, v, ctx).block_map)


def test_classify_heads_by_concentration_locality_and_time():
    stats = HeadStats(top_mass=torch.tensor([0.2, 0.9, 0.9, 0.9, 0.6]),
                      outside_local=torch.tensor([0.1, 0.2, 0.8, 0.9, 0.7]),
                      outside_temporal=torch.tensor([0.9, 0.9, 0.1, 0.9, 0.3]))
    assert classify_heads(stats) == ["uniform", "local", "temporal", "content", "temporal"]
    assert classify_heads(HeadStats(stats.top_mass, stats.outside_local))[2] == "content"  # no temporal share
    with pytest.raises(ValueError, match="uniform_below"):
        classify_heads(stats, uniform_below=1.5)
    # measured on synthetic heads of known kind (local window: the own frame; the random head's top-15% mass
    # is 0.49 at 216 tokens, hence the higher uniform threshold)
    q, k, _ = synthetic_qkv((6, 6, 6), ("spatial", "temporal", "semantic", "random"), head_dim=32, seed=1)
    types = classify_heads(head_stats(q, k, (6, 6, 6), window=(0, 4, 4), num_rows=128), uniform_below=0.6)
    assert types == ["local", "temporal", "content", "uniform"]


def test_head_type_recall_tags_rows_with_head_types_and_bounds():
    from experiments.testbed_structure import head_type_recall

    q, k, v = synthetic_qkv((4, 6, 6), ("spatial", "temporal", "semantic", "random"), head_dim=32, seed=1)
    stats = head_stats(q, k, (4, 6, 6), window=(1, 1, 1), num_rows=64)
    recs = [dict(q=q, k=k, v=v, layer=3, stats=stats, video_shape=(4, 6, 6))]
    dens = 0.2
    specs = [MethodSpec("positional", "positional", dict(block_size=6, min_kc_ratio=0.0, target_density=dens)),
             MethodSpec("svg1", "svg1", dict(block_size=6, target_density=dens)),
             MethodSpec("oracle_kmeans", "oracle_kmeans", dict(num_q_centroids=6, num_k_centroids=12,
                                                                target_density=dens))]
    rows = head_type_recall(recs, specs, density=dens, num_rows=48, seed=5)
    assert len(rows) == 4 * 4  # (3 methods + bound) x 4 heads
    types = classify_heads(stats)
    assert all(r["head_type"] == types[r["head"]] for r in rows)
    bound = {r["head"]: r for r in rows if r["method"] == BOUND}
    assert all(b["rel_error"] is None and b["recall_row"] <= b["recall"] + 1e-12 for b in bound.values())
    for r in rows:  # the bound is measured on the same sampled rows: no exact-budget method exceeds it
        if r["method"] in ("positional", "oracle_kmeans"):
            assert r["recall"] <= recall_bound(q[:, r["head"]:r["head"] + 1], k[:, r["head"]:r["head"] + 1],
                                               r["density"], rows=sample_rows(q.shape[2], 48, 5)).pooled.item() + 1e-9
            assert r["recall"] <= bound[r["head"]]["recall"] + 0.02  # measured density within a block of 0.2
    table = summarize_by(rows, "head_type")
    assert set(table) == set(types)
    assert table[types[0]][BOUND]["rel_error"] is None and table[types[0]]["svg1"]["rel_error"] > 0
    md = head_type_markdown(rows)
    assert md[0].startswith("| head type | head calls | positional: recall / error @ density")
    assert md[0].endswith("bound: recall |")
    assert len(md) == 2 + len(set(types))
