"""Sparse VideoGen (SVG1, Xi et al. 2025, arXiv 2502.01776) on the shared variable-block kernel.

Per call (one layer, step and CFG branch), every (batch, head) is classified as *spatial* or *temporal* by
online profiling: ``num_sampled_rows`` random video query rows are attended exactly and under each of the
two static masks, and the mask with the lower output MSE wins (the authors' ``sample_mse``).

Both masks are the same block band in a different token order (the paper's layout transformation):
  * spatial heads: raster (frame-major) order; a band of half-width ``w`` tokens around the diagonal keeps
    the query's own frame and its neighbours;
  * temporal heads: token-major order (position, then frame); the same band keeps the same and nearby
    spatial positions in every frame.
Blocks are ``block_size`` consecutive tokens of that order (128 in the authors' FlexAttention code); the
band is expressed in whole blocks, plus an attention sink of the key blocks that hold the first
frame-worth of tokens of that order (the authors' ``kv_idx < token_per_frame``). ``density`` is the
authors' ``sparsity`` argument (the kept share: 0.25 for Wan, 0.2 for HunyuanVideo): the band width is
the one whose layout density is closest to it. Text tokens are attended densely (as in the authors' code).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import torch

from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, register_method
from svg2.methods.blockwise import (
    LayoutMethod,
    layout_mask_rows,
    on_device,
    softmax_scale,
    static_density,
    static_layout,
    video_shape,
)

__all__ = ["SVG1Method", "svg1_orders", "svg1_block_map"]


def svg1_orders(frames: int, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every raster token in the spatial order (identity) and in the temporal (token-major)
    order: token (t, p) -> p * frames + t. Both (S,) int64."""
    s = frames * tokens_per_frame
    spatial = torch.arange(s)
    t = spatial // tokens_per_frame
    p = spatial % tokens_per_frame
    return spatial, p * frames + t


@functools.lru_cache(maxsize=64)
def svg1_block_map(num_tokens: int, tokens_per_frame: int, block_size: int, density: float,
                   attention_sink: bool) -> tuple[torch.Tensor, int]:
    """The band (+ sink) block map (C, C) bool over ``block_size`` blocks of one order, with the band
    half-width (in blocks) whose token-pair density is closest to ``density``. Returns (map, half_width)."""
    c = -(-num_tokens // block_size)
    sizes = torch.full((c,), block_size, dtype=torch.long)
    sizes[-1] = num_tokens - (c - 1) * block_size
    idx = torch.arange(c)
    dist = (idx[:, None] - idx[None, :]).abs()
    sink = torch.zeros(c, c, dtype=torch.bool)
    if attention_sink:
        sink[:, : -(-tokens_per_frame // block_size)] = True
    best = None
    for w in range(c):
        bm = (dist <= w) | sink
        err = abs(static_density(sizes, sizes, bm) - density)
        if best is None or err < best[0] - 1e-12:
            best = (err, w, bm)
        if static_density(sizes, sizes, bm) >= density:
            break
    return best[2], best[1]


def _svg1_static(frames: int, tpf: int, block_size: int, density: float, sink: bool):
    spatial, temporal = svg1_orders(frames, tpf)
    bm, _ = svg1_block_map(frames * tpf, tpf, block_size, density, sink)
    return spatial // block_size, temporal // block_size, bm


@register_method("svg1")
class SVG1Method(LayoutMethod):
    """Spatial/temporal head classification by sampled-row MSE, then a static band mask per head."""

    def __init__(self, density: float = 0.25, num_sampled_rows: int = 64, block_size: int = 128,
                 attention_sink: bool = True, target_density: float | None = None, seed: int = 0,
                 **schedule: Any) -> None:
        super().__init__(**schedule)
        # target_density is the knob every baseline shares for matched-density sweeps; here it is density.
        density = target_density if target_density is not None else density
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1]")
        if num_sampled_rows < 1 or block_size < 1:
            raise ValueError("num_sampled_rows and block_size must be >= 1")
        self.density = float(density)
        self.num_sampled_rows = int(num_sampled_rows)
        self.block_size = int(block_size)
        self.attention_sink = bool(attention_sink)
        self.seed = int(seed)

    def _orders_and_map(self, q: torch.Tensor, ctx: AttentionContext):
        """Block labels (S,) of the spatial and temporal orders and the band block map, on q's device."""
        sv = q.shape[2] - ctx.num_text_tokens
        t, h, w = video_shape(ctx, sv, self.name)
        return on_device(ctx, _svg1_static, t, h * w, self.block_size, self.density, self.attention_sink,
                         device=q.device)

    def _sample_rows(self, num_video: int, ctx: AttentionContext, device) -> torch.Tensor:
        # Deterministic per (seed, layer, step, branch) so runs are reproducible.
        key = f"{self.seed}/{ctx.layer_index}/{ctx.step_index}/{ctx.branch}".encode()
        g = torch.Generator().manual_seed(zlib.crc32(key))
        r = min(self.num_sampled_rows, num_video)
        return torch.randperm(num_video, generator=g)[:r].to(device)

    def classify(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which heads are temporal: (B, H) bool, and the sampled-row MSEs (2, B, H) float32 of the
        (spatial, temporal) masks against exact attention."""
        b, h, s, d = q.shape
        sv = s - ctx.num_text_tokens
        lab_s, lab_t, bm = self._orders_and_map(q, ctx)
        rows = self._sample_rows(sv, ctx, q.device)
        scores = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * softmax_scale(q, ctx.scale)
        allowed_text = torch.ones(b, 1, 1, ctx.num_text_tokens, dtype=torch.bool, device=q.device)
        if ctx.text_mask is not None:
            allowed_text = ctx.text_mask[:, None, None, :]
        full = torch.cat([torch.ones(b, 1, 1, sv, dtype=torch.bool, device=q.device), allowed_text], -1)
        ref = torch.softmax(scores.masked_fill(~full, float("-inf")), -1) @ v.float()
        mses = []
        for labels in (lab_s, lab_t):
            lay = static_layout(labels, labels, bm, b, h)
            m = torch.cat([layout_mask_rows(lay, rows), allowed_text.expand(b, h, rows.numel(), -1)], -1)
            out = torch.softmax(scores.masked_fill(~m, float("-inf")), -1) @ v.float()
            mses.append(((out - ref) ** 2).mean(dim=(-1, -2)))
        mses = torch.stack(mses)
        return mses[1] < mses[0], mses

    def layout_and_info(self, q, k, v, ctx):
        b, h, s, _ = q.shape
        temporal, _ = self.classify(q, k, v, ctx)
        lab_s, lab_t, bm = self._orders_and_map(q, ctx)
        labels = torch.where(temporal[..., None], lab_t, lab_s)
        layout = static_layout(labels, labels, bm, b, h, num_text_tokens=ctx.num_text_tokens,
                               text_mask=ctx.text_mask)
        return layout, {"temporal_heads": temporal.float().mean()}

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        return self.layout_and_info(q, k, v, ctx)[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "density": self.density, "num_sampled_rows": self.num_sampled_rows,
                "block_size": self.block_size, "attention_sink": self.attention_sink}
