"""enable_svg2 on a tiny random CogVideoXTransformer3DModel (CPU, fp32): joint text-first attention reordered
for svg2 (text trailing) matches the stock processor in dense mode and at top_p = 1; defaults are sparse."""

from __future__ import annotations

import pytest
import torch

from svg2 import SVG2Config, enable_svg2

CFG = SVG2Config(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, dense_steps_frac=0.0, dense_layers=0)


def tiny_cogvideox(rope: bool = True):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=7, use_rotary_positional_embeddings=rope, temporal_compression_ratio=4,
    ).eval()


def cog_inputs(batch=1, frames=3, size=16, text_len=7, rope=True):
    g = torch.Generator().manual_seed(1)
    kw = dict(
        hidden_states=torch.randn(batch, frames, 4, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long), return_dict=False,
    )
    if rope:
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        g2 = size // 2
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(16, ((0, 0), (g2, g2)), (g2, g2), frames)
    return kw


def _run(m, **kw):
    with torch.no_grad():
        return m(**kw)[0]


@pytest.mark.parametrize("rope", [True, False])
def test_dense_parity_and_top_p_one(rope):
    m = tiny_cogvideox(rope)
    inputs = cog_inputs(rope=rope)
    ref = _run(m, **inputs)
    with enable_svg2(m, method="dense", num_steps=1):
        torch.testing.assert_close(_run(m, **inputs), ref, rtol=1e-5, atol=1e-5)
    with enable_svg2(m, CFG, num_steps=1, top_p=1.0, min_kc_ratio=1.0) as h:
        torch.testing.assert_close(_run(m, **inputs), ref, rtol=1e-5, atol=1e-5)
        assert h.tracker.video_shape == (3, 8, 8)
    with enable_svg2(m, CFG, num_steps=1) as h:
        out = _run(m, **inputs)
        assert h.stats()["mean_sparse_density"] < 1.0
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    torch.testing.assert_close(_run(m, **inputs), ref, rtol=0, atol=0)
