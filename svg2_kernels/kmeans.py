"""Batched Lloyd k-means in Triton: fused distance + argmin, and a sort-free centroid update.

One iteration is four launches (five when the update is split), none of which materialises the
``num_points x num_clusters`` distances:

1. ``_assign_kernel`` (per batch, tile of ``BLOCK_M`` points): ``argmin_c ||c||^2 - 2 x.c`` over centroid
   tiles on the tensor cores, and the label histogram of each sort tile (int atomics on the tile's own row).
2. ``_slots_kernel`` (per batch, block of clusters): cluster sizes, and in place the points of each cluster
   in earlier sort tiles (a prefix sum over tiles); a torch cumsum of the sizes gives the offsets.
3. ``_scatter_kernel`` (per point tile, i.e. several sort tiles): slot = cluster offset + earlier points +
   stable rank inside the sort tile (from a bitonic sort of the tile's labels by default) ->
   ``perm[slot] = point``. This is a *stable counting sort* of the labels: ``perm`` equals
   ``argsort(labels, stable=True)``, so the final iteration's labels give the semantic permutation for free.
4. ``_update_kernel`` (per batch, cluster, piece): sum of the cluster's rows read through ``perm``, with
   ``_finalize_kernel`` adding the pieces when a cluster is split over programs; empty clusters keep the
   old centroid. Also writes the centroids in x's dtype and the squared norms the next assignment needs,
   and on request the rows themselves in sorted order (the permuted K the attention reads).

Semantics match :mod:`svg2_kernels.reference` and the ``KMeansVariant`` contract in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svg2_kernels._triton import HAS_TRITON, interpreting, tl, triton
from svg2_kernels.registry import KMeansInputs, KMeansVariant, register_kmeans_variant

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
    x_sorted: torch.Tensor | None = None  # x[n, perm[n]] when asked for (kmeans_triton(sort_x=True))


@dataclass(frozen=True)
class KMeansTiles:
    """Launch parameters of one Lloyd iteration; the defaults are the measured GPU defaults.

    block_m, block_c, warps, stages: the assignment tile (points x centroids) and its launch.
    sort_block: points per counting-sort tile (divides block_m; 0 = block_m). The stable rank inside a
        tile costs sort_block compares per point, the per-tile histogram ``num_points / sort_block`` rows.
    update_split: programs per cluster in the centroid update (0 = enough for about 16k programs); with
        more than one (a power of two), partial sums go through a small buffer and a second launch (still
        deterministic).
    update_rows: rows per step of the centroid update's gather loop (0 = 32, or 16 for head dims > 128).
    rank_by_sort: the stable rank inside a sort tile from a sort of the tile's labels, instead of counting
        the earlier points with the same label (sort_block compares per point).

    Measured and dropped (``experiments/bench_kmeans.py`` on an H200): an elementwise running minimum over the
    centroid tiles reduced once at the end (30-40% slower); the argmin as a second min over
    ``where(dist == min, c, big)`` (no faster than Triton's argmin); point and centroid tiles as
    tensor-descriptor (TMA) loads (5.72 -> 6.84 ms Q + K at Wan 14B (100, 500), 8.63 -> 10.34 ms at
    (300, 1000): faster without the sort bookkeeping, slower with it).
    """

    block_m: int = 256
    block_c: int = 64
    warps: int = 8
    stages: int = 3
    sort_block: int = 128
    update_split: int = 0
    update_rows: int = 0
    rank_by_sort: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_c"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KMeansTiles.{name} must be a power of two >= 16, got {v}")
        sb = self.sort_block or self.block_m
        if sb & (sb - 1) or sb > self.block_m or sb < 16:
            raise ValueError(f"KMeansTiles.sort_block must be a power of two in [16, block_m={self.block_m}] "
                             f"(or 0 for block_m), got {self.sort_block}")
        u = self.update_split
        if u < 0 or u & (u - 1) or u > 64:
            raise ValueError(f"KMeansTiles.update_split must be 0 (automatic) or a power of two <= 64, got {u}")
        r = self.update_rows
        if r and (r < 8 or r & (r - 1) or r > 256):
            raise ValueError(f"KMeansTiles.update_rows must be 0 (automatic) or a power of two in [8, 256], got {r}")

    @property
    def sort_tile(self) -> int:
        return self.sort_block or self.block_m


def default_tiles(x: torch.Tensor) -> KMeansTiles:
    """The measured default launch parameters for x's device."""
    if x.device.type != "cuda" or interpreting():
        return KMeansTiles(16, 16, 4, 1, sort_block=16)
    # Fastest of 5 variants at Wan 14B (100, 500) and (300, 1000) on an H200 (bench_kmeans_r20): the stable rank
    # by sorting each tile's labels made the scatter 3.5-4.6x faster than counting earlier equal labels
    # (Q 1.95 -> 1.77 ms, K 3.33 -> 3.10 ms with 128-point tiles); with it, 128-point sort tiles (half the
    # per-tile histogram of 64-point ones) were fastest: Q / K 1.67 / 3.02 ms at (100, 500), 2.29 / 4.98 at
    # (300, 1000). Before the sort (bench_kmeans_r16), 128-point assignment tiles had won for Q.
    return KMeansTiles()


def _tiles(x: torch.Tensor, blocks) -> KMeansTiles:
    if blocks is None:
        return default_tiles(x)
    if isinstance(blocks, KMeansTiles):
        return blocks
    return KMeansTiles(*blocks)


if HAS_TRITON:

    @triton.jit
    def _assign_kernel(
        X, C, CN, LABELS, HIST,
        S, NC, NB,
        stride_xn, stride_xs, stride_cn, stride_cc,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        SORT_BLOCK: tl.constexpr, WITH_SORT: tl.constexpr,
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
            dist = cn[None, :] - 2.0 * tl.dot(x, c)
            t_min, t_idx = tl.min(dist, axis=1, return_indices=True)  # one reduction for both
            t_idx = t_idx.to(tl.int32) + c0
            better = t_min < best  # strict: the earliest centroid tile wins ties, as argmin does
            best = tl.where(better, t_min, best)
            best_idx = tl.where(better, t_idx, best_idx)
        tl.store(LABELS + n * S + offs_m, best_idx.to(tl.int64), mask=m_mask)
        if WITH_SORT:
            # The sort tile's label histogram (int atomics on the tile's own row: no contention across
            # tiles). The stable rank inside the tile is left to the scatter kernel, away from the GEMM's
            # registers.
            tile = pid_b * (BLOCK_M // SORT_BLOCK) + tl.arange(0, BLOCK_M) // SORT_BLOCK
            tl.atomic_add(HIST + (n * NB + tile) * NC + best_idx, tl.full([BLOCK_M], 1, tl.int32), mask=m_mask)

    @triton.jit
    def _slots_kernel(HIST, SIZES, NC, NB, BLOCK_T: tl.constexpr, BLOCK_CL: tl.constexpr):
        """Cluster sizes, and in place: histogram (tile, cluster) -> points of that cluster in earlier tiles
        (a prefix sum over tiles, BLOCK_T tiles per step so the loads are independent of the running sum)."""
        n = tl.program_id(1).to(tl.int64)
        offs_c = tl.program_id(0) * BLOCK_CL + tl.arange(0, BLOCK_CL)
        c_mask = offs_c < NC
        run = tl.zeros([BLOCK_CL], dtype=tl.int32)
        for t0 in range(0, NB, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < NB)[:, None] & c_mask[None, :]
            p = HIST + (n * NB + offs_t[:, None]) * NC + offs_c[None, :]
            h = tl.load(p, mask=mask, other=0)
            tl.store(p, run[None, :] + tl.cumsum(h, axis=0) - h, mask=mask)
            run += tl.sum(h, axis=0)
        tl.store(SIZES + n * NC + offs_c, run, mask=c_mask)

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _scatter_kernel(LABELS, OFFS, EARLIER, PERM, S, NC, NB, BLOCK_M: tl.constexpr, SORT_BLOCK: tl.constexpr,
                        RANK_BY_SORT: tl.constexpr):
        """perm[slot] = point, slot = cluster offset + its points in earlier sort tiles + stable rank in its
        tile. BLOCK_M points (BLOCK_M // SORT_BLOCK sort tiles) per program.

        The stable rank: RANK_BY_SORT sorts each tile's (label, position) keys (a bitonic network, about
        log^2 compares per point) and takes each point's distance from the start of its label's run;
        otherwise every point counts the earlier points with its label (SORT_BLOCK compares per point)."""
        T: tl.constexpr = BLOCK_M // SORT_BLOCK
        pid_b = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        j = tl.arange(0, SORT_BLOCK)
        base = pid_b * BLOCK_M + tl.arange(0, T)[:, None] * SORT_BLOCK  # (T, 1): first point of each sort tile
        tile = pid_b * T + tl.arange(0, T)[:, None]
        offs = base + j[None, :]
        lab = tl.load(LABELS + n * S + offs, mask=offs < S, other=NC).to(tl.int32)  # padding: label NC, sorts last
        if RANK_BY_SORT:
            key = tl.sort(lab * SORT_BLOCK + j[None, :], dim=1)
            lab = key // SORT_BLOCK
            offs = base + key % SORT_BLOCK  # the point at this sorted position
            p = tl.broadcast_to(j[None, :], (T, SORT_BLOCK))
            prev = tl.gather(lab, tl.maximum(p - 1, 0), axis=1)
            start = tl.associative_scan(tl.where((lab != prev) | (p == 0), p, 0), 1, _max_combine)
            rank = p - start
        else:
            same = (lab[:, :, None] == lab[:, None, :]) & (j[None, None, :] < j[None, :, None])
            rank = tl.sum(same.to(tl.int32), axis=2)
        m_mask = lab < NC
        lab0 = tl.where(m_mask, lab, 0)
        slot = (tl.load(OFFS + n * (NC + 1) + lab0, mask=m_mask, other=0)
                + tl.load(EARLIER + (n * NB + tile) * NC + lab0, mask=m_mask, other=0) + rank)
        tl.store(PERM + n * S + slot, offs.to(tl.int64), mask=m_mask)

    @triton.jit
    def _finish_centroid(total, cnt, C_OLD, C_NEW, C_LOW, CN_NEW, n, c, NC, offs_d, d_mask,
                         DIM: tl.constexpr):
        old = tl.load(C_OLD + (n * NC + c) * DIM + offs_d, mask=d_mask, other=0.0)
        new = tl.where(cnt > 0, total / tl.maximum(cnt, 1.0), old)  # empty clusters keep their centroid
        tl.store(C_NEW + (n * NC + c) * DIM + offs_d, new, mask=d_mask)
        tl.store(C_LOW + (n * NC + c) * DIM + offs_d, new.to(C_LOW.dtype.element_ty), mask=d_mask)
        tl.store(CN_NEW + n * NC + c, tl.sum(new * new, axis=0))

    @triton.jit
    def _update_kernel(
        X, PERM, OFFS, C_OLD, C_NEW, C_LOW, CN_NEW, PART, XS,
        S, NC, stride_xn, stride_xs,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
        WRITE_SORTED: tl.constexpr,
    ):
        """Sum of cluster c's rows (read through perm), as piece j of SPLIT; optionally also writes the
        rows in sorted order (the permuted tensor the attention needs, for the price of the store)."""
        c = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        j = tl.program_id(2)
        start = tl.load(OFFS + n * (NC + 1) + c)
        end = tl.load(OFFS + n * (NC + 1) + c + 1)
        per = tl.cdiv(end - start, SPLIT)
        lo = start + j * per
        hi = tl.minimum(lo + per, end)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DIM
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < hi
            idx = tl.load(PERM + n * S + offs_r, mask=r_mask, other=0)
            rows = tl.load(X + n * stride_xn + idx[:, None] * stride_xs + offs_d[None, :],
                           mask=r_mask[:, None] & d_mask[None, :], other=0.0)
            if WRITE_SORTED:
                tl.store(XS + (n * S + offs_r[:, None]) * DIM + offs_d[None, :], rows,
                         mask=r_mask[:, None] & d_mask[None, :])
            acc += rows.to(tl.float32)
        total = tl.sum(acc, axis=0)
        if SPLIT == 1:
            _finish_centroid(total, (end - start).to(tl.float32), C_OLD, C_NEW, C_LOW, CN_NEW, n, c, NC,
                             offs_d, d_mask, DIM)
        else:
            tl.store(PART + ((n * NC + c) * SPLIT + j) * BLOCK_D + offs_d, total)

    @triton.jit
    def _finalize_kernel(PART, OFFS, C_OLD, C_NEW, C_LOW, CN_NEW, NC,
                         DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):
        c = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DIM
        parts = tl.load(PART + ((n * NC + c) * SPLIT + tl.arange(0, SPLIT)[:, None]) * BLOCK_D + offs_d[None, :])
        cnt = (tl.load(OFFS + n * (NC + 1) + c + 1) - tl.load(OFFS + n * (NC + 1) + c)).to(tl.float32)
        _finish_centroid(tl.sum(parts, axis=0), cnt, C_OLD, C_NEW, C_LOW, CN_NEW, n, c, NC, offs_d, d_mask, DIM)


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid: x (N, S, D), centroids (N, C, D) -> labels (N, S) int64."""
    c = centroids.float().contiguous()
    labels, _ = _assign(x, c.to(x.dtype), (c * c).sum(-1), with_sort=False, tiles=default_tiles(x))
    return labels


def _assign(x, c_low, cn, with_sort: bool, tiles: KMeansTiles):
    """c_low: centroids in x's dtype (every point tile re-reads all of them: half the bytes of fp32 and no
    conversion in the kernel); cn: their fp32 squared norms. Returns labels and, with the sort, the
    (N, sort tiles, C) label histogram."""
    n, s, d = x.shape
    nc = c_low.shape[1]
    nb = triton.cdiv(s, tiles.block_m)
    labels = torch.empty(n, s, dtype=torch.long, device=x.device)
    hist = torch.zeros(n, nb * (tiles.block_m // tiles.sort_tile), nc, dtype=torch.int32, device=x.device) \
        if with_sort else labels
    _assign_kernel[(nb, n)](
        x, c_low, cn, labels, hist, s, nc, hist.shape[1] if with_sort else 0,
        x.stride(0), x.stride(1), c_low.stride(0), c_low.stride(1),
        DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=tiles.block_m, BLOCK_C=tiles.block_c,
        SORT_BLOCK=tiles.sort_tile, WITH_SORT=with_sort, num_warps=tiles.warps, num_stages=tiles.stages,
    )
    return labels, hist


def _counting_sort(labels, hist, tiles: KMeansTiles):
    """perm (N, S) int64 = stable argsort of labels; int32 sizes (N, C) and offsets (N, C + 1)."""
    n, s = labels.shape
    nb, nc = hist.shape[1], hist.shape[2]
    sizes = torch.empty(n, nc, dtype=torch.int32, device=labels.device)
    block_cl = min(64, triton.next_power_of_2(nc))
    # 64 tiles per step: the scan's steps are serial, and 16 per step left Q's (2 programs per head) at 1182
    # sort tiles latency-bound.
    _slots_kernel[(triton.cdiv(nc, block_cl), n)](hist, sizes, nc, nb, BLOCK_T=64, BLOCK_CL=block_cl, num_warps=4)
    offsets = torch.zeros(n, nc + 1, dtype=torch.int32, device=labels.device)
    torch.cumsum(sizes, dim=1, out=offsets[:, 1:])
    perm = torch.empty(n, s, dtype=torch.long, device=labels.device)
    _scatter_kernel[(triton.cdiv(s, tiles.block_m), n)](labels, offsets, hist, perm, s, nc, nb, BLOCK_M=tiles.block_m,
                                                        SORT_BLOCK=tiles.sort_tile, RANK_BY_SORT=tiles.rank_by_sort,
                                                        num_warps=4)
    return perm, sizes, offsets


def _update_split(tiles: KMeansTiles, n: int, nc: int, s: int) -> int:
    if tiles.update_split:
        return tiles.update_split
    # Enough programs to fill the GPU: one cluster per program leaves Q (few, big clusters) latency-bound.
    split = 1
    while n * nc * split < 16384 and s // (nc * split) > 256 and split < 8:
        split *= 2
    return split


def _update(x, perm, offsets, c, tiles: KMeansTiles, x_sorted: torch.Tensor | None):
    n, s, d = x.shape
    nc = c.shape[1]
    block_d = triton.next_power_of_2(d)
    split = _update_split(tiles, n, nc, s)
    c_new = torch.empty_like(c)
    c_low = torch.empty(c.shape, dtype=x.dtype, device=x.device)
    cn_new = torch.empty(n, nc, dtype=torch.float32, device=x.device)
    part = torch.empty(n * nc * split * block_d if split > 1 else 1, dtype=torch.float32, device=x.device)
    _update_kernel[(nc, n, split)](
        x, perm, offsets, c, c_new, c_low, cn_new, part, x_sorted if x_sorted is not None else x,
        s, nc, x.stride(0), x.stride(1),
        DIM=d, BLOCK_D=block_d, BLOCK_R=tiles.update_rows or (32 if block_d <= 128 else 16), SPLIT=split,
        WRITE_SORTED=x_sorted is not None, num_warps=4,
    )
    if split > 1:
        _finalize_kernel[(nc, n)](part, offsets, c, c_new, c_low, cn_new, nc, DIM=d, BLOCK_D=block_d, SPLIT=split,
                                  num_warps=4)
    return c_new, c_low, cn_new


def kmeans_triton(x: torch.Tensor, centroids: torch.Tensor, iters: int,
                  blocks: KMeansTiles | tuple | None = None, sort_x: bool = False) -> KMeansResult:
    """``iters`` Lloyd iterations from ``centroids``; see :class:`KMeansResult`.

    Args:
        x: (N, S, D) fp16/bf16/fp32 points (dot products in x's dtype, fp32 accumulation).
        centroids: (N, C, D) initial centroids (any float dtype).
        iters: >= 0; with 0 the points are only assigned (centroids returned unchanged, as fp32).
        blocks: :class:`KMeansTiles` (or its fields as a tuple); None: the measured default.
        sort_x: also return ``x_sorted`` = x rows in cluster order (``x[n, perm[n]]``). The last
            iteration's centroid update reads exactly those rows, so it stores them on the way.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    tiles = _tiles(x, blocks)
    c = centroids.float().contiguous()
    c_low = c.to(x.dtype)
    cn = (c * c).sum(-1).contiguous()
    x_sorted = None
    for it in range(max(iters, 1)):
        labels, hist = _assign(x, c_low, cn, with_sort=True, tiles=tiles)
        perm, sizes, offsets = _counting_sort(labels, hist, tiles)
        if iters > 0:
            last = it == iters - 1
            if sort_x and last:
                x_sorted = torch.empty_like(x)
            c, c_low, cn = _update(x, perm, offsets, c, tiles, x_sorted if last else None)
    if sort_x and x_sorted is None:  # iters == 0: no update pass to ride on
        from svg2_kernels.permute import permute_rows

        x_sorted = permute_rows(x, perm)
    return KMeansResult(labels, c, sizes.long(), offsets.long(), perm, x_sorted)


@torch.library.custom_op("svg2_kernels::kmeans", mutates_args=())
def _kmeans_op(
    x: torch.Tensor, centroids: torch.Tensor, iters: int, sort_x: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r = kmeans_triton(x, centroids, iters, sort_x=sort_x)
    c = r.centroids.clone() if r.centroids.data_ptr() == centroids.data_ptr() else r.centroids  # no aliasing
    x_sorted = r.x_sorted if sort_x else x.new_empty((0,))
    return r.labels.long(), c, r.sizes, r.offsets, r.perm, x_sorted


@_kmeans_op.register_fake
def _(x, centroids, iters, sort_x=False):
    n, s, _ = x.shape
    c, d = centroids.shape[1], centroids.shape[2]
    i64 = dict(dtype=torch.long, device=x.device)
    return (x.new_empty((n, s), **i64), x.new_empty((n, c, d), dtype=torch.float32), x.new_empty((n, c), **i64),
            x.new_empty((n, c + 1), **i64), x.new_empty((n, s), **i64), x.new_empty(x.shape if sort_x else (0,)))


class TritonKMeans(KMeansVariant):
    """Fused distance+argmin on tensor cores, counting-sort centroid update (no full sort)."""

    name = "triton"
    priority = 100
    sorts_points = True  # the last update writes x in cluster order (sort_x): no separate K gather
    # CPU only under Triton's interpreter (tests); on CPU otherwise the torch path is the right one.
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    requires = ("triton",)

    def not_supported_reasons(self, inputs: KMeansInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.dim > 256:
            reasons.append(f"dim {inputs.dim} > 256")
        return reasons

    def run(self, x, centroids, iters, sort_x: bool = False):
        # A custom op: torch.compile sees one opaque node with known output shapes.
        out = _kmeans_op(x, centroids, int(iters), bool(sort_x))
        return out if sort_x else out[:5]


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
