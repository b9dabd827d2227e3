"""Sliding Tile Attention (STA, Zhang et al. 2025, arXiv 2502.04507) as a block layout.

Video tokens are grouped into 3D tiles of ``tile_size = (t, h, w)`` tokens (6x8x8 = 384 in the paper for
HunyuanVideo); a query tile attends to the ``window = (kt, kh, kw)`` key tiles around it (3x3x3 tiles =
18x24x24 tokens in the paper's example). As in the authors' mask, the window centre is clamped so the
window stays inside the video (a window near an edge is shifted, not cut), so every query tile sees the same
number of tiles. Text tokens are attended densely in both directions.

Tiles that do not divide the video are kept as smaller edge tiles (the variable-block kernel takes them as
they are; the authors require divisible sizes). ``target_density`` (optional) picks the window, among odd
windows up to the whole video, whose density is closest to it.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch

from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, check_target_density, register_method
from svg2.methods.blockwise import LayoutMethod, on_device, static_density, static_layout, video_shape

__all__ = ["SlidingTileMethod", "tile_labels", "sta_block_map"]


def _triple(x, name: str) -> tuple[int, int, int]:
    if isinstance(x, int):
        x = (x, x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 3 or min(x) < 1:
        raise ValueError(f"{name} must be 3 positive ints (frames, height, width), got {x!r}")
    return x


def tile_labels(shape: tuple[int, int, int], tile: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Tile id (S,) int64 of every raster video token and the tile grid (nt, nh, nw)."""
    t, h, w = shape
    grid = tuple(-(-a // b) for a, b in zip(shape, tile))
    ti = torch.arange(t)[:, None, None] // tile[0]
    hi = torch.arange(h)[None, :, None] // tile[1]
    wi = torch.arange(w)[None, None, :] // tile[2]
    return ((ti * grid[1] + hi) * grid[2] + wi).reshape(-1), grid


@functools.lru_cache(maxsize=64)
def sta_block_map(shape: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile block map (C, C) bool (C = nt * nh * nw) with clamped window centres, and tile sizes (C,)."""
    labels, grid = tile_labels(shape, tile)
    keep = None
    for axis, (n, k) in enumerate(zip(grid, window)):
        idx = torch.arange(n)
        half = k // 2
        if k >= n:
            near = torch.ones(n, n, dtype=torch.bool)  # the window covers the whole axis
        else:
            centre = idx.clamp(half, n - 1 - half)  # shifted inwards at the edges, never cut
            near = (centre[:, None] - idx[None, :]).abs() <= half
        view = [1, 1, 1]
        view[axis] = n
        near = near.reshape(*view, *view)
        keep = near if keep is None else keep & near
    c = grid[0] * grid[1] * grid[2]
    sizes = torch.bincount(labels, minlength=c)
    return keep.reshape(c, c), sizes


@functools.lru_cache(maxsize=64)
def _window_for_density(shape: tuple[int, int, int], tile: tuple[int, int, int], target: float
                        ) -> tuple[int, int, int]:
    _, grid = tile_labels(shape, tile)
    best = None
    for win in itertools.product(*(range(1, n + 2, 2) for n in grid)):  # odd k; k >= n covers the axis
        bm, sizes = sta_block_map(shape, tile, win)
        err = abs(static_density(sizes, sizes, bm) - target)
        cover = [min(k, n) / n for k, n in zip(win, grid)]
        key = (round(err, 9), max(cover) - min(cover))  # prefer windows that cover each axis alike
        if best is None or key < best[0]:
            best = (key, win)
    return best[1]


def _sta_static(shape: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int]):
    return tile_labels(shape, tile)[0], sta_block_map(shape, tile, window)[0]


@register_method("sliding_tile")
class SlidingTileMethod(LayoutMethod):
    """3D tiles with a clamped sliding window of tiles (static)."""

    static_mask = True  # depends only on the video geometry: layout_every is refused

    def __init__(self, tile_size=(6, 8, 8), window=(3, 3, 3), target_density: float | None = None,
                 **schedule: Any) -> None:
        super().__init__(**schedule)
        self.tile_size = _triple(tile_size, "tile_size")
        self.window = _triple(window, "window")
        if any(k % 2 == 0 for k in self.window):
            raise ValueError(f"window={self.window} must be odd in every axis (centred on the query tile)")
        check_target_density(target_density)
        self.target_density = target_density

    def resolved_window(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if self.target_density is None:
            return self.window
        return _window_for_density(shape, self.tile_size, float(self.target_density))

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        b, h, s, _ = q.shape
        shape = video_shape(ctx, s - ctx.num_text_tokens, self.name)
        labels, bm = on_device(ctx, _sta_static, shape, self.tile_size, self.resolved_window(shape), device=q.device)
        return static_layout(labels, labels, bm, b, h, num_text_tokens=ctx.num_text_tokens,
                             text_mask=ctx.text_mask)

    def static_key(self, q: torch.Tensor, ctx: AttentionContext) -> tuple[Any, ...] | None:
        return (tuple(ctx.extra.get("video_shape") or ()),)  # the mask depends on the video shape only

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tile_size": list(self.tile_size), "window": list(self.window),
                "target_density": self.target_density}
