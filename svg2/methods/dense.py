from __future__ import annotations

import torch

from svg2.attention import dense_attention
from svg2.methods.base import AttentionContext, AttentionMethod, register_method


@register_method("dense")
class DenseMethod(AttentionMethod):
    """Full attention through torch SDPA (cuDNN / flash on GPU): the baseline of every comparison."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        out = dense_attention(q, k, v, num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask,
                              scale=ctx.scale)
        ctx.state.record(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch,
                         density=1.0, dense=True)
        return out
