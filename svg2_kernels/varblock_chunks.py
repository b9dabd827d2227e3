"""The ``triton_chunks`` kernel: key tiles made of contiguous chunks (any CUDA GPU), and the chunk table
that both Triton kernels read.

Same contract as :func:`svg2_kernels.varblock_attention.varblock_attention` (query cluster ``i`` attends to the
union of its selected key clusters, each a contiguous range of the cluster-sorted K/V):

* The selected key clusters of one query cluster are merged into runs (adjacent selected clusters; empty
  clusters never break a run) and every run is cut into **chunks** of ``CH`` rows, the last one partial.
  A chunk is one int32: ``physical start << 8 | valid rows``. A key tile of ``BLOCK_N`` rows is
  ``BLOCK_N // CH`` consecutive chunks, so row ``r`` of tile ``t`` lives at ``start[t * NCH + r // CH] +
  r % CH``: one (broadcast) load gives every row address, with no search and no loop-carried state.
* Why: when a tile's row addresses depend on loads inside the loop (a search over run starts), Triton's
  pipeliner keeps K/V only one stage ahead and leaves those loads synchronous, so every iteration waits on
  global-memory latency. Here the address of tile ``t`` is a pure function of ``t`` and one pipelinable
  load, so ``num_stages`` = 3 keeps two K/V tiles in flight (notes/kernels.md).
* Cost: chunk padding, at most ``CH - 1`` rows per run.

The chunk table has a fixed upper bound per query cluster (``ceil(Sk / CH) + ceil(Ck / 2) + 1`` slots), so
it is built on the GPU without host syncs (CUDA-graph capturable).
"""

from __future__ import annotations

import torch

from svg2_kernels._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from svg2_kernels.varblock_common import (
        first_above,
        online_softmax_init,
        online_softmax_step,
        query_tile,
        store_output,
    )

__all__ = ["build_chunk_table", "launch_chunk_kernel", "MAX_SEQ"]

MAX_SEQ = 1 << 23  # a chunk packs its start in 23 bits (int32, 8 bits of valid-row count)


