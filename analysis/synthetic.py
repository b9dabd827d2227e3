"""Synthetic Q/K/V with known attention structure, for tests and for the recall analysis without a model.

Each head is one of:
  * ``spatial``: a query attends to keys of its own frame, most to nearby positions (frame code + smooth
    positional features);
  * ``temporal``: a query attends to keys at the same spatial position in every frame (sharp position
    code + smooth features over time);
  * ``semantic``: tokens belong to objects (Voronoi regions in the image plane plus scattered tokens) and a
    query attends to the keys of its own object wherever they are (what k-means clustering captures and
    raster blocks do not);
  * ``random``: i.i.d. Gaussian q, k (near-uniform attention).
Tokens are in raster order (frame, row, column), shape (batch, heads, T*H*W + num_text_tokens, head_dim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["HEAD_KINDS", "synthetic_qkv"]

HEAD_KINDS = ("spatial", "temporal", "semantic", "random")


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def _smooth(coords: torch.Tensor, d: int, length: float, g: torch.Generator) -> torch.Tensor:
    """Random Fourier features (unit norm) whose inner product decays with distance over ``length``."""
    freqs = torch.randn(d // 2, coords.shape[-1], generator=g) / length
    phase = coords.float() @ freqs.T
    return torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(d // 2)


def _head(kind: str, t: int, h: int, w: int, d: int, sharp: float, noise: float, g: torch.Generator):
    s = t * h * w
    ti = torch.arange(t).repeat_interleave(h * w)
    yi = torch.arange(h).repeat_interleave(w).repeat(t)
    xi = torch.arange(w).repeat(t * h)
    half = d // 2
    if kind == "spatial":
        frame = _unit(t, half, g)[ti]
        pos = _smooth(torch.stack([yi, xi], -1), d - half, max(h, w) / 4, g)
        base = torch.cat([sharp * frame, 0.6 * sharp * pos], -1)
    elif kind == "temporal":
        pos = _unit(h * w, half, g)[yi * w + xi]
        time = _smooth(ti[:, None], d - half, max(t, 2) / 2, g)
        base = torch.cat([sharp * pos, 0.5 * sharp * time], -1)
    elif kind == "semantic":
        num_obj = 6
        seeds = torch.rand(num_obj, 2, generator=g) * torch.tensor([h, w])
        dist = (torch.stack([yi, xi], -1).float()[:, None, :] - seeds[None]).norm(dim=-1)
        obj = dist.argmin(-1)
        scatter = torch.rand(s, generator=g) < 0.3
        obj = torch.where(scatter, torch.randint(num_obj, (s,), generator=g), obj)
        base = sharp * _unit(num_obj, d, g)[obj]
    elif kind == "random":
        return torch.randn(s, d, generator=g), torch.randn(s, d, generator=g)
    else:
        raise ValueError(f"unknown head kind {kind!r}; known: {HEAD_KINDS}")
    q = base + noise * torch.randn(s, d, generator=g)
    k = base + noise * torch.randn(s, d, generator=g)
    return q, k


def synthetic_qkv(
    video_shape: tuple[int, int, int],
    kinds: Sequence[str] = ("spatial", "temporal", "semantic"),
    *,
    head_dim: int = 32,
    batch: int = 1,
    num_text_tokens: int = 0,
    sharpness: float | None = None,
    noise: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of shape (batch, len(kinds), T*H*W + num_text_tokens, head_dim), one head per kind.

    ``sharpness`` scales the structured part of q and k (default ~ 2.2 * D^(1/4), so the logit gap
    between related and unrelated tokens is about 5 at any head dim); text tokens are random."""
    t, h, w = video_shape
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even and >= 4")
    sharp = 2.2 * head_dim**0.25 if sharpness is None else sharpness
    g = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for _ in range(batch):
        hq, hk = zip(*(_head(kind, t, h, w, head_dim, sharp, noise, g) for kind in kinds))
        qs.append(torch.stack(hq))
        ks.append(torch.stack(hk))
    q, k = torch.stack(qs), torch.stack(ks)
    v = torch.randn(q.shape, generator=g)
    if num_text_tokens:
        extra = lambda: torch.randn(batch, len(kinds), num_text_tokens, head_dim, generator=g)  # noqa: E731
        q, k, v = (torch.cat([x, extra()], 2) for x in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)
