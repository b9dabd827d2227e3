"""Batched Euclidean k-means with warm start (step 1 of SVG2).

Works on ``x: (batch, num_points, dim)`` where ``batch`` flattens (batch, head). No host synchronisation:
a fixed number of Lloyd iterations runs, empty clusters keep their previous centroid, and the kernel that
does the work is chosen from ``svg2_kernels``' registry (``torch`` reference, ``triton``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svg2_kernels import KMeansInputs, select_kmeans_variant

__all__ = ["HeadSlice", "KMeansResult", "init_centroids", "kmeans"]


@dataclass(frozen=True)
class HeadSlice:
    """The heads an attention call holds when it sees only some of the model's heads: ``count`` heads from
    ``first`` of ``total`` (a Ulysses rank's share, ``svg2.parallel.ulysses``). Cold k-means starts then draw
    exactly the initial centroids one process clustering all ``total`` heads draws for these heads, so N ranks
    reproduce a single GPU head for head."""

    first: int
    count: int
    total: int

    def __post_init__(self) -> None:
        if not (0 <= self.first and self.count >= 1 and self.first + self.count <= self.total):
            raise ValueError(f"HeadSlice(first={self.first}, count={self.count}, total={self.total}): need "
                             "0 <= first and count >= 1 and first + count <= total")


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


def init_centroids(x: torch.Tensor, num_clusters: int, seed: int, heads: HeadSlice | None = None) -> torch.Tensor:
    """Distinct random points of each batch as initial centroids (deterministic under ``seed``).

    ``heads``: the rows of ``x`` are (batch, head) pairs of ``heads.count`` heads out of ``heads.total``; each
    row gets the draw of its head in an all-heads call of one batch entry, whatever its batch index (a video
    clustered in a batch starts as it does alone). Returns (batch, num_clusters, dim) float32.
    ``num_clusters`` must be <= num_points.
    """
    n, s, d = x.shape
    if num_clusters > s:
        raise ValueError(f"cannot pick {num_clusters} distinct initial centroids from {s} points")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # argsort of uniform noise = one random permutation per batch, drawn on the CPU so the result does
    # not depend on the device; the first C indices are distinct points.
    if heads is not None:
        if n % heads.count:
            raise ValueError(f"k-means input has {n} rows, not a multiple of the {heads.count} heads of {heads}")
        # draw the noise of all heads of one batch entry, keep this slice's heads, same for every entry
        noise = torch.rand(1, heads.total, s, generator=gen)[:, heads.first:heads.first + heads.count]
        noise = noise.expand(n // heads.count, heads.count, s).reshape(n, s)
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
    heads: HeadSlice | None = None,
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
        heads: which heads of the model the rows hold, when a call sees only some (cold-start draws per head).
    Returns:
        KMeansResult; the centroids are the means of the returned clusters (empty ones keep the old one).
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans expects x of shape (batch, num_points, dim), got {tuple(x.shape)}")
    n, s, d = x.shape
    c = min(num_clusters, s)
    if init is None:
        init = init_centroids(x, c, seed, heads)
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
