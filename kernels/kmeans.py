"""Batched Lloyd k-means in Triton: fused distance + argmin, and a sort-free centroid update.

One iteration is four launches, none of which materialises the ``num_points x num_clusters`` distances:

1. ``_assign_kernel`` (per batch, tile of ``BLOCK_M`` points): ``argmin_c ||c||^2 - 2 x.c`` over centroid
   tiles on the tensor cores; also each point's rank among equal labels inside its tile and the tile's label
   histogram (int atomics on the tile's own row: no contention across tiles).
2. Two cumsums (torch): cluster sizes and offsets, and each tile's first slot in every cluster.
3. ``_scatter_kernel``: slot = offset of (tile, label) + rank -> ``perm[slot] = point``. This is a *stable
   counting sort* of the labels: ``perm`` equals ``argsort(labels, stable=True)``, so the final iteration's
   labels give the semantic permutation for free (no separate sort).
4. ``_update_kernel`` (per batch, cluster): mean of the cluster's rows read through ``perm``; empty clusters
   keep the old centroid. Also writes the squared norms the next assignment needs.

Semantics match :mod:`svg2_kernels.reference` and the ``KMeansVariant`` contract in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from svg2_kernels.registry import KMeansInputs, KMeansVariant, register_kmeans_variant, triton_interpreting

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False

__all__ = ["KMeansResult", "kmeans_triton", "kmeans_assign_triton", "TritonKMeans", "FlashKMeans"]


@dataclass
class KMeansResult:
    """labels (N, S) int64; centroids (N, C, D) fp32; sizes (N, C) int64; offsets (N, C + 1) int64
    (exclusive prefix sums of sizes); perm (N, S) int64 = stable argsort of labels (sorted slot -> point)."""

    labels: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor
    perm: torch.Tensor



def _blocks(x: torch.Tensor, blocks: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M points, BLOCK_C centroids, warps, stages) of the assignment kernel."""
    if blocks is not None:
        return blocks
    if x.device.type != "cuda" or triton_interpreting():
        return 16, 16, 4, 1
    return 256, 64, 8, 2  # fastest of 8 tilings at Wan 1.3B and 14B shapes on an H200 (run r4d)


