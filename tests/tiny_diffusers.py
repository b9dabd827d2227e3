"""Tiny randomly initialised diffusers models built from configs (nothing downloaded), for integration tests."""

from __future__ import annotations

import torch

from svg2 import SVG2Config

# Small clusters so that the tiny sequences (a few hundred video tokens) are really clustered.
TINY_CFG = SVG2Config(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, dense_steps_frac=0.0,
                      dense_layers=0)


def tiny_wan(num_layers: int = 3, i2v: bool = False, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    extra = dict(image_dim=8, added_kv_proj_dim=32) if i2v else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32, **extra,
    ).eval()


def wan_inputs(batch: int = 1, frames: int = 4, size: int = 16, text_len: int = 7, seed: int = 1, i2v=False):
    """Kwargs of a WanTransformer3DModel forward: frames * (size/2)^2 video tokens (256 by default)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500.0),
        # Wan I2V's stock processor takes the last 512 context tokens as text.
        encoder_hidden_states=torch.randn(batch, 512 if i2v else text_len, 16, generator=g),
        return_dict=False,
    )
    if i2v:
        kw["encoder_hidden_states_image"] = torch.randn(batch, 5, 8, generator=g)
    return kw


def tiny_hunyuan(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()


def hunyuan_inputs(batch: int = 2, frames: int = 4, size: int = 16, text_len: int = 12, real=(12, 5), seed=1):
    """Text padded at the end: sample i has real[i] real text tokens out of text_len."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for i in range(batch):
        mask[i, : real[i % len(real)]] = 1
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g),
        guidance=torch.full((batch,), 6000.0),
        return_dict=False,
    )