def build_chunk_table(
    k_offsets: torch.Tensor, sel: torch.Tensor, seqlen_k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of the selected key runs of every (head, query cluster) row.

    Args:
        k_offsets: (N, Ck + 1) int32 key cluster offsets in the sorted K.
        sel: (N, R, Ck) bool, selected key clusters of each of the R rows (query clusters, tail included).
        seqlen_k: rows of the sorted K; chunk: rows per chunk (<= 255).
    Returns:
        table: (N, R, T) int32 packed chunks (``start << 8 | valid``), slots past ``count`` zero.
        count: (N, R) int32 chunks per row.
    """
    if seqlen_k >= MAX_SEQ:
        raise ValueError(f"sequence length {seqlen_k} >= {MAX_SEQ}: the chunk layout packs starts in 23 bits; "
                         "use kernel 'torch' or 'flex' for longer sequences")
    if not 1 <= chunk <= 255:
        raise ValueError(f"chunk must be in [1, 255], got {chunk}")
    n, r, ck = sel.shape
    dev = sel.device
    i32 = torch.int32
    ksz = (k_offsets[:, 1:] - k_offsets[:, :-1]).to(i32)  # (n, ck)
    nonempty = (ksz > 0).unsqueeze(1)
    # Empty clusters have no rows, so they never split a run: a run is a maximal stretch of selected or
    # empty clusters (its physical start is the offset of its first cluster, empty or not).
    cover = sel | ~nonempty
    prev = torch.zeros_like(cover)
    prev[..., 1:] = cover[..., :-1]
    start = cover & ~prev
    run_id = torch.cumsum(start, dim=-1, dtype=i32) - 1
    rid = run_id.clamp_min(0).long()
    run_len = torch.zeros(n, r, ck, dtype=i32, device=dev)
    run_len.scatter_add_(-1, rid, torch.where(sel & nonempty, ksz.unsqueeze(1), 0))
    run_pstart = torch.zeros(n, r, ck, dtype=i32, device=dev)
    run_pstart.scatter_add_(-1, rid, torch.where(start, k_offsets[:, None, :-1].to(i32), 0))
    nch = (run_len + (chunk - 1)) // chunk  # (n, r, ck) chunks per run (0 for unused run slots)
    cum = torch.cumsum(nch, dim=-1, dtype=i32)
    count = cum[..., -1].contiguous()
    t_max = -(-seqlen_k // chunk) + (ck + 1) // 2 + 1
    # Run of every chunk slot: mark each run's first slot with its id, then a running maximum.
    first = cum - nch
    marker = torch.full((n, r, t_max + 1), -1, dtype=i32, device=dev)
    ids = torch.arange(ck, device=dev, dtype=i32).expand(n, r, ck)
    marker.scatter_reduce_(-1, torch.where(nch > 0, first, t_max).long(), ids, reduce="amax")
    slot_run = torch.cummax(marker[..., :t_max], dim=-1).values.clamp_min(0).long()
    slot = torch.arange(t_max, device=dev, dtype=i32)
    j = slot - first.gather(-1, slot_run)  # chunk index inside its run
    p = run_pstart.gather(-1, slot_run) + j * chunk
    valid = (run_len.gather(-1, slot_run) - j * chunk).clamp(0, chunk)
    table = torch.where(slot < count.unsqueeze(-1), (p << 8) | valid, 0).to(i32).contiguous()
    return table, count


if HAS_TRITON:

    @triton.jit
    def _chunk_fwd_kernel(
        Q, K, V, Out, LSE, QIDX,
        work_ptr, num_work_ptr, q_bounds_ptr, count_ptr, table_ptr,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        H, Cq1, T_ROW, SEQ_Q, SEQ_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr, GATHER_Q: tl.constexpr,
        STORE_LSE: tl.constexpr,
    ):
        NCH: tl.constexpr = BLOCK_N // CH
        pid = tl.program_id(0)
        if pid >= tl.load(num_work_ptr):
            return
        q, n, b, h, row_id, q_rows, m_mask, offs_d, d_mask = query_tile(
            pid, Q, QIDX, work_ptr, q_bounds_ptr, stride_qb, stride_qh, stride_qs, H, Cq1, SEQ_Q,
            HEAD_DIM, BLOCK_D, BLOCK_M, GATHER_Q,
        )
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        chunks = table_ptr + row_id.to(tl.int64) * T_ROW

        m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
        n_chunks = tl.load(count_ptr + row_id)
        n_tiles = (n_chunks + NCH - 1) // NCH
        offs_n = tl.arange(0, BLOCK_N)
        within = offs_n % CH
        for t in range(0, n_tiles):
            # -- row addresses: one (broadcast) load of this tile's chunks; slots past the count read 0 --
            slot = t * NCH + offs_n // CH
            packed = tl.load(chunks + slot, mask=slot < n_chunks, other=0)
            n_mask = within < (packed & 255)
            # Padding rows read real rows (clamped into the head) and are masked out of the scores only.
            rows = tl.minimum((packed >> 8) + within, SEQ_K - 1)
            k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=d_mask[None, :], other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :], mask=d_mask[None, :], other=0.0)
            # -- scores and online softmax --
            qk = tl.dot(q, tl.trans(k))
            m_i, l_i, acc = online_softmax_step(qk, n_mask, v, qk_scale, m_i, l_i, acc)
        store_output(Out, LSE, acc, m_i, l_i, n, b, h, q_rows, m_mask, offs_d, d_mask, stride_ob, stride_oh,
                     stride_os, SEQ_Q, STORE_LSE)


def launch_chunk_kernel(q, k, v, out, lse, qidx, gather_q: bool, work, num_work, q_bounds, count, table,
                        scale: float, block_m: int, block_n: int, chunk: int, num_warps: int,
                        num_stages: int):
    """One launch over the ``work`` items (tensors already validated by the caller); ``lse`` (B * H, Sq)
    float32 or None. Returns Triton's compiled kernel (its ``asm`` / ``n_regs`` / ``n_spills`` are what
    benchmarks record)."""
    h, sq, d = q.shape[1], q.shape[2], q.shape[3]
    return _chunk_fwd_kernel[(work.shape[0],)](
        q, k, v, out, out if lse is None else lse, qidx,
        work, num_work, q_bounds, count, table,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, count.shape[1], table.shape[-1], sq, k.shape[2],
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_M=block_m, BLOCK_N=block_n, CH=chunk, GATHER_Q=gather_q, STORE_LSE=lse is not None,
        num_warps=num_warps, num_stages=num_stages,
    )


if HAS_TRITON:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _chunk_table_kernel(
        KO, BM, TABLE, COUNT, F_SCR, P_SCR,
        Cq, Ck, T_ROW,
        CH: tl.constexpr, BLOCK_C: tl.constexpr, LOG_C: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One program per (head, query cluster) row; row Cq is the tail "cluster" with no keys.
        pid = tl.program_id(0)
        n = pid // (Cq + 1)
        r = pid % (Cq + 1)
        c = tl.arange(0, BLOCK_C)
        cm = c < Ck
        ko = KO + n.to(tl.int64) * (Ck + 1)
        bm = BM + (n.to(tl.int64) * Cq + r) * Ck
        has_row = r < Cq
        lo = tl.load(ko + c, mask=cm, other=0)
        hi = tl.load(ko + c + 1, mask=cm, other=0)
        lo_prev = tl.load(ko + c - 1, mask=cm & (c >= 1), other=0)
        hi_next = tl.load(ko + c + 2, mask=(c + 1) < Ck, other=0)
        sel = tl.load(bm + c, mask=cm & has_row, other=0) != 0
        sel_prev = tl.load(bm + c - 1, mask=cm & (c >= 1) & has_row, other=0) != 0
        sel_next = tl.load(bm + c + 1, mask=((c + 1) < Ck) & has_row, other=0) != 0
        # -- runs: maximal stretches of selected or empty clusters (empty ones have no rows) --
        cover = (sel | (hi == lo)) & cm
        cover_prev = (sel_prev | (lo == lo_prev)) & (c >= 1)
        cover_next = (sel_next | (hi_next == hi)) & ((c + 1) < Ck)
        start = cover & ~cover_prev
        end = cover & ~cover_next
        pstart = tl.associative_scan(tl.where(start, lo, 0), 0, _max_combine)  # offsets never decrease
        length = tl.where(end, hi - pstart, 0)  # a run is physically contiguous: lo[first] .. hi[last]
        nch = (length + CH - 1) // CH
        f_incl = tl.cumsum(nch, 0)
        count = tl.sum(nch, 0)
        tl.store(COUNT + pid, count)
        scr = pid.to(tl.int64) * BLOCK_C
        tl.store(F_SCR + scr + c, tl.where(cm, f_incl, 2147483647))
        tl.store(P_SCR + scr + c, pstart)
        tl.debug_barrier()  # the scratch rows are read back by other threads of this program
        out = TABLE + pid.to(tl.int64) * T_ROW
        for u0 in range(0, count, BLOCK_T):
            u = u0 + tl.arange(0, BLOCK_T)
            # -- run of slot u: the first cluster e with f_incl[e] > u (slots past Ck hold INT_MAX) --
            e = first_above(F_SCR + scr, u, BLOCK_C, LOG_C)
            f_e = tl.load(F_SCR + scr + e)
            p = tl.load(P_SCR + scr + e)
            ln = tl.load(ko + e + 1) - p
            j = u - (f_e - (ln + CH - 1) // CH)
            valid = tl.minimum(ln - j * CH, CH)
            tl.store(out + u, ((p + j * CH) << 8) | valid, mask=u < count)


def build_chunk_table_triton(
    k_offsets: torch.Tensor, block_map: torch.Tensor, seqlen_k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_chunk_table` as one Triton launch (no host sync); slots past ``count`` are undefined.

    Args:
        k_offsets: (N, Ck + 1) int32; block_map: (N, Cq, Ck) bool (the tail row Cq is added here).
    Returns:
        table (N, Cq + 1, T) int32, count (N, Cq + 1) int32.
    """
    if seqlen_k >= MAX_SEQ:
        raise ValueError(f"sequence length {seqlen_k} >= {MAX_SEQ}: the chunk layout packs starts in 23 bits; "
                         "use kernel 'torch' or 'flex' for longer sequences")
    n, cq, ck = block_map.shape
    dev = block_map.device
    t_max = -(-seqlen_k // chunk) + (ck + 1) // 2 + 1
    block_c = max(16, triton.next_power_of_2(ck))
    rows = n * (cq + 1)
    table = torch.empty(n, cq + 1, t_max, dtype=torch.int32, device=dev)
    count = torch.empty(n, cq + 1, dtype=torch.int32, device=dev)
    f_scr = torch.empty(rows, block_c, dtype=torch.int32, device=dev)
    p_scr = torch.empty(rows, block_c, dtype=torch.int32, device=dev)
    _chunk_table_kernel[(rows,)](
        k_offsets.contiguous(), block_map.contiguous().view(torch.uint8), table, count, f_scr, p_scr,
        cq, ck, t_max,
        CH=chunk, BLOCK_C=block_c, LOG_C=block_c.bit_length() - 1, BLOCK_T=128,
        num_warps=4 if block_c <= 1024 else 8,
    )
    return table, count
