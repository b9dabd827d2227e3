"""enable_svg2 on a tiny random LTXVideoTransformer3DModel (CPU, fp32): parity with the stock processor,
top_p = 1 equals dense, sparse defaults, geometry for geometric baselines, remove()."""

from __future__ import annotations

import pytest
import torch

from svg2 import SVG2Config, enable_svg2

CFG = SVG2Config(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, dense_steps_frac=0.0, dense_layers=0)


def tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=16,
    ).eval()


def ltx_inputs(batch=1, frames=3, height=8, width=8, text_len=6):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=torch.randn(batch, frames * height * width, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_attention_mask=mask,
        num_frames=frames, height=height, width=width, return_dict=False,
    )


def _run(m, **kw):
    with torch.no_grad():
        return m(**kw)[0]


def test_dense_parity_top_p_one_and_sparse_defaults():
    m = tiny_ltx()
    inputs = ltx_inputs()
    ref = _run(m, **inputs)
    stock2 = [b.attn2.processor for b in m.transformer_blocks]
    with enable_svg2(m, method="dense", num_steps=1):
        assert [b.attn2.processor for b in m.transformer_blocks] == stock2  # cross-attention stays stock
        torch.testing.assert_close(_run(m, **inputs), ref, rtol=0, atol=1e-6)
    with enable_svg2(m, CFG, num_steps=1, top_p=1.0, min_kc_ratio=1.0) as h:
        torch.testing.assert_close(_run(m, **inputs), ref, rtol=1e-5, atol=1e-5)
        assert h.tracker.video_shape == (3, 8, 8)
    with enable_svg2(m, CFG, num_steps=1) as h:
        out = _run(m, **inputs)
        assert h.stats()["mean_sparse_density"] < 1.0
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    torch.testing.assert_close(_run(m, **inputs), ref, rtol=0, atol=0)  # removed: stock again, bit-identical


@pytest.mark.parametrize("method,kwargs", [("sliding_tile", dict(tile_size=(1, 4, 4), window=(1, 1, 1)))])
def test_geometric_baseline_inside_ltx(method, kwargs):
    m = tiny_ltx()
    with enable_svg2(m, method=method, num_steps=1, dense_steps_frac=0.0, dense_layers=0, **kwargs) as h:
        out = _run(m, **ltx_inputs(batch=2))
        assert all(r["density"] < 1.0 for r in h.records())
    assert torch.isfinite(out).all()