if _HAS_TRITON:

    @triton.jit
    def _assign_kernel(
        X, C, CN, LABELS, RANK, HIST,
        S, NC, NB,
        stride_xn, stride_xs, stride_cn, stride_cc,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        WITH_SORT: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        offs_m = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < S
        d_mask = offs_d < DIM
        x = tl.load(X + n * stride_xn + offs_m[:, None] * stride_xs + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
        for c0 in range(0, NC, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_mask = offs_c < NC
            c = tl.load(C + n * stride_cn + offs_c[None, :] * stride_cc + offs_d[:, None],
                        mask=c_mask[None, :] & d_mask[:, None], other=0.0)  # (D, BLOCK_C) in x's dtype
            cn = tl.load(CN + n * NC + offs_c, mask=c_mask, other=float("inf"))
            xc = tl.dot(x, c)
            dist = cn[None, :] - 2.0 * xc
            t_min = tl.min(dist, axis=1)
            t_idx = tl.argmin(dist, axis=1).to(tl.int32) + c0
            better = t_min < best
            best = tl.where(better, t_min, best)
            best_idx = tl.where(better, t_idx, best_idx)
        tl.store(LABELS + n * S + offs_m, best_idx.to(tl.int64), mask=m_mask)
        if WITH_SORT:
            # Rank among equal labels earlier in this tile (stable order), and the tile's histogram.
            lab_j = tl.where(m_mask, best_idx, -1)
            earlier = tl.arange(0, BLOCK_M)[None, :] < tl.arange(0, BLOCK_M)[:, None]
            same = (best_idx[:, None] == lab_j[None, :]) & earlier
            rank = tl.sum(same.to(tl.int32), axis=1)
            tl.store(RANK + n * S + offs_m, rank, mask=m_mask)
            tl.atomic_add(HIST + (n * NB + pid_b) * NC + best_idx, tl.full([BLOCK_M], 1, tl.int32),
                          mask=m_mask)

    @triton.jit
    def _scatter_kernel(LABELS, RANK, SLOT0, PERM, S, NC, NB, BLOCK_M: tl.constexpr):
        pid_b = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        offs_m = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < S
        lab = tl.load(LABELS + n * S + offs_m, mask=m_mask, other=0)
        rank = tl.load(RANK + n * S + offs_m, mask=m_mask, other=0)
        slot = tl.load(SLOT0 + (n * NB + pid_b) * NC + lab, mask=m_mask, other=0) + rank
        tl.store(PERM + n * S + slot, offs_m.to(tl.int64), mask=m_mask)

    @triton.jit
    def _update_kernel(
        X, PERM, OFFS, C_OLD, C_NEW, CN_NEW,
        S, NC, stride_xn, stride_xs,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        c = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        start = tl.load(OFFS + n * (NC + 1) + c)
        end = tl.load(OFFS + n * (NC + 1) + c + 1)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DIM
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < end
            idx = tl.load(PERM + n * S + offs_r, mask=r_mask, other=0)
            acc += tl.load(X + n * stride_xn + idx[:, None] * stride_xs + offs_d[None, :],
                           mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=0)
        cnt = (end - start).to(tl.float32)
        old = tl.load(C_OLD + (n * NC + c) * DIM + offs_d, mask=d_mask, other=0.0)
        new = tl.where(cnt > 0, total / tl.maximum(cnt, 1.0), old)
        tl.store(C_NEW + (n * NC + c) * DIM + offs_d, new, mask=d_mask)
        tl.store(CN_NEW + n * NC + c, tl.sum(new * new, axis=0))


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid: x (N, S, D), centroids (N, C, D) -> labels (N, S) int64."""
    c = centroids.float().contiguous()
    labels, *_ = _assign(x, c, (c * c).sum(-1), with_sort=False)
    return labels


def _assign(x, c, cn, with_sort: bool, blocks=None):
    n, s, d = x.shape
    nc = c.shape[1]
    bm, bc, warps, stages = _blocks(x, blocks)
    # Centroids in x's dtype once per iteration: every point tile re-reads all of them (half the bytes of
    # fp32, and no conversion inside the kernel). Norms stay fp32 from the fp32 centroids.
    c = c.to(x.dtype).contiguous()
    nb = triton.cdiv(s, bm)
    labels = torch.empty(n, s, dtype=torch.long, device=x.device)
    if with_sort:
        rank = torch.empty(n, s, dtype=torch.int32, device=x.device)
        hist = torch.zeros(n, nb, nc, dtype=torch.int32, device=x.device)
    else:
        rank = hist = labels  # unused
    _assign_kernel[(nb, n)](
        x, c, cn, labels, rank, hist, s, nc, nb,
        x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=bm, BLOCK_C=bc, WITH_SORT=with_sort,
        num_warps=warps, num_stages=stages,
    )
    return labels, rank, hist, nb, bm


def _sort_and_update(x, c, labels, rank, hist, nb, bm, update: bool):
    n, s, d = x.shape
    nc = c.shape[1]
    sizes = hist.sum(1, dtype=torch.int32)  # (n, nc)
    offsets = torch.zeros(n, nc + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(sizes, dim=1, out=offsets[:, 1:])
    # First slot of (tile, cluster): cluster offset + points of that cluster in earlier tiles.
    slot0 = (torch.cumsum(hist, dim=1, dtype=torch.int32) - hist + offsets[:, None, :-1]).contiguous()
    perm = torch.empty(n, s, dtype=torch.long, device=x.device)
    _scatter_kernel[(nb, n)](labels, rank, slot0, perm, s, nc, nb, BLOCK_M=bm, num_warps=4)
    c_new, cn_new = c, None
    if update:
        c_new = torch.empty_like(c)
        cn_new = torch.empty(n, nc, dtype=torch.float32, device=x.device)
        block_d = triton.next_power_of_2(d)
        _update_kernel[(nc, n)](
            x, perm, offsets, c, c_new, cn_new, s, nc, x.stride(0), x.stride(1),
            DIM=d, BLOCK_D=block_d, BLOCK_R=32 if block_d <= 128 else 16, num_warps=4,
        )
    return perm, offsets, sizes, c_new, cn_new


def kmeans_triton(x: torch.Tensor, centroids: torch.Tensor, iters: int,
                  blocks: tuple[int, int, int, int] | None = None) -> KMeansResult:
    """``iters`` Lloyd iterations from ``centroids``; see :class:`KMeansResult`.

    Args:
        x: (N, S, D) fp16/bf16/fp32 points (dot products in x's dtype, fp32 accumulation).
        centroids: (N, C, D) initial centroids (any float dtype).
        iters: >= 0; with 0 the points are only assigned (centroids returned unchanged, as fp32).
        blocks: assignment tiles (BLOCK_M, BLOCK_C, warps, stages); None: the measured default.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    c = centroids.float().contiguous()
    cn = (c * c).sum(-1).contiguous()
    for _ in range(max(iters, 1)):
        labels, rank, hist, nb, bm = _assign(x, c, cn, with_sort=True, blocks=blocks)
        perm, offsets, sizes, c_new, cn_new = _sort_and_update(x, c, labels, rank, hist, nb, bm, update=iters > 0)
        if iters > 0:
            c, cn = c_new, cn_new
    return KMeansResult(labels, c, sizes.long(), offsets.long(), perm)


@torch.library.custom_op("svg2_kernels::kmeans", mutates_args=())
def _kmeans_op(
    x: torch.Tensor, centroids: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r = kmeans_triton(x, centroids, iters)
    c = r.centroids.clone() if r.centroids.data_ptr() == centroids.data_ptr() else r.centroids  # no aliasing
    return r.labels.long(), c, r.sizes, r.offsets, r.perm


@_kmeans_op.register_fake
def _(x, centroids, iters):
    n, s, _ = x.shape
    c, d = centroids.shape[1], centroids.shape[2]
    i64 = dict(dtype=torch.long, device=x.device)
    return (x.new_empty((n, s), **i64), x.new_empty((n, c, d), dtype=torch.float32), x.new_empty((n, c), **i64),
            x.new_empty((n, c + 1), **i64), x.new_empty((n, s), **i64))


class TritonKMeans(KMeansVariant):
    """Fused distance+argmin on tensor cores, counting-sort centroid update (no full sort)."""

    name = "triton"
    priority = 100
    # CPU only under Triton's interpreter (tests); on CPU otherwise the torch path is the right one.
    devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    requires = ("triton",)

    def not_supported_reasons(self, inputs: KMeansInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.dim > 256:
            reasons.append(f"dim {inputs.dim} > 256")
        return reasons

    def run(self, x, centroids, iters):
        # A custom op: torch.compile sees one opaque node with known output shapes.
        return _kmeans_op(x, centroids, int(iters))


register_kmeans_variant(TritonKMeans())


class FlashKMeans(KMeansVariant):
    """flash-kmeans (the SVG2 authors' k-means package), when installed: ``batch_kmeans_Euclid``.

    Its loop checks convergence on the host every iteration (a sync), so it is not graph-capturable.
    """

    name = "flash_kmeans"
    priority = 50
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    requires = ("flash_kmeans",)

    def run(self, x, centroids, iters):
        from flash_kmeans import batch_kmeans_Euclid

        if iters == 0:
            labels = kmeans_assign_triton(x, centroids)
            c = centroids.float()
        else:
            labels, c, _ = batch_kmeans_Euclid(x, centroids.shape[1], max_iters=iters, tol=-1.0,
                                               init_centroids=centroids.to(x.dtype))
            labels, c = labels.long(), c.float()
        sizes = torch.zeros(c.shape[:2], dtype=torch.long, device=x.device)
        sizes.scatter_add_(1, labels, torch.ones_like(labels))
        return labels, c, sizes


register_kmeans_variant(FlashKMeans())
