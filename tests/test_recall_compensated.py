"""Recall / output error of the compensated rules (SVG2 compensated, SVG-EAR) at matched density, on CPU, tiny."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.recall import (
    MethodSpec,
    attention_recall,
    compensates,
    method_layout,
    method_output,
    recall_sweep,
    sample_rows,
    shared_kmeans,
)
from analysis.synthetic import synthetic_qkv
from svg2.attention_structure import BOUND, head_stats
from svg2.methods import AttentionContext, MethodState, build_method

SHAPE = (4, 8, 8)  # 256 video tokens
CQ, CK = 8, 16
DENSITIES = (0.10, 0.15, 0.25)


def _qkv():
    return synthetic_qkv(SHAPE, ("spatial", "temporal", "semantic", "random"), head_dim=32, seed=3)


def _ctx() -> AttentionContext:
    return AttentionContext(layer_index=1, step_index=15, num_steps=30, state=MethodState())


def _pair_tolerance(layout) -> float:
    """The largest cluster pair's share of the token pairs: both rules overshoot a target by at most one pair."""
    area = layout.q_sizes[..., :, None] * layout.k_sizes[..., None, :]
    return float((area.amax((-1, -2)) / (layout.q_sizes.sum(-1) * layout.k_sizes.sum(-1))).max())


def test_matched_density_rows_of_the_compensated_rules():
    from experiments.testbed_structure import head_type_recall, matched_markdown, matched_table, recall_specs

    q, k, v = _qkv()
    stats = head_stats(q, k, SHAPE, num_rows=64)
    recs = [dict(q=q, k=k, v=v, layer=2, step=15, num_steps=30, stats=stats, video_shape=SHAPE)]
    rows = []
    for dn in DENSITIES:
        specs = recall_specs(dn, CQ, CK, 16, ("svg2", "svg2_compensated", "svg_ear"), 0.05)
        assert [s.label for s in specs] == ["svg2", "svg2_compensated", "svg_ear"]
        rows += [dict(r, target=dn) for r in head_type_recall(recs, specs, density=dn, num_rows=96, seed=1,
                                                               share_clusters=True)]
    methods = [r for r in rows if r["method"] != BOUND]
    assert len(methods) == 3 * 3 * 4  # rules x densities x heads
    for r in methods:
        assert 0.0 <= r["recall"] <= 1.0 + 1e-9
        assert r["rel_error"] >= 0.0 and math.isfinite(r["rel_error"])  # > 1 where o_ref is small (random head)
        assert r["compensated"] == (r["method"] != "svg2")
        assert "head_type" in r
    # measured densities at the targets (one cluster pair of overshoot at most), the same for both rules
    lay = method_layout(build_method("svg2", num_q_centroids=CQ, num_k_centroids=CK, target_density=0.1,
                                     min_kc_ratio=0.05), q, k, v, _ctx())
    tol = _pair_tolerance(lay)
    table = matched_table(rows)
    assert {(t["target"], t["method"]) for t in table} == {(d, m) for d in DENSITIES
                                                          for m in ("svg2", "svg2_compensated", "svg_ear")}
    for t in table:
        assert abs(t["density"] - t["target"]) <= tol + 1e-9, t
        assert 0.0 <= t["bound_at_target"] <= 1.0 + 1e-9
    by = {(t["target"], t["method"]): t for t in table}
    for dn in DENSITIES:  # compensation keeps the same pairs (same recall) and lowers the error
        assert by[(dn, "svg2_compensated")]["recall"] == pytest.approx(by[(dn, "svg2")]["recall"])
        assert by[(dn, "svg2_compensated")]["rel_error"] < by[(dn, "svg2")]["rel_error"]
    md = matched_markdown(matched_table(rows, "head_type"), "head_type")
    assert md[0].startswith("| head_type | target | rule |") and len(md) == 2 + len(matched_table(rows, "head_type"))


def test_own_output_error_matches_masked_softmax_without_compensation_and_clusters_are_shared():
    q, k, v = _qkv()
    rows = sample_rows(q.shape[2], 64, 0)
    kw = dict(num_q_centroids=CQ, num_k_centroids=CK, target_density=0.15, min_kc_ratio=0.05,
              dense_steps_frac=0.0, dense_layers=0)
    dropped = build_method("svg2", **kw)
    assert not compensates(dropped) and compensates(build_method("svg2", compensate=True, **kw))
    assert compensates(build_method("svg_ear", num_q_centroids=CQ, num_k_centroids=CK, target_density=0.15))
    with shared_kmeans() as cache:
        lay = method_layout(dropped, q, k, v, _ctx())
        out = method_output(dropped, q, k, v, _ctx())  # the method's own sparse call, same clusters
        ear = build_method("svg_ear", num_q_centroids=CQ, num_k_centroids=CK, target_density=0.15,
                           dense_steps_frac=0.0, dense_layers=0)
        ear_lay = method_layout(ear, q, k, v, _ctx())
        assert len(cache) == 2  # one Q and one K clustering served every call
    assert torch.equal(lay.q_labels, ear_lay.q_labels) and torch.equal(lay.k_labels, ear_lay.k_labels)
    own = attention_recall(q, k, v, lay, rows=rows, output=out)
    masked = attention_recall(q, k, v, lay, rows=rows)
    assert torch.allclose(own.rel_error, masked.rel_error, atol=1e-4)
    assert torch.equal(own.recall, masked.recall)
    # sharing the clustering changes nothing (k-means is deterministic under its seed)
    specs = [MethodSpec("svg_ear", "svg_ear", dict(num_q_centroids=CQ, num_k_centroids=CK, target_density=0.15))]
    rec = [dict(q=q, k=k, v=v)]
    a = recall_sweep(rec, specs, num_rows=64, share_clusters=True)
    b = recall_sweep(rec, specs, num_rows=64, share_clusters=False)
    assert [(x["recall"], x["rel_error"], x["density"]) for x in a] == [(x["recall"], x["rel_error"], x["density"])
                                                                         for x in b]
    with pytest.raises(ValueError, match="dense"):
        method_output(build_method("svg2", compensate=True, num_q_centroids=CQ, num_k_centroids=CK),
                      q, k, v, AttentionContext(layer_index=0, step_index=0, num_steps=30, state=MethodState()))
