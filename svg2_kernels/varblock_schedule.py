"""Query-tile schedule of the variable-block kernel in two Triton launches (instead of ~50 torch ops).

The schedule lists ``(head, query cluster, first row)`` work items for the two query tiers (full
``block_m`` tiles plus a large remainder; small remainders of at most ``block_m_small`` rows), optionally
longest-first (by key tiles) inside each head or over all heads. The torch version
(:func:`svg2_kernels.varblock_attention._with_query_tiles_torch`) defines the result; this one builds the
same items in the same order (tested under Triton's interpreter and on the GPU). It is the default
(``TileConfig(triton_schedule=True)``; False: the torch ops). Why: at Wan 1.3B the eager SVG2 call is bound
by kernel launches, and the schedule was the largest group of small launches: its metadata fell from 2.23
to 0.74 ms eager on an H200.

1. ``_rank_kernel`` (one program per block of clusters): the position of every cluster in the schedule
   order, by counting the clusters that sort before it (key: head, then most key tiles first, then index;
   without LPT simply the index). O(N^2) compares for N = heads x (Cq + 1) clusters: a few tens of
   microseconds at N ~ 12k.
2. ``_items_kernel`` (one program): prefix sums of the tiles per cluster in that order, then every work
   slot finds its cluster by binary search and writes its item.
"""

from __future__ import annotations

import torch

from svg2_kernels._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from svg2_kernels.varblock_common import first_above

__all__ = ["build_work_items_triton"]

