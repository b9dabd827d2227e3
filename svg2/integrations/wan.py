"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): our processor on every block's self-attention ``attn1``.

Cross-attention ``attn2`` (text, and the I2V image context) keeps the stock processor. The processor repeats
diffusers' ``WanAttnProcessor`` math (fused or separate QKV projections, RMS QK-norm across heads,
interleaved RoPE) and hands the core attention to the method. Guarded by the dense-parity test.
"""

from __future__ import annotations

import torch

from svg2.integrations.handle import SVG2ProcessorBase, latent_input, model_config

__all__ = ["SVG2WanAttnProcessor", "wan_self_attention_sites", "wan_video_shape"]


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Same as the closure in diffusers' WanAttnProcessor (pairs (0,1), (2,3), ... rotated).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SVG2WanAttnProcessor(SVG2ProcessorBase):
    """Self-attention processor for ``WanAttention`` (``attn1``). Anything that is not plain self-attention
    (encoder states or a mask given) goes to the stock processor unchanged."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        # (batch, seqlen, heads, headdim); under context parallelism a sequence shard (svg2.parallel.ulysses)
        hidden_states = self.core(query, key, value, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def wan_self_attention_sites(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) for every self-attention of a WanTransformer3DModel."""
    return [(i, block.attn1) for i, block in enumerate(transformer.blocks)]


def wan_video_shape(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) in tokens from the latents (B, C, F, H, W) and the (t, h, w) patch size."""
    hs = latent_input(args, kwargs)
    if hs is None or hs.dim() != 5:
        return None
    pt, ph, pw = (int(x) for x in model_config(transformer).patch_size)
    f, h, w = hs.shape[2:]
    return (f // pt, h // ph, w // pw)
