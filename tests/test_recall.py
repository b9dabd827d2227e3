"""analysis.recall: attention recall / output error vs density, the Q/K/V recorder, sweeps and the plot."""

from __future__ import annotations

import math

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
from svg2.methods import AttentionContext, MethodState, build_method

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
    ora = build_method("oracle", block_size=8, target_density=0.25, **SPARSE)
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
    for name in ("svg2", "svg1", "positional", "radial", "sliding_tile", "oracle"):
        assert name in out
    assert (tmp_path / "r.png").exists() and (tmp_path / "r.csv").read_text().count("\n") == 1 + 7 * 2


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
