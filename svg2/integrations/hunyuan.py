"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint video+text attention in every dual-stream and
single-stream block.

The sequence the attention sees is ``[video tokens, text tokens]``; text is padded at the end and the model
passes a boolean key mask ``(batch, 1, 1, seqlen)``. SVG2 clusters the video tokens only; text queries
attend densely, every video query attends to all real text keys, padded text keys are masked as in the
dense model. The token-refiner (text-only) attention keeps the stock processor. Layer indices: dual-stream
blocks 0..L-1, then single-stream blocks L..L+L'-1 (so ``dense_layers`` counts from the first block).
"""

from __future__ import annotations

import torch

from svg2.integrations.handle import SVG2ProcessorBase, latent_input, model_config

__all__ = ["SVG2HunyuanVideoAttnProcessor", "hunyuan_self_attention_sites", "hunyuan_video_shape"]


def _text_mask(attention_mask: torch.Tensor | None, num_text: int) -> torch.Tensor | None:
    """The (batch, num_text) bool mask of real text keys from the model's joint key mask."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"HunyuanVideo SVG2 processor expects a boolean key mask, got {attention_mask.dtype}")
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        return attention_mask[:, 0, 0, -num_text:]
    if attention_mask.dim() == 2:
        return attention_mask[:, -num_text:]
    raise ValueError("HunyuanVideo SVG2 processor expects a key mask of shape (batch, 1, 1, seqlen) or "
                     f"(batch, seqlen), got {tuple(attention_mask.shape)}")


class SVG2HunyuanVideoAttnProcessor(SVG2ProcessorBase):
    """Joint-attention processor for HunyuanVideo blocks; repeats ``HunyuanVideoAttnProcessor2_0`` math."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if encoder_hidden_states is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        num_text = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections, 2. QK norm
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. RoPE on the video tokens only
        if image_rotary_emb is not None:
            if single_stream:
                query = torch.cat([apply_rotary_emb(query[:, :-num_text], image_rotary_emb, sequence_dim=1),
                                   query[:, -num_text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-num_text], image_rotary_emb, sequence_dim=1),
                                 key[:, -num_text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Text stream projections (dual-stream blocks)
        if not single_stream:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention: video tokens sparse, trailing text tokens dense
        hidden_states = self.core(query, key, value, num_text_tokens=num_text,
                                  text_mask=_text_mask(attention_mask, num_text), parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        # 6. Output projections
        hidden_states, encoder_hidden_states = hidden_states[:, :-num_text], hidden_states[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def hunyuan_self_attention_sites(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module): dual-stream blocks first, then single-stream blocks."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return [(i, block.attn) for i, block in enumerate(blocks)]


def hunyuan_video_shape(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) in tokens from the latents (B, C, F, H, W), patch_size and patch_size_t."""
    hs = latent_input(args, kwargs)
    if hs is None or hs.dim() != 5:
        return None
    cfg = model_config(transformer)
    p, pt = int(cfg.patch_size), int(cfg.patch_size_t or 1)
    f, h, w = hs.shape[2:]
    return (f // pt, h // p, w // p)
