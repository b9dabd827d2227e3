"""Variable-block sparse attention, v5: key tiles as whole boxes of a run, loaded by TMA (Hopper).

Same contract as :mod:`svg2_kernels.varblock_attention`. Key side: every selected run (a maximal stretch of
selected, adjacent key clusters, physically contiguous in the cluster-sorted K/V) is cut into tiles of
``BLOCK_N`` consecutive rows, the last one partial. A tile is one int32, ``start << 8 | valid rows`` (the
chunk table of :mod:`svg2_kernels.varblock_chunks` with ``chunk = BLOCK_N``), so it is **one contiguous box**:
K and V tiles are tensor-descriptor loads (TMA on sm_90+, straight into shared memory, no per-row address
registers), and rows past ``valid`` get an additive ``-inf`` bias in the scores.

Why (notes/kernels.md, v5; results/kernels/probe_loop_r6.md): on dense tiles the same online-softmax loop
runs at 0.88-0.95 of cuDNN with descriptor loads, 0.83-0.85 with contiguous pointer loads, and 0.55-0.65 with
the per-row addresses of v4's 16-row chunks (Wan 1.3B and 14B shapes, H200). The price is key padding up
to ``BLOCK_N - 1`` rows per run, which ordering key clusters so that co-selected ones are adjacent
(:func:`svg2_kernels.order.chain_order`) keeps small: runs get longer, fewer of them end in a partial tile.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from svg2_kernels.varblock_common import online_softmax_init, online_softmax_step, query_tile, store_output

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False

try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    _HAS_TMA = True
except ImportError:  # pragma: no cover - Triton < 3.4
    _HAS_TMA = False

__all__ = ["launch_tma_kernel", "tma_refusal"]


def tma_refusal(k: torch.Tensor, v: torch.Tensor, block_n: int) -> str | None:
    """Why the descriptor path cannot take these keys and values (None when it can)."""
    if not (_HAS_TRITON and _HAS_TMA):
        return "this Triton has no tensor descriptors (triton.tools.tensor_descriptor, Triton >= 3.4)"
    if block_n > 128:
        return f"block_n {block_n} > 128 (the tile table packs at most 255 valid rows and TMA boxes 256)"
    if (k.shape[-1] * k.element_size()) % 16:
        return f"head dim {k.shape[-1]} x {k.element_size()} bytes is not a multiple of 16 bytes (TMA rows)"
    for name, t in (("k", k), ("v", v)):
        if t.is_contiguous() and t.data_ptr() % 16:  # (a non-contiguous one is copied, and aligned, first)
            return f"{name} starts at an address that is not 16-byte aligned (a view with an odd offset)"
    if k.device.type == "cuda" and torch.cuda.get_device_capability(k.device)[0] < 9:
        return "TMA needs sm_90 (Hopper) or newer"
    return None


if _HAS_TRITON:

    @triton.jit
    def _tma_fwd_kernel(
        Q, Out, QIDX, desc_k, desc_v,
        work_ptr, num_work_ptr, q_bounds_ptr, count_ptr, table_ptr,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_ob, stride_oh, stride_os,
        H, Cq1, T_ROW, SEQ_Q, SEQ_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATHER_Q: tl.constexpr,
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
        store_output(Out, acc, l_i, b, h, q_rows, m_mask, offs_d, d_mask, stride_ob, stride_oh, stride_os)


def launch_tma_kernel(q, k, v, out, qidx, gather_q: bool, work, num_work, q_bounds, count, table,
                      scale: float, block_m: int, block_n: int, num_warps: int, num_stages: int):
    """One launch over the ``work`` items; ``table``/``count`` are the chunk table built with
    ``chunk = block_n``. Returns Triton's compiled kernel."""
    bsz, h, sq, d = q.shape
    sk = k.shape[2]
    block_d = triton.next_power_of_2(d)
    # The descriptors view K and V as (B * H * Sk, D) row-major matrices.
    k2 = k.contiguous().view(bsz * h * sk, d)
    v2 = v.contiguous().view(bsz * h * sk, d)
    desc_k = TensorDescriptor.from_tensor(k2, [block_n, block_d])
    desc_v = TensorDescriptor.from_tensor(v2, [block_n, block_d])
    return _tma_fwd_kernel[(work.shape[0],)](
        q, out, qidx, desc_k, desc_v,
        work, num_work, q_bounds, count, table,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, count.shape[1], table.shape[-1], sq, sk,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, GATHER_Q=gather_q,
        num_warps=num_warps, num_stages=num_stages,
    )
