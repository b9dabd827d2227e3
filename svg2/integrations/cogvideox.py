"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): our processor on every block's joint attention ``attn1``.

CogVideoX attends text and video jointly, text tokens *first*. Our core takes joint text as trailing tokens, so
the processor orders the sequence video-then-text for the method and splits the output back. It repeats
diffusers' ``CogVideoXAttnProcessor2_0`` math (per-head LayerNorm QK-norm, RoPE on the video part through
diffusers' own ``apply_rotary_emb``). CogVideoX masks no text token (its T5 padding is attended), so neither do
we. Its pipelines batch both CFG branches (``cond_uncond``). Guarded by the dense-parity test.
"""

from __future__ import annotations

import torch

from svg2.integrations.handle import SVG2ProcessorBase, latent_input, model_config

__all__ = ["SVG2CogVideoXAttnProcessor", "cogvideox_self_attention_sites", "cogvideox_video_shape"]


class SVG2CogVideoXAttnProcessor(SVG2ProcessorBase):
    """Joint text+video attention processor for CogVideoX's ``attn1``; returns (video, text) like the stock one."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if attention_mask is not None or attn.is_cross_attention:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        # video first, text last: the order svg2's joint-text attention expects
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        b = x.shape[0]
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = key.shape[-1] // attn.heads
        # (batch, heads, seqlen, headdim) for the per-head norms and RoPE, as the stock processor does
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        sv = x.shape[1] - text_len
        if image_rotary_emb is not None:
            query = torch.cat([apply_rotary_emb(query[:, :, :sv], image_rotary_emb), query[:, :, sv:]], dim=2)
            key = torch.cat([apply_rotary_emb(key[:, :, :sv], image_rotary_emb), key[:, :, sv:]], dim=2)
        out = self.core(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), num_text_tokens=text_len)
        out = out.reshape(b, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        video, text = out.split([sv, text_len], dim=1)
        return video, text


def cogvideox_self_attention_sites(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) for every joint attention of a CogVideoXTransformer3DModel."""
    return [(i, block.attn1) for i, block in enumerate(transformer.transformer_blocks)]


def cogvideox_video_shape(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) in tokens from the latents (B, F, C, H, W); 1.5 pads frames to patch_size_t."""
    hs = latent_input(args, kwargs)
    if hs is None or hs.dim() != 5:
        return None
    cfg = model_config(transformer)
    p, pt = int(cfg.patch_size), int(cfg.patch_size_t or 1)
    f, h, w = hs.shape[1], hs.shape[3], hs.shape[4]
    return (-(-f // pt), h // p, w // p)
