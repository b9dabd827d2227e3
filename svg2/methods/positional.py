"""Position-based blocks: the SVG2 paper's ablation against semantic clustering (close to XAttention /
SpargeAttn's block-mean estimates).

Contiguous raster-order blocks of ``block_size`` video tokens play the role of clusters: their mean-pooled
Q and K are the centroids, and the selection is exactly SVG2's (``centroid_scores`` weighted by block sizes,
then ``top_p`` with ``min_kc_ratio``, or ``target_density``). With ``block_size=1`` every token is a block
and the selection is top-p over the exact attention scores.
"""

from __future__ import annotations

from typing import Any

import torch

from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, register_method
from svg2.methods.blockwise import LayoutMethod, refuse_single_token_compensation, softmax_scale, static_layout
from svg2.selection import centroid_scores, select_target_density, select_top_p

__all__ = ["PositionalMethod", "block_means", "raster_block_scores", "raster_block_layout"]


def block_means(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of every contiguous block of ``block_size`` rows (the last block may be shorter).

    Args:
        x: (N, S, D).
    Returns:
        means (N, C, D) float32 and sizes (C,) int64 with C = ceil(S / block_size).
    """
    n, s, d = x.shape
    c = -(-s // block_size)
    pad = c * block_size - s
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    sums = xf.view(n, c, block_size, d).sum(2)
    sizes = torch.full((c,), block_size, dtype=torch.long, device=x.device)
    sizes[-1] = s - (c - 1) * block_size
    return sums / sizes[None, :, None].float(), sizes


def raster_block_scores(q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, block_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVG2's centroid estimate over raster-order blocks of the video tokens: mean-pooled Q and K per block.

    Args:
        q, k: (B, H, S, D), the last ``ctx.num_text_tokens`` tokens text (not blocked).
    Returns:
        scores (B*H, Cq, Ck) row-stochastic, q_sizes (B*H, Cq) and k_sizes (B*H, Ck) tokens per block.
    """
    b, h, s, d = q.shape
    sv = s - ctx.num_text_tokens
    n = b * h
    cq, q_sizes = block_means(q[:, :, :sv].reshape(n, sv, d), block_size)
    ck, k_sizes = block_means(k[:, :, :sv].reshape(n, sv, d), block_size)
    ks = k_sizes.expand(n, -1)
    return centroid_scores(cq, ck, ks, softmax_scale(q, ctx.scale)), q_sizes.expand(n, -1), ks


def raster_block_layout(block_map: torch.Tensor, q: torch.Tensor, ctx: AttentionContext, block_size: int
                        ) -> ClusterLayout:
    """The layout of a (B*H, Cq, Ck) block map over raster-order blocks of ``block_size`` video tokens."""
    b, h, s, _ = q.shape
    labels = torch.arange(s - ctx.num_text_tokens, device=q.device) // block_size
    return static_layout(labels, labels, block_map.view(b, h, *block_map.shape[1:]), b, h,
                         num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask)


@register_method("positional")
class PositionalMethod(LayoutMethod):
    """Raster-order blocks with mean-pooled Q/K centroids and SVG2's top-p / target-density selection."""

    def __init__(self, block_size: int = 64, top_p: float = 0.9, min_kc_ratio: float = 0.10,
                 target_density: float | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        refuse_single_token_compensation(self.name, block_size, self.compensate)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if target_density is not None and not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density={target_density} must be in (0, 1] or None")
        self.block_size = int(block_size)
        self.top_p = float(top_p)
        self.min_kc_ratio = float(min_kc_ratio)
        self.target_density = target_density

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        scores, qs, ks = raster_block_scores(q, k, ctx, self.block_size)
        if self.target_density is not None:
            block_map = select_target_density(scores, qs, ks, self.target_density, self.min_kc_ratio)
        else:
            block_map = select_top_p(scores, self.top_p, self.min_kc_ratio)
        return raster_block_layout(block_map, q, ctx, self.block_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_size": self.block_size, "top_p": self.top_p,
                "min_kc_ratio": self.min_kc_ratio, "target_density": self.target_density}