if HAS_TRITON:

    @triton.jit
    def _sort_key(idx, num_tiles_ptr, N, CQ1, LPT: tl.constexpr, ACROSS_HEADS: tl.constexpr):
        # int64 key, ascending = schedule order; the index breaks ties (a stable sort).
        valid = idx < N
        # bits: head (19) | 2^20 - 1 - key tiles (20) | index (24)
        if LPT:
            cost = tl.minimum(tl.load(num_tiles_ptr + idx, mask=valid, other=0), 1048575).to(tl.int64)
            key = (1048575 - cost) << 24
            if not ACROSS_HEADS:
                key += (idx // CQ1).to(tl.int64) << 44
        else:
            key = tl.zeros(idx.shape, dtype=tl.int64)
        return key + idx.to(tl.int64)

    @triton.jit
    def _rank_kernel(num_tiles_ptr, order_ptr, N, CQ1,
                     LPT: tl.constexpr, ACROSS_HEADS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key_i = _sort_key(i, num_tiles_ptr, N, CQ1, LPT, ACROSS_HEADS)
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for j0 in range(0, N, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            key_j = _sort_key(j, num_tiles_ptr, N, CQ1, LPT, ACROSS_HEADS)
            before = (key_j[None, :] < key_i[:, None]) & (j < N)[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        tl.store(order_ptr + rank, i, mask=i < N)  # order[position] = cluster

    @triton.jit
    def _tier_counts(c, qb_ptr, SEQ_Q, CQ1, BM: tl.constexpr, BS: tl.constexpr):
        # rows of flat cluster c (head n = c // CQ1, cluster i = c % CQ1; cluster CQ1 - 1 is the tail)
        n = c // CQ1
        i = c % CQ1
        lo = tl.load(qb_ptr + n * CQ1 + i)
        hi = tl.where(i + 1 < CQ1, tl.load(qb_ptr + n * CQ1 + i + 1, mask=i + 1 < CQ1, other=0), SEQ_Q)
        qsz = tl.maximum(hi - lo, 0)
        if BS > 0:
            rem = qsz % BM
            big = qsz // BM + (rem > BS).to(tl.int32)
            small = ((rem > 0) & (rem <= BS)).to(tl.int32)
        else:
            big = (qsz + BM - 1) // BM
            small = qsz * 0
        return big, small, qsz // BM

    @triton.jit
    def _store_items(ptr, t, c, first_row, live, in_range, CQ1):
        # work item t = (head, query cluster, first row) of flat cluster c; zeros in unused slots
        tl.store(ptr + t * 3, tl.where(live, c // CQ1, 0), mask=in_range)
        tl.store(ptr + t * 3 + 1, tl.where(live, c % CQ1, 0), mask=in_range)
        tl.store(ptr + t * 3 + 2, tl.where(live, first_row, 0), mask=in_range)

    @triton.jit
    def _items_kernel(order_ptr, qo_ptr, cum_big_ptr, cum_small_ptr,
                      work_ptr, num_work_ptr, work_s_ptr, num_work_s_ptr,
                      N, CQ1, SEQ_Q, T_BIG, T_SMALL,
                      BM: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr, LOG_N: tl.constexpr):
        # -- inclusive prefix sums of each tier's tiles, in schedule order --
        carry_b = 0
        carry_s = 0
        for p0 in range(0, N, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            pm = p < N
            c = tl.load(order_ptr + p, mask=pm, other=0)
            big, small, _ = _tier_counts(c, qo_ptr, SEQ_Q, CQ1, BM, BS)
            big = tl.where(pm, big, 0)
            small = tl.where(pm, small, 0)
            cb = tl.cumsum(big, 0) + carry_b
            cs = tl.cumsum(small, 0) + carry_s
            tl.store(cum_big_ptr + p, cb, mask=pm)
            tl.store(cum_small_ptr + p, cs, mask=pm)
            carry_b += tl.sum(big, 0)
            carry_s += tl.sum(small, 0)
        tl.store(num_work_ptr, carry_b)
        tl.store(num_work_s_ptr, carry_s)
        tl.debug_barrier()  # the scratch sums are read back by other threads of this program
        # -- every slot: its position p (first with cum > slot, binary search), cluster, tile --
        for t0 in range(0, T_BIG, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            pos = first_above(cum_big_ptr, t, N, LOG_N)
            live = t < carry_b
            c = tl.load(order_ptr + pos, mask=live, other=0)
            big, small, _ = _tier_counts(c, qo_ptr, SEQ_Q, CQ1, BM, BS)
            j = t - (tl.load(cum_big_ptr + pos, mask=live, other=0) - big)
            _store_items(work_ptr, t, c, j * BM, live, t < T_BIG, CQ1)
        for t0 in range(0, T_SMALL, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            pos = first_above(cum_small_ptr, t, N, LOG_N)
            live = t < carry_s
            c = tl.load(order_ptr + pos, mask=live, other=0)
            _, _, first = _tier_counts(c, qo_ptr, SEQ_Q, CQ1, BM, BS)
            _store_items(work_s_ptr, t, c, first * BM, live, t < T_SMALL, CQ1)


def build_work_items_triton(
    qo: torch.Tensor, num_tiles: torch.Tensor, seqlen_q: int, block_m: int, block_m_small: int,
    lpt: bool, lpt_global: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Work items of both tiers.

    Args:
        qo: (N, Cq + 1) int32 query cluster offsets; num_tiles: (N, Cq + 1) int32 key tiles per row (the tail
            row Cq included).
    Returns:
        work (T, 3), num_work (1,), work_small (T_s, 3), num_work_small (1,): int32; slots past the counts
        hold zeros.
    """
    n, cq1 = qo.shape  # cq1 = Cq + 1 offsets = Cq clusters + the tail row
    dev = qo.device
    nc = n * cq1
    if nc >= 1 << 24 or n >= 1 << 19:
        raise ValueError(f"{n} heads x {cq1} query clusters exceed the schedule builder's key (2^24 clusters, "
                         "2^19 heads); use fewer query clusters")
    t_big = n * (-(-seqlen_q // block_m) + cq1)
    t_small = nc if block_m_small > 0 else 0
    order = torch.empty(nc, dtype=torch.int32, device=dev)
    block = 128
    if lpt:
        _rank_kernel[(triton.cdiv(nc, block),)](num_tiles.contiguous(), order, nc, cq1, LPT=True,
                                                ACROSS_HEADS=lpt_global, BLOCK=block, num_warps=4)
    else:
        order = torch.arange(nc, dtype=torch.int32, device=dev)
    cum_b = torch.empty(nc, dtype=torch.int32, device=dev)
    cum_s = torch.empty(nc, dtype=torch.int32, device=dev)
    work = torch.empty(t_big, 3, dtype=torch.int32, device=dev)
    work_s = torch.empty(t_small, 3, dtype=torch.int32, device=dev)
    num_work = torch.empty(1, dtype=torch.int32, device=dev)
    num_work_s = torch.empty(1, dtype=torch.int32, device=dev)
    log_n = max(1, (nc - 1).bit_length())
    _items_kernel[(1,)](order, qo.contiguous(), cum_b, cum_s, work, num_work, work_s, num_work_s,
                        nc, cq1, seqlen_q, t_big, t_small,
                        BM=block_m, BS=block_m_small, BLOCK=1024, LOG_N=log_n, num_warps=8)
    return work, num_work, work_s, num_work_s
