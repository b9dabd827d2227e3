"""LTX-Video (``LTXVideoTransformer3DModel``): our processor on every block's self-attention ``attn1``.

Cross-attention ``attn2`` keeps the stock processor. The processor repeats diffusers' ``LTXVideoAttnProcessor``
math (RMS QK-norm across heads, then RoPE on the flat projections, using diffusers' own ``apply_rotary_emb``)
and hands the core attention to the method. LTX pipelines batch both CFG branches (``cond_uncond``): every
sample of the batch gets its own clusters. Guarded by the dense-parity test.
"""

from __future__ import annotations

import torch

from svg2.integrations.handle import SVG2ProcessorBase, model_config

__all__ = ["SVG2LTXVideoAttnProcessor", "ltx_self_attention_sites", "ltx_video_shape"]


class SVG2LTXVideoAttnProcessor(SVG2ProcessorBase):
    """Self-attention processor for ``LTXAttention`` (``attn1``); anything else goes to the stock processor."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        hidden_states = self.core(query, key, value, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def ltx_self_attention_sites(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) for every self-attention of an LTXVideoTransformer3DModel."""
    return [(i, block.attn1) for i, block in enumerate(transformer.transformer_blocks)]


def ltx_video_shape(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) in tokens: LTX gets packed latents (B, S, C) and the latent grid as keywords."""
    if not all(isinstance(kwargs.get(k), int) for k in ("num_frames", "height", "width")):
        return None
    cfg = model_config(transformer)
    p, pt = int(cfg.patch_size or 1), int(cfg.patch_size_t or 1)
    return (kwargs["num_frames"] // pt, kwargs["height"] // p, kwargs["width"] // p)
