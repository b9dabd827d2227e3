"""Triton pieces shared by the variable-block attention kernels (``triton_tma`` and ``triton_chunks``).

Every kernel runs one query tile per program: the same prologue (work-item decoding and Q load,
:func:`query_tile`), the same online-softmax step per key tile, the same epilogue (:func:`store_output`,
optionally with the log-sum-exp). They differ only in how a key tile's rows are found and loaded.
"""

from __future__ import annotations

from svg2_kernels._triton import HAS_TRITON, tl, triton

__all__ = ["query_tile", "online_softmax_init", "online_softmax_step", "first_above", "store_output"]

if HAS_TRITON:

    @triton.jit
    def query_tile(
        pid, Q, QIDX, work_ptr, q_bounds_ptr,
        stride_qb, stride_qh, stride_qs, H, Cq1, SEQ_Q,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, GATHER_Q: tl.constexpr,
    ):
        """Decode work item ``pid`` and load its Q tile. Returns (q, n, b, h, row_id, q_rows, m_mask, offs_d,
        d_mask)."""
        n = tl.load(work_ptr + pid * 3)
        i = tl.load(work_ptr + pid * 3 + 1)
        row0 = tl.load(work_ptr + pid * 3 + 2)
        b = (n // H).to(tl.int64)
        h = (n % H).to(tl.int64)
        row_id = n * Cq1 + i
        qs = tl.load(q_bounds_ptr + n * (Cq1 + 1) + i)
        qe = tl.load(q_bounds_ptr + n * (Cq1 + 1) + i + 1)
        offs_m = qs + row0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < qe
        if GATHER_Q:  # Q and O in token order: sorted row -> token through the query permutation
            q_rows = tl.load(QIDX + n.to(tl.int64) * SEQ_Q + offs_m, mask=m_mask, other=0)
        else:
            q_rows = offs_m
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :], other=0.0,
        )
        return q, n, b, h, row_id, q_rows, m_mask, offs_d, d_mask

    @triton.jit
    def online_softmax_init(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Running max, sum and accumulator before the first key tile. The max starts finite (-1e30, not
        -inf) so that a tile whose columns are all masked leaves the state unchanged (exp2(-inf) = 0)."""
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        return m_i, l_i, acc

    @triton.jit
    def online_softmax_step(qk, n_mask, v, qk_scale, m_i, l_i, acc):
        """Fold one key tile (raw scores ``qk`` (M, N), valid columns ``n_mask``, values ``v`` (N, D)) into the
        running max ``m_i``, sum ``l_i`` and accumulator ``acc`` (exp2 domain: qk_scale includes log2 e).

        Padding is an additive -inf bias and the max is taken on raw scores, so the exponent is one FMA per
        score (``qk * scale - m``): on dense tiles this form ran at 0.64 of cuDNN against 0.55 for
        scale-then-select-then-subtract (probe_loop in notes/kernels.md)."""
        qk = qk + tl.where(n_mask, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return m_new, l_i, acc

    @triton.jit
    def first_above(cum_ptr, t, N, LOG_N: tl.constexpr):
        """Index of the first of the N non-decreasing ints at ``cum_ptr`` that is > ``t`` (a vector), by
        binary search over 2^LOG_N >= N slots; N when none is."""
        pos = tl.full(t.shape, -1, dtype=tl.int32)
        for s in tl.static_range(LOG_N):
            cand = pos + (1 << (LOG_N - 1 - s))
            f = tl.load(cum_ptr + cand, mask=cand < N, other=2147483647)
            pos = tl.where(f <= t, cand, pos)
        return pos + 1

    @triton.jit
    def store_output(Out, LSE, acc, m_i, l_i, n, b, h, q_rows, m_mask, offs_d, d_mask,
                     stride_ob, stride_oh, stride_os, SEQ_Q, STORE_LSE: tl.constexpr):
        """Normalise and store; rows without keys (and the tail cluster) write zeros.

        With ``STORE_LSE`` also writes the natural log-sum-exp of the row's scaled scores to
        ``LSE[n, q_rows]`` ((B * H, Sq) float32; -inf for rows without keys): ``m_i`` and ``l_i`` are in base 2.
        """
        if STORE_LSE:
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            tl.store(LSE + n.to(tl.int64) * SEQ_Q + q_rows, lse, mask=m_mask)
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(
            Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_os + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )
