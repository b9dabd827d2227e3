"""The dense_floor method (the report's noise floor): exact attention through torch SDPA's math backend in
float32, chunked over queries; one tiny harness sweep of dense + dense_floor + svg2 shows it as the floor row."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from analysis.tables import summarise, to_markdown
from svg2.harness.runner import method_spec, run_job
from svg2.harness.schema import register_configs
from svg2.harness.store import load_results
from svg2.methods import method_class
from svg2.methods.base import AttentionContext

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

TINY = ["model=tiny", "prompts.limit=1", "model.num_steps=2", "model.num_frames=5", "model.height=32",
        "model.width=32", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4", "metrics=fast",
        "progress=false"]


def _reference(q, k, v, keep, scale):
    """Masked softmax attention in float64."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())


def test_floor_is_exact_attention_in_the_input_dtype():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 16, dtype=torch.bfloat16) for _ in range(3))
    text_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # padded text keys
    ctx = AttentionContext(num_text_tokens=6, text_mask=text_mask, scale=0.25)
    floor = method_class("dense_floor")
    out = floor()(q, k, v, ctx)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    keep = torch.ones(2, 70, dtype=torch.bool)
    keep[:, -6:] = text_mask
    ref = _reference(q, k, v, keep, 0.25)
    # float32 math: the only error left is the final rounding to bfloat16 (half an ulp, 2^-9 relative).
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(floor(query_chunk=9)(q, k, v, ctx), out)  # chunks over queries: exact
    assert ctx.state.resolved_records()[0] == {"method": "dense_floor", "layer": 0, "step": 0, "branch": "cond",
                                               "density": 1.0, "dense": True}


def test_floor_chunk_is_sized_from_the_score_budget():
    floor = method_class("dense_floor")()
    q = torch.zeros(1, 12, 100_000, 8)
    assert floor._chunk(q, q) == (512 * 2**20) // (12 * 100_000 * 4)
    with pytest.raises(ValueError, match="query_chunk=-1: use a whole number"):
        method_class("dense_floor")(query_chunk=-1)
    with pytest.raises(ValueError, match="backend='flash' is unknown"):
        method_class("dense_floor")(backend="flash")


def test_floor_backend_resolution():
    floor = method_class("dense_floor")
    assert floor().resolved_backend(torch.device("cpu")) == "math"
    assert floor().resolved_backend(torch.device("cuda")) == "efficient"  # no score matrix, no chunks
    assert floor(backend="math").resolved_backend(torch.device("cuda")) == "math"
    with pytest.raises(ValueError, match="needs a CUDA device.*backend='math'"):
        floor(backend="efficient").resolved_backend(torch.device("cpu"))


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides)


def test_floor_row_in_a_tiny_sweep(tmp_path):
    store = tmp_path / "results"
    cache = f"cache.dir={tmp_path / 'cache'}"
    for m in ("dense", "dense_floor", "svg2"):
        cfg = _compose([*TINY, f"method={m}", cache])
        assert run_job(cfg, store)["ok"] == 1, m
    spec = method_spec(_compose([*TINY, "method=dense_floor", cache]))
    assert spec.kwargs == {"backend": "auto"} and not spec.stock  # the SVG2 knobs are not its own: one row per sweep
    s = summarise(load_results(store))
    floor = s[s["method"] == "dense_floor"].iloc[0]
    assert floor["is_floor"] and floor["group"] == "floor" and floor["variant"] == "Dense floor (fp32 SDPA)"
    assert floor["density"] == 1.0 and floor["psnr"] > 40  # the same video through another exact path
    assert s["variant"].tolist()[:2] == ["Dense", "Dense floor (fp32 SDPA)"]
    assert "Dense floor: the same dense video" in to_markdown(s)
