"""The ``triton_tma`` kernel: key tiles are whole boxes of one run, loaded by TMA (Hopper, sm_90+).

Same contract as :func:`svg2_kernels.varblock_attention.varblock_attention`. Key side: every selected run (a
maximal stretch of selected, adjacent key clusters, physically contiguous in the cluster-sorted K/V) is cut
into tiles of ``BLOCK_N`` consecutive rows, the last one partial. A tile is one int32, ``start << 8 | valid
rows`` (the chunk table of :mod:`svg2_kernels.varblock_chunks` with ``chunk = BLOCK_N``), so it is **one
contiguous box**: K and V tiles are tensor-descriptor loads (TMA, straight into shared memory, no per-row
address registers), and rows past ``valid`` get an additive ``-inf`` bias in the scores.

Why: on dense tiles the same online-softmax loop runs at 0.88-0.95 of cuDNN with descriptor loads,
0.83-0.85 with contiguous pointer loads, and 0.55-0.65 with per-row addresses of 16-row chunks (Wan 1.3B and
14B shapes, H200; notes/kernels.md). The price is key padding up to ``BLOCK_N - 1`` rows per run, which
ordering key clusters so that co-selected ones are adjacent (:func:`svg2_kernels.order.chain_order`) keeps
small: runs get longer, fewer of them end in a partial tile.
"""

from __future__ import annotations

import torch

from svg2_kernels._triton import HAS_TMA, HAS_TRITON, TensorDescriptor, interpreting, tl, triton

if HAS_TRITON:
    from svg2_kernels.varblock_common import online_softmax_init, online_softmax_step, query_tile, store_output

__all__ = ["launch_tma_kernel", "tma_refusals"]


def tma_refusals(device_type: str, dtype: torch.dtype, head_dim: int, block_n: int | None = None) -> list[str]:
    """Why the descriptor kernel cannot take inputs of this kind (empty when it can), each with the fix."""
    reasons = []
    if not HAS_TMA:
        reasons.append("this Triton has no tensor descriptors (triton.tools.tensor_descriptor, Triton >= 3.4): "
                       "upgrade Triton or use kernel 'triton_chunks'")
    if block_n is not None and not 16 <= block_n <= 128:
        reasons.append(f"block_n {block_n} not in [16, 128] (one TMA box per tile; the tile table packs at most "
                       "255 valid rows)")
    esize = dtype.itemsize
    if (head_dim * esize) % 16:
        reasons.append(f"head dim {head_dim} x {esize} bytes is not a multiple of 16 bytes (TMA rows): "
                       "use kernel 'triton_chunks'")
    if head_dim > 128:
        reasons.append(f"head dim {head_dim} > 128: 128-row tiles of it exceed shared memory; kernel "
                       "'triton_chunks' runs it with 64x64 tiles")
    if device_type == "cuda" and not interpreting() and torch.cuda.is_available():
        if torch.cuda.get_device_capability()[0] < 9:
            reasons.append("TMA needs sm_90 (Hopper) or newer: use kernel 'triton_chunks'")
    return reasons


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor whose start is 16-byte aligned (a TMA descriptor requirement): a view with an
    odd offset is copied."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


if HAS_TRITON:

    @triton.jit
    def _tma_fwd_kernel(
        Q, Out, LSE, QIDX, desc_k, desc_v,
        work_ptr, num_work_ptr, q_bounds_ptr, count_ptr, table_ptr,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_ob, stride_oh, stride_os,
        H, Cq1, T_ROW, SEQ_Q, SEQ_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATHER_Q: tl.constexpr, STORE_LSE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid >= tl.load(num_work_ptr):
            return
        q, n, b, h, row_id, q_rows, m_mask, offs_d, d_mask = query_tile(
            pid, Q, QIDX, work_ptr, q_bounds_ptr, stride_qb, stride_qh, stride_qs, H, Cq1, SEQ_Q,
            HEAD_DIM, BLOCK_D, BLOCK_M, GATHER_Q,
        )
        # Row of this head's first key in the (B * H * Sk, D) view the descriptors cover. A partial tile
        # reads into the next head (or past the end: TMA fills zeros); those rows are masked.
        head_row = (b * H + h).to(tl.int32) * SEQ_K
        tiles = table_ptr + row_id.to(tl.int64) * T_ROW
        m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
        n_tiles = tl.load(count_ptr + row_id)
        offs_n = tl.arange(0, BLOCK_N)
        for t in range(0, n_tiles):
            packed = tl.load(tiles + t)
            row0 = head_row + (packed >> 8)
            k = desc_k.load([row0, 0])
            v = desc_v.load([row0, 0])
            qk = tl.dot(q, tl.trans(k))
            m_i, l_i, acc = online_softmax_step(qk, offs_n < (packed & 255), v, qk_scale, m_i, l_i, acc)
        store_output(Out, LSE, acc, m_i, l_i, n, b, h, q_rows, m_mask, offs_d, d_mask, stride_ob, stride_oh,
                     stride_os, SEQ_Q, STORE_LSE)


def launch_tma_kernel(q, k, v, out, lse, qidx, gather_q: bool, work, num_work, q_bounds, count, table,
                      scale: float, block_m: int, block_n: int, num_warps: int, num_stages: int):
    """One launch over the ``work`` items; ``table``/``count`` are the chunk table built with
    ``chunk = block_n``; ``lse`` (B * H, Sq) float32 or None. Returns Triton's compiled kernel."""
    bsz, h, sq, d = q.shape
    sk = k.shape[2]
    block_d = triton.next_power_of_2(d)
    # The descriptors view K and V as (B * H * Sk, D) row-major matrices.
    k2 = _aligned(k).view(bsz * h * sk, d)
    v2 = _aligned(v).view(bsz * h * sk, d)
    desc_k = TensorDescriptor.from_tensor(k2, [block_n, block_d])
    desc_v = TensorDescriptor.from_tensor(v2, [block_n, block_d])
    return _tma_fwd_kernel[(work.shape[0],)](
        q, out, out if lse is None else lse, qidx, desc_k, desc_v,
        work, num_work, q_bounds, count, table,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, count.shape[1], table.shape[-1], sq, sk,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, GATHER_Q=gather_q, STORE_LSE=lse is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
