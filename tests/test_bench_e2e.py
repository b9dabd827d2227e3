"""experiments/bench_e2e.py on CPU: the arithmetic (projection, limit, per-layer efficiency), per-layer timing of
enable_svg2(timing=True), the model registry (HunyuanVideo 720p at the authors' setting) and a --tiny smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from experiments import bench_e2e
from svg2 import enable_svg2
from svg2.bench_models import TRANSFORMERS, attention_layers, attention_shape, video_tokens
from svg2.e2e import layer_efficiency, limit_ms, per_layer, projection
from svg2.timing import ComponentTimer
from tests.tiny_diffusers import TINY_CFG, tiny_wan, wan_inputs

ROOT = Path(__file__).resolve().parents[1]


def test_timer_keeps_sections_per_tag():
    t = ComponentTimer()
    with t.tagged(3):
        with t.section("attention"):
            pass
        with t.section("attention"):
            pass
    with t.tagged(4), t.section("attention"):
        pass
    with t.section("kmeans"):  # untagged: in summary() only
        pass
    assert t.tag is None
    assert t.summary()["attention"]["calls"] == 3 and t.summary()["kmeans"]["calls"] == 1
    by = t.summary_by_tag()
    assert set(by) == {3, 4} and by[3]["attention"]["calls"] == 2 and "kmeans" not in by[3]
    assert per_layer(by, "attention", calls=2, layers=[3]) == {3: pytest.approx(by[3]["attention"]["total_ms"] / 2)}


def test_enable_timing_splits_per_layer():
    model = tiny_wan()
    with enable_svg2(model, TINY_CFG.replace(dense_layers=1), num_steps=1, timing=True) as h:
        with torch.no_grad():
            model(**wan_inputs())
        by = h.timer.summary_by_tag()
    assert set(by) == {0, 1, 2}
    assert "attention" not in by[0] and by[0]["site_call"]["calls"] == 1  # block 0 dense: the whole call only
    for layer in (1, 2):
        assert {"kmeans", "selection", "attention", "site_call"} <= set(by[layer])
        assert by[layer]["site_call"]["total_ms"] >= by[layer]["attention"]["total_ms"]


def test_projection_limit_and_efficiency():
    p = projection(100.0, 100.0, 60.0, 50.0, 0.1, calls_per_step=1)
    assert p["dense_steps"] == 5 and p["dense_s"] == pytest.approx(5.0)
    assert p["svg2_s"] == pytest.approx((5 * 100 + 60 + 44 * 50) / 1e3)
    assert projection(100, 100, 60, 50, 0.1, calls_per_step=2)["speedup"] == pytest.approx(p["speedup"])
    assert limit_ms(100.0, 60.0, 0.25) == pytest.approx(55.0)  # 40 ms outside attention + 0.25 x 60
    eff = layer_efficiency({1: 8.0, 2: 8.0, 0: 8.0}, {1: 4.0, 2: 2.0}, 0.25, measured_density={1: 0.5, 2: 0.25},
                           call_ms={1: 5.0, 2: 4.0})
    assert [r["layer"] for r in eff["layers"]] == [1, 2]
    assert [r["efficiency"] for r in eff["layers"]] == pytest.approx([0.5, 1.0])
    assert eff["mean"] == pytest.approx(0.75) and eff["min"] == pytest.approx(0.5) and eff["max"] == pytest.approx(1.0)
    assert eff["mean_measured"] == pytest.approx((1.0 + 1.0) / 2)
    assert eff["call_mean"] == pytest.approx((0.4 + 0.5) / 2)


def test_hunyuan_720p_is_the_real_size_at_the_authors_setting():
    spec = TRANSFORMERS["hunyuan720p"]
    preset = yaml.safe_load((ROOT / "conf/model/hunyuanvideo-t2v-720p.yaml").read_text())
    assert tuple(spec["clusters"]) == (preset["svg2"]["num_q_centroids"], preset["svg2"]["num_k_centroids"])
    assert {f for _, f in spec["scenarios"]} == {preset["svg2"]["dense_steps_frac"]}
    f, h, w = spec["latent"]  # 129 frames, 720 x 1280 through the 4x temporal / 8x spatial VAE
    assert (f, h, w) == ((preset["num_frames"] - 1) // 4 + 1, preset["height"] // 8, preset["width"] // 8)
    assert video_tokens(spec) == 118800 and attention_layers(spec) == 60
    assert attention_shape(spec) == (24, 118800 + 256, 128, 128)
    assert spec["calls_per_step"] == 1  # guidance-distilled: no CFG branch
    with torch.device("meta"):
        from diffusers import HunyuanVideoTransformer3DModel

        n = sum(p.numel() for p in HunyuanVideoTransformer3DModel(**spec["config"]).parameters())
    assert 12.5e9 < n < 13.2e9


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"e2e_{name}.json").read_text())


def test_tiny_smoke_eager(tmp_path):
    bench_e2e.main(["--tiny", "--out", str(tmp_path), "--repeats", "1", "--densities", "0.25"])
    md = (tmp_path / "e2e.md").read_text()
    assert "tiny HunyuanVideo" in md and "Attention efficiency per sparse layer" in md
    for name in ("tiny", "tiny_hunyuan"):
        r = _load(tmp_path, name)
        assert "error" not in r and r["output_finite"]
        assert 0 < r["attn_share"] and 0 < r["attn_share_in_model"]
        assert r["limit"]["0.25"] < r["dense_ms"]
        eff = r["svg2"]["0.25"]["attn_efficiency"]
        assert [row["layer"] for row in eff["layers"]] == [1]  # block 0 dense (dense_layers=1)
        assert eff["mean"] > 0
        assert all("limit_speedup" in p for p in r["projections"])
    assert _load(tmp_path, "tiny_hunyuan")["calls_per_step"] == 1


def test_tiny_smoke_compiled_has_no_graph_break(tmp_path):
    bench_e2e.main(["--tiny", "--out", str(tmp_path), "--repeats", "1", "--densities", "0.25", "--compile", "1",
                    "--compile-backend", "eager"])
    for name in ("tiny_compiled", "tiny_hunyuan_compiled"):
        r = _load(tmp_path, name)
        assert "error" not in r, r.get("error")
        assert r["svg2_graphs"]["graph_breaks"] == 0 and r["dense_graphs"]["graph_breaks"] == 0
        assert r["svg2"]["0.25"]["measured_density"] < 1


def test_tiny_smoke_cuda_graph_flag_on_cpu_runs_eagerly_and_says_why(tmp_path):
    bench_e2e.main(["--tiny", "--out", str(tmp_path), "--repeats", "1", "--densities", "0.25", "--cuda-graph"])
    for name, why in (("tiny", "not on a CUDA device"), ("tiny_hunyuan", "joint text tokens")):
        r = _load(tmp_path, name)
        assert "error" not in r, r.get("error")
        assert r["cuda_graph"] is True and r["svg2"]["0.25"]["measured_density"] < 1
        assert "capture" not in r["cuda_graph_events"] and r["cuda_graph_events"]["refused"] > 0
        assert len(r["cuda_graph_refusals"]) == 1 and why in r["cuda_graph_refusals"][0]
        assert "attn_efficiency" not in r["svg2"]["0.25"]  # no component timer with --cuda-graph
