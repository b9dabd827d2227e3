"""Radial Attention (Li et al. 2025, "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation") as a static block layout on the shared variable-block kernel.

The token mask, for a query in frame i and a key in frame j at temporal distance d = |i - j| and in-frame
raster positions x, y (the authors' ``gen_log_mask_shrinked``):
  * j == 0: kept (attention sink: the first frame);
  * d == 0 (and d == 1 for HunyuanVideo): the whole frame; d == 1 for Wan: |x - y| <= tokens_per_frame/2;
  * d >= 2: |x - y| <= max(decay_factor * 2^bitlen(tokens_per_frame) / 2^bitlen(d), block_size): the
    spatial window halves every time the temporal distance doubles;
  * when the undecayed window 2^bitlen(tpf) / 2^bitlen(d) falls below block_size, only frame pairs with
    d % (block_size // window) == 0 are kept (frames are subsampled instead of windows shrinking further).
The token mask is then shrunk to blocks with the authors' rule (a block pair is kept when more than 60% of
its non-empty key columns have more than 1/3 of its query rows kept).

Blocks: ``block_size`` consecutive raster tokens *within one frame* (the last block of a frame may be
shorter), so no block straddles two frames. The authors use 128-token blocks of the flat sequence; frame-
aligned variable blocks are exact at every frame size and cost nothing extra on the variable-block kernel.
``target_density`` (optional) picks the decay factor whose layout density is closest to it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, check_target_density, register_method
from svg2.methods.blockwise import LayoutMethod, on_device, static_density, static_layout, video_shape

__all__ = ["RadialMethod", "radial_block_map"]

_MODEL_TYPES = ("wan", "hunyuan")


def _frame_pair_window(d: int, tpf: int, block_size: int, decay_factor: float, model_type: str) -> float | None:
    """Spatial half-window (tokens) of a frame pair at temporal distance d (j != 0); None drops the pair."""
    group = d.bit_length()
    undecayed = 2 ** tpf.bit_length() / 2**group
    if undecayed < block_size and d % int(block_size / undecayed) != 0:
        return None  # the frame pair is subsampled away
    if d == 0 or (d == 1 and model_type == "hunyuan"):
        return float(tpf)
    if d == 1:
        return float(tpf // 2)
    return max(undecayed * decay_factor, float(block_size))


def _chunk_map(tpf: int, block_size: int, window: float) -> torch.Tensor:
    """(nc, nc) bool: which in-frame chunk pairs survive the shrink rule for the token window |x-y| <= w."""
    nc = -(-tpf // block_size)
    starts = torch.arange(nc) * block_size
    ends = torch.clamp(starts + block_size, max=tpf)  # exclusive
    y = torch.arange(tpf)
    # Rows x of chunk p with |x - y| <= w: the overlap of [start, end) with [y - w, y + w].
    lo = torch.maximum(starts[:, None], torch.ceil(y[None, :] - window).long())
    hi = torch.minimum(ends[:, None] - 1, torch.floor(y[None, :] + window).long())
    col_density = (hi - lo + 1).clamp_min(0).double() / (ends - starts)[:, None].double()  # (nc, tpf)
    chunk_of_y = y // block_size
    nonzero = torch.zeros(nc, nc, dtype=torch.float64).index_add_(1, chunk_of_y, (col_density > 0).double())
    high = torch.zeros(nc, nc, dtype=torch.float64).index_add_(1, chunk_of_y, (col_density > 1 / 3).double())
    return high / (nonzero + 1e-9) > 0.6


@functools.lru_cache(maxsize=64)
def radial_block_map(frames: int, tpf: int, block_size: int, decay_factor: float, model_type: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block map (T * nc, T * nc) bool and block sizes (T * nc,) of the radial mask (nc blocks per frame)."""
    nc = -(-tpf // block_size)
    full = torch.ones(nc, nc, dtype=torch.bool)
    empty = torch.zeros(nc, nc, dtype=torch.bool)
    by_window: dict[float, torch.Tensor] = {}
    tiles = torch.empty(frames, frames, nc, nc, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            if j == 0:
                tiles[i, j] = full
                continue
            w = _frame_pair_window(abs(i - j), tpf, block_size, decay_factor, model_type)
            if w is None:
                tiles[i, j] = empty
            else:
                if w not in by_window:
                    by_window[w] = full if w >= tpf else _chunk_map(tpf, block_size, w)
                tiles[i, j] = by_window[w]
    block_map = tiles.permute(0, 2, 1, 3).reshape(frames * nc, frames * nc)
    sizes = torch.full((nc,), block_size, dtype=torch.long)
    sizes[-1] = tpf - (nc - 1) * block_size
    return block_map, sizes.repeat(frames)


@functools.lru_cache(maxsize=64)
def _decay_for_density(frames: int, tpf: int, block_size: int, model_type: str, target: float) -> float:
    """The decay factor 2^(e/8), e in [-64, 64], whose density is closest to ``target`` (bisection: the
    density does not decrease with the decay factor). Below the mask's floor (windows never narrower than
    a block) the smallest factor is returned."""

    def density(e: int) -> float:
        bm, sizes = radial_block_map(frames, tpf, block_size, 2.0 ** (e / 8), model_type)
        return static_density(sizes, sizes, bm)

    lo, hi = -64, 64
    if density(hi) <= target:
        return 2.0 ** (hi / 8)
    while hi - lo > 1:  # invariant: density(hi) > target, and lo is below target or the lower bound
        mid = (lo + hi) // 2
        if density(mid) > target:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda e: abs(density(e) - target))
    return 2.0 ** (best / 8)


def _radial_static(frames: int, tpf: int, block_size: int, decay_factor: float, model_type: str):
    """Block label of every raster video token (frame-aligned blocks) and the block map."""
    bm, _ = radial_block_map(frames, tpf, block_size, decay_factor, model_type)
    nc = -(-tpf // block_size)
    tok = torch.arange(frames * tpf)
    return (tok // tpf) * nc + (tok % tpf) // block_size, bm


@register_method("radial")
class RadialMethod(LayoutMethod):
    """Static radial mask: temporal-distance bands with spatial windows that shrink as 1/distance."""

    static_mask = True  # depends only on the video geometry: layout_every is refused

    def __init__(self, block_size: int = 128, decay_factor: float = 1.0, model_type: str = "wan",
                 target_density: float | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} must be one of {_MODEL_TYPES} (it sets the window "
                             "at temporal distance 1: half a frame for Wan, a whole frame for HunyuanVideo)")
        if block_size < 1 or not decay_factor > 0 or not math.isfinite(decay_factor):
            raise ValueError("block_size must be >= 1 and decay_factor > 0")
        check_target_density(target_density)
        self.block_size = int(block_size)
        self.decay_factor = float(decay_factor)
        self.model_type = model_type
        self.target_density = target_density

    def resolved_decay_factor(self, frames: int, tokens_per_frame: int) -> float:
        if self.target_density is None:
            return self.decay_factor
        return _decay_for_density(frames, tokens_per_frame, self.block_size, self.model_type,
                                  float(self.target_density))

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        b, h, s, _ = q.shape
        sv = s - ctx.num_text_tokens
        t, hh, ww = video_shape(ctx, sv, self.name)
        tpf = hh * ww
        df = self.resolved_decay_factor(t, tpf)
        labels, bm = on_device(ctx, _radial_static, t, tpf, self.block_size, df, self.model_type, device=q.device)
        return static_layout(labels, labels, bm, b, h, num_text_tokens=ctx.num_text_tokens,
                             text_mask=ctx.text_mask)

    def static_key(self, q: torch.Tensor, ctx: AttentionContext) -> tuple[Any, ...] | None:
        return (tuple(ctx.extra.get("video_shape") or ()),)  # the mask depends on the video shape only

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_size": self.block_size, "decay_factor": self.decay_factor,
                "model_type": self.model_type, "target_density": self.target_density}
