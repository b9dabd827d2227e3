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
from svg2.methods.base import AttentionContext, check_target_density, register_method
from svg2.methods.blockwise import LayoutMethod, refuse_single_token_compensation, softmax_scale, static_layout
from svg2.selection import centroid_scores, select_target_density, select_top_p

__all__ = ["PositionalMethod", "RasterBlockSelection", "block_means", "raster_block_scores", "raster_block_layout"]


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


class RasterBlockSelection(LayoutMethod):
    """Shared machinery of ``positional`` and ``sol_attn``: raster-order blocks of ``block_size`` video tokens,
    SVG2's centroid estimate on their mean-pooled Q and K (:func:`raster_block_scores`), then the subclass's
    :meth:`select` rule, or SVG2's matched-density selection when ``target_density`` is set.

    Subclasses call ``_setup_blocks`` from their constructor (this class has none of its own, so each registered
    method's parameters are exactly its constructor's)."""

    block_size: int
    min_kc_ratio: float
    target_density: float | None

    def _setup_blocks(self, block_size: int, min_kc_ratio: float, target_density: float | None) -> None:
        """Check and keep the block settings (after ``LayoutMethod.__init__``, which sets ``compensate``)."""
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        refuse_single_token_compensation(self.name, block_size, self.compensate)
        self.block_size = int(block_size)
        self.min_kc_ratio = float(min_kc_ratio)
        self.target_density = check_target_density(target_density)

    def select(self, scores: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
        """The method's own rule: scores (N, Cq, Ck) row-stochastic, q_sizes (N, Cq), k_sizes (N, Ck) tokens per
        block -> block_map (N, Cq, Ck) bool."""
        raise NotImplementedError

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        scores, qs, ks = raster_block_scores(q, k, ctx, self.block_size)
        if self.target_density is not None:
            block_map = select_target_density(scores, qs, ks, self.target_density, self.min_kc_ratio)
        else:
            block_map = self.select(scores, qs, ks)
        return raster_block_layout(block_map, q, ctx, self.block_size)


@register_method("positional")
class PositionalMethod(RasterBlockSelection):
    """Raster-order blocks with mean-pooled Q/K centroids and SVG2's top-p / target-density selection."""

    def __init__(self, block_size: int = 64, top_p: float = 0.9, min_kc_ratio: float = 0.10,
                 target_density: float | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        self._setup_blocks(block_size, min_kc_ratio, target_density)
        self.top_p = float(top_p)

    def select(self, scores: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
        return select_top_p(scores, self.top_p, self.min_kc_ratio)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_size": self.block_size, "top_p": self.top_p,
                "min_kc_ratio": self.min_kc_ratio, "target_density": self.target_density}
