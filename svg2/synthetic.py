"""Synthetic Q/K/V with cluster structure: the one family used by the benchmarks, the demo and tests.

Per head, a mixture of Gaussians with unequal masses whose components occupy spatio-temporal blobs of the
latent grid (so clusters are spatially coherent, as in real video DiTs), plus a smooth positional term.
Q and K share the component means (queries find their keys), V is i.i.d. Gaussian. (``analysis.synthetic``
builds heads of named kinds (spatial, temporal, semantic) for the recall analysis; this one is the realistic
workload for timing and accuracy.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VideoShape", "SHAPES", "clustered_qkv"]


@dataclass(frozen=True)
class VideoShape:
    """Attention shape of one model's self-attention: heads and the latent token grid (after patchify)."""

    heads: int
    frames: int
    height: int
    width: int

    @property
    def seqlen(self) -> int:
        return self.frames * self.height * self.width


SHAPES: dict[str, VideoShape] = {  # 81 frames -> 21 latent frames; 2x2 patches
    "wan1.3b": VideoShape(12, 21, 30, 52),  # 480p: S = 32760
    "wan14b": VideoShape(40, 21, 45, 80),  # 720p: S = 75600
    "hunyuan": VideoShape(24, 33, 45, 80),  # 720p 129 frames: S = 118800 (text tokens not added)
    "tiny": VideoShape(2, 2, 8, 12),  # CPU smoke: S = 192
}


def clustered_qkv(
    shape: VideoShape,
    *,
    batch: int = 1,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    components: int = 96,
    noise: float = 0.6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v), each (batch, shape.heads, shape.seqlen, head_dim) in ``dtype`` on ``device``.

    Deterministic under ``seed`` for a given device (its own generator: the global random stream is untouched).
    ``noise``: within-component spread (relative to unit-variance component means).
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    h, f, hh, ww = shape.heads, shape.frames, shape.height, shape.width
    s, d = shape.seqlen, head_dim
    t_, y_, x_ = torch.meshgrid(torch.arange(f, device=dev), torch.arange(hh, device=dev),
                                torch.arange(ww, device=dev), indexing="ij")
    pos = torch.stack([t_ / f, y_ / hh, x_ / ww], -1).reshape(s, 3).float()
    n = batch * h
    q = torch.empty(n, s, d, device=dev, dtype=dtype)
    k = torch.empty_like(q)
    freqs = torch.randn(3, d // 2, device=dev, generator=g) * 3.0
    pe = torch.cat([torch.sin(pos @ freqs), torch.cos(pos @ freqs)], -1)  # (s, d // 2 * 2)
    pe = torch.nn.functional.pad(pe, (0, d - pe.shape[-1]))
    for i in range(n):
        cpos = torch.rand(components, 3, device=dev, generator=g)
        logmass = torch.randn(components, device=dev, generator=g) * 1.5  # unequal masses
        width = 0.05 + 0.2 * torch.rand(components, device=dev, generator=g)
        logit = -((pos[:, None, :] - cpos[None]) ** 2).sum(-1) / (2 * width**2) + logmass
        gumbel = -torch.log(-torch.log(torch.rand(s, components, device=dev, generator=g).clamp_min(1e-9)))
        comp = (logit + gumbel).argmax(-1)
        mu = torch.randn(components, d, device=dev, generator=g)
        q[i] = (mu[comp] + noise * torch.randn(s, d, device=dev, generator=g) + 0.5 * pe).to(dtype)
        k[i] = (mu[comp] + noise * torch.randn(s, d, device=dev, generator=g) + 0.5 * pe).to(dtype)
    v = torch.randn(n, s, d, device=dev, generator=g).to(dtype)
    shp = (batch, h, s, d)
    return q.reshape(shp), k.reshape(shp), v.reshape(shp)
