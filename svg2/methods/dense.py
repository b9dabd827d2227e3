from __future__ import annotations

import torch

from svg2.attention import dense_attention
from svg2.methods.base import AttentionContext, AttentionMethod, register_method


@register_method("dense")
class DenseMethod(AttentionMethod):
    """Full attention through torch SDPA (cuDNN / flash on GPU): the baseline of every comparison.

    Accepts the issue-17 options only at their neutral values, and says why otherwise: dense attention skips no
    key (nothing to compensate) and has no layout (nothing to reuse)."""

    @classmethod
    def parameters(cls) -> frozenset[str]:
        # compensate / layout_every exist for enable_svg2 callers and take only their neutral values: nothing to set.
        return frozenset()

    def __init__(self, *, compensate: bool = False, layout_every: int = 1) -> None:
        if compensate:
            raise ValueError("compensate=True makes no sense for method 'dense': it computes every key exactly, so no "
                             "key group is skipped and there is nothing to compensate. Use a cluster or block method "
                             "(svg2, svg_ear, positional, sol_attn, ...)")
        if layout_every != 1:
            raise ValueError(f"layout_every={layout_every} makes no sense for method 'dense': it has no sparse layout "
                             "to reuse across steps. Leave layout_every=1")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        out = dense_attention(q, k, v, num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask,
                              scale=ctx.scale)
        ctx.state.record(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch,
                         density=1.0, dense=True)
        return out


class StockAttention(AttentionMethod):
    """The pipeline's own attention processors, untouched: the true dense baseline (speedup 1). Nothing is
    installed, so it takes no parameters and ``enable_svg2`` refuses it (run the pipeline as it is).
    ``DenseMethod`` is the same math through svg2's processors (their overhead)."""

    name = "stock"
    stock = True
