"""Batched Euclidean k-means with warm start (DESIGN.md section 1, step 1).

Works on ``x: (batch, num_points, dim)`` where ``batch`` flattens (batch, head). No host synchronisation:
a fixed number of Lloyd iterations runs, empty clusters keep their previous centroid, and the kernel that
does the work is chosen from ``svg2_kernels``' registry (``torch`` reference, ``triton``, ...).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from svg2_kernels import KMeansInputs, select_kmeans_variant

__all__ = ["KMeansResult", "init_centroids", "kmeans", "head_shard"]

# (first head, local heads, total heads) while a rank clusters a slice of the heads (svg2.parallel.ulysses).
_HEAD_SHARD: ContextVar[tuple[int, int, int] | None] = ContextVar("svg2_head_shard", default=None)


@contextlib.contextmanager
def head_shard(first: int, num_local: int, total: int):
    """Inside this block, k-means inputs of ``batch * num_local`` rows hold heads ``first .. first+num_local-1``
    of ``total``: cold starts draw exactly the initial centroids that one process clustering all ``total`` heads
    draws for those heads, so sequence-parallel ranks match a single GPU (per-head determinism)."""
    token = _HEAD_SHARD.set((int(first), int(num_local), int(total)))
    try:
        yield
    finally:
        _HEAD_SHARD.reset(token)


@dataclass
class KMeansResult:
    """labels (batch, num_points) int64; centroids (batch, C, dim) float32; sizes (batch, C) int64."""

    labels: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor
    kernel: str = "torch"
    perm: torch.Tensor | None = None  # (batch, num_points) stable argsort of labels, when the kernel made it
    x_sorted: torch.Tensor | None = None  # (batch, num_points, dim) x[n, perm[n]], when asked and made

    def inertia(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of squared distances of points to their centroid, per batch: (batch,) float32."""
        c = torch.gather(self.centroids, 1, self.labels.unsqueeze(-1).expand(*self.labels.shape, x.shape[-1]))
        return ((x.float() - c) ** 2).sum(dim=(1, 2))


def init_centroids(x: torch.Tensor, num_clusters: int, seed: int) -> torch.Tensor:
    """Distinct random points of each batch as initial centroids (deterministic under ``seed``).

    Returns (batch, num_clusters, dim) float32. ``num_clusters`` must be <= num_points.
    """
    n, s, d = x.shape
    if num_clusters > s:
        raise ValueError(f"cannot pick {num_clusters} distinct initial centroids from {s} points")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # argsort of uniform noise = one random permutation per batch, drawn on the CPU so the result does
    # not depend on the device; the first C indices are distinct points.
    shard = _HEAD_SHARD.get()
    if shard is not None and n % shard[1] == 0:
        first, local, total = shard  # draw the noise of all heads, keep this rank's rows
        noise = torch.rand(n // local, total, s, generator=gen)[:, first:first + local].reshape(n, s)
    else:
        noise = torch.rand(n, s, generator=gen)
    idx = noise.argsort(dim=-1)[:, :num_clusters].to(x.device)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(n, num_clusters, d)).float()


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    iters: int,
    init: torch.Tensor | None = None,
    *,
    seed: int = 0,
    kernel: str = "auto",
    sort_points: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on every batch at once.

    Args:
        x: (batch, num_points, dim) float tensor (fp32/fp16/bf16).
        num_clusters: C; capped at num_points (a shorter sequence gets one cluster per point at most).
        iters: Lloyd iterations (assign + update). 0 with ``init`` only assigns to ``init``.
        init: (batch, C, dim) warm-start centroids, or None for a cold start from distinct random points.
        seed: seed of the cold-start initialisation.
        kernel: k-means kernel variant name or "auto".
        sort_points: also return ``x_sorted`` (x in cluster order) when the kernel can write it on the way
            (``sorts_points`` variants); otherwise ``x_sorted`` stays None.
    Returns:
        KMeansResult; the centroids are the means of the returned clusters (empty ones keep the old one).
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans expects x of shape (batch, num_points, dim), got {tuple(x.shape)}")
    n, s, d = x.shape
    c = min(num_clusters, s)
    if init is None:
        init = init_centroids(x, c, seed)
        if iters == 0:
            raise ValueError("a cold start (init=None) needs iters >= 1")
    elif init.shape != (n, c, d):
        raise ValueError(f"warm-start centroids have shape {tuple(init.shape)}, expected {(n, c, d)}")
    variant = select_kmeans_variant(kernel, KMeansInputs.of(x, c))
    if sort_points and variant.sorts_points:
        out = variant.run(x, init.to(x.device), iters, sort_x=True)
    else:
        out = variant.run(x, init.to(x.device), iters)
    # A variant may also return (offsets, perm): its counting sort already ordered the points by cluster.
    perm = out[4] if len(out) > 4 else None
    x_sorted = out[5] if len(out) > 5 else None
    return KMeansResult(out[0], out[1], out[2], kernel=variant.name, perm=perm, x_sorted=x_sorted)
