"""Variable-block sparse attention forward in Triton (the SVG2 attention kernel).

Query cluster ``i`` of head ``n`` (rows ``q_offsets[n, i]:q_offsets[n, i+1]`` of the cluster-sorted Q)
attends with an exact online softmax to the union of the selected key clusters ``j`` (``block_map[n, i,
j]``), each a contiguous ``(start, length)`` range of the cluster-sorted K/V. Semantics are those of
:func:`svg2_kernels.reference.varblock_attention_reference`.

How the work is laid out (DESIGN.md §4):

* **Key side: ranges, densely packed.** Selected, adjacent, non-empty key clusters are merged into *runs*;
  the runs of one query cluster form a virtual concatenated key sequence that the kernel walks in full
  ``BLOCK_N`` tiles, each tile loading rows from several runs. A row's address is ``pos + delta[run]``, the
  run found by comparing ``pos`` against a window of ``WIN`` run starts. Every run gets a virtual length of at
  least ``ceil(BLOCK_N / (WIN - 1))`` (padding masked) so that one tile never spans more runs than the
  window holds; real clusters (30-80 tokens) are longer than that and waste nothing.
* **Query side: tiles of clusters.** Each query cluster is split into ``BLOCK_M``-row tiles; the schedule of
  ``(head, cluster, first row)`` work items is built on the GPU with a fixed upper bound on its length
  (``heads * (ceil(Sq / BLOCK_M) + Cq + 1)``), so the grid needs no host sync; surplus programs exit.
  Rows past ``q_offsets[-1]`` form one extra cluster with no keys, so the kernel writes their zeros.
* All metadata is built with torch ops on the device: no ``.item()``, no host copies; the op is CUDA-graph
  capturable and is a ``torch.library.custom_op`` with a fake implementation for ``torch.compile``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from svg2_kernels.registry import AttentionInputs, AttentionVariant, register_attention_variant

try:  # Triton is optional (CPU-only installs on other platforms); the variant refuses without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False

__all__ = [
    "VarBlockConfig",
    "VarBlockMetadata",
    "build_varblock_metadata",
    "varblock_attention",
    "varblock_attention_with_metadata",
    "TritonVarBlockAttention",
]

_NO_RUN = 1 << 30  # virtual start of the unused run slots: never <= any position


@dataclass(frozen=True)
class VarBlockConfig:
    """Tile sizes and launch parameters (``win``: run-window width, a power of two >= 2)."""

    block_m: int = 128
    block_n: int = 64
    win: int = 8
    num_warps: int = 8
    num_stages: int = 2

    @property
    def min_run(self) -> int:
        """Smallest virtual run length: a BLOCK_N tile then touches at most ``win`` runs."""
        return -(-self.block_n // (self.win - 1))


def default_config(device_type: str, head_dim: int) -> VarBlockConfig:
    if device_type != "cuda" or _interpreting():
        return VarBlockConfig(block_m=16, block_n=16, win=8, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return VarBlockConfig(block_m=128, block_n=128, win=8, num_warps=8, num_stages=2)
    return VarBlockConfig(block_m=128, block_n=64, win=8, num_warps=8, num_stages=2)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class VarBlockMetadata:
    """Scheduling metadata (all int32 device tensors, fixed shapes given the layout's sizes).

    work: (T_max, 3) ``(head, query cluster, first row)`` work items, the first ``num_work`` valid.
    num_work: (1,) number of valid work items.
    q_bounds: (N, Cq + 2) query cluster offsets plus the sequence end (the tail "cluster" Cq).
    num_tiles: (N, Cq + 1) key tiles per query cluster (0 for the tail).
    tile_run: (N, Cq + 1, T_row) first run of every key tile.
    run_vstart, run_delta, run_vend: (N, Cq + 1, R) per run: virtual start, physical row - virtual
        position, virtual end of the real rows.
    """

    config: VarBlockConfig
    work: torch.Tensor
    num_work: torch.Tensor
    q_bounds: torch.Tensor
    num_tiles: torch.Tensor
    tile_run: torch.Tensor
    run_vstart: torch.Tensor
    run_delta: torch.Tensor
    run_vend: torch.Tensor


def build_varblock_metadata(
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    config: VarBlockConfig,
) -> VarBlockMetadata:
    """CSR of selected key runs and the query-tile schedule, on the layout's device, without host syncs.

    Args:
        q_offsets: (B, H, Cq + 1) int; k_offsets: (B, H, Ck + 1) int; block_map: (B, H, Cq, Ck) bool.
        seqlen_q, seqlen_k: rows of the (sorted) Q and K tensors.
    """
    dev = block_map.device
    cq, ck = block_map.shape[-2], block_map.shape[-1]
    n = block_map.numel() // max(1, cq * ck)
    qo = q_offsets.reshape(n, cq + 1).to(torch.int32)
    ko = k_offsets.reshape(n, ck + 1).to(torch.int32)
    bm = block_map.reshape(n, cq, ck).to(torch.bool)
    i32 = torch.int32

    # -- key runs: maximal stretches of selected non-empty clusters, compacted to the front of each row --
    ksz = ko[:, 1:] - ko[:, :-1]  # (n, ck)
    sel = bm & (ksz > 0).unsqueeze(1)
    # One extra all-false row: the tail "cluster" of query rows past q_offsets[-1].
    sel = torch.cat([sel, torch.zeros(n, 1, ck, dtype=torch.bool, device=dev)], dim=1)  # (n, cq+1, ck)
    prev = torch.zeros_like(sel)
    prev[..., 1:] = sel[..., :-1]
    start = sel & ~prev
    run_id = torch.cumsum(start, dim=-1, dtype=i32) - 1  # (n, cq+1, ck); -1 before the first run
    nruns = run_id[..., -1] + 1  # (n, cq+1)
    rid = run_id.clamp_min(0).long()
    run_len = torch.zeros(n, cq + 1, ck, dtype=i32, device=dev)
    run_len.scatter_add_(-1, rid, torch.where(sel, ksz.unsqueeze(1), 0).to(i32))
    run_pstart = torch.zeros(n, cq + 1, ck, dtype=i32, device=dev)
    run_pstart.scatter_add_(-1, rid, torch.where(start, ko[:, None, :-1], 0).to(i32))
    has = torch.arange(ck, device=dev, dtype=i32) < nruns.unsqueeze(-1)
    vlen = torch.where(has, run_len.clamp_min(config.min_run), 0)
    vend_cum = torch.cumsum(vlen, dim=-1, dtype=i32)
    vstart = vend_cum - vlen
    run_vend = vstart + run_len
    run_delta = torch.where(has, run_pstart - vstart, 0)
    # Tiles stop at the last real row (the last run's padding is never visited).
    last = (nruns - 1).clamp_min(0).long().unsqueeze(-1)
    kv_len = torch.where(nruns > 0, run_vend.gather(-1, last).squeeze(-1), 0)  # (n, cq+1)
    num_tiles = (kv_len + config.block_n - 1) // config.block_n
    run_vstart = torch.where(has, vstart, _NO_RUN)
    t_row = -(-(seqlen_k + ck * config.min_run) // config.block_n) + 1
    tile_pos = torch.arange(t_row, device=dev, dtype=i32) * config.block_n
    tile_run = torch.searchsorted(
        run_vstart.reshape(n * (cq + 1), ck),
        tile_pos.expand(n * (cq + 1), t_row).contiguous(),
        right=True,
        out_int32=True,
    ) - 1
    tile_run = tile_run.clamp_min(0).reshape(n, cq + 1, t_row)

    # -- query tiles: (head, cluster, first row) work items, fixed upper bound on their number --
    q_bounds = torch.cat([qo, torch.full((n, 1), seqlen_q, dtype=i32, device=dev)], dim=1)
    qsz = (q_bounds[:, 1:] - q_bounds[:, :-1]).clamp_min(0)  # (n, cq+1)
    qt = ((qsz + config.block_m - 1) // config.block_m).reshape(-1)
    cum = torch.cumsum(qt, dim=0, dtype=i32)
    t_max = n * (-(-seqlen_q // config.block_m) + cq + 1)
    t = torch.arange(t_max, device=dev, dtype=i32)
    item = torch.searchsorted(cum, t, right=True, out_int32=True).clamp_max(qt.numel() - 1)
    first = cum.gather(0, item.long()) - qt.gather(0, item.long())
    work = torch.stack([item // (cq + 1), item % (cq + 1), (t - first) * config.block_m], dim=1).to(i32)
    return VarBlockMetadata(
        config=config,
        work=work.contiguous(),
        num_work=cum[-1:].contiguous(),
        q_bounds=q_bounds.contiguous(),
        num_tiles=num_tiles.to(i32).contiguous(),
        tile_run=tile_run.contiguous(),
        run_vstart=run_vstart.to(i32).contiguous(),
        run_delta=run_delta.to(i32).contiguous(),
        run_vend=run_vend.to(i32).contiguous(),
    )


if _HAS_TRITON:

    @triton.jit
    def _varblock_fwd_kernel(
        Q, K, V, Out,
        work_ptr, num_work_ptr, q_bounds_ptr, num_tiles_ptr, tile_run_ptr,
        vstart_ptr, delta_ptr, vend_ptr,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        H, Cq1, T_ROW, RUNS,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid >= tl.load(num_work_ptr):
            return
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
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :], other=0.0,
        )
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_tiles = tl.load(num_tiles_ptr + row_id)
        meta = row_id.to(tl.int64) * RUNS
        offs_w = tl.arange(0, WIN)
        for t in range(0, n_tiles):
            # -- row addresses of this tile of the virtual key sequence --
            r0 = tl.load(tile_run_ptr + row_id.to(tl.int64) * T_ROW + t)
            w_idx = r0 + offs_w
            w_mask = w_idx < RUNS
            w_start = tl.load(vstart_ptr + meta + w_idx, mask=w_mask, other=1 << 30)
            w_delta = tl.load(delta_ptr + meta + w_idx, mask=w_mask, other=0)
            w_end = tl.load(vend_ptr + meta + w_idx, mask=w_mask, other=0)
            pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
            run = tl.sum((w_start[None, :] <= pos[:, None]).to(tl.int32), axis=1) - 1
            hit = offs_w[None, :] == run[:, None]
            p_delta = tl.sum(tl.where(hit, w_delta[None, :], 0), axis=1)
            p_end = tl.sum(tl.where(hit, w_end[None, :], 0), axis=1)
            n_mask = pos < p_end
            rows = tl.where(n_mask, pos + p_delta, 0)
            # -- scores and online softmax --
            k = tl.load(
                k_base + rows[None, :] * stride_ks + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None], other=0.0,
            )
            qk = tl.dot(q, k)
            qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            v = tl.load(
                v_base + rows[:, None] * stride_vs + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0,
            )
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        # -- epilogue: rows without keys (and the tail cluster) write zeros --
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(
            Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def varblock_attention_with_metadata(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarBlockMetadata,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel with prebuilt metadata (reuse it across calls that share a layout)."""
    bsz, h, sq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = meta.config
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    cq1 = meta.num_tiles.shape[1]
    grid = (meta.work.shape[0],)
    _varblock_fwd_kernel[grid](
        q, k, v, out,
        meta.work, meta.num_work, meta.q_bounds, meta.num_tiles, meta.tile_run,
        meta.run_vstart, meta.run_delta, meta.run_vend,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, cq1, meta.tile_run.shape[-1], meta.run_vstart.shape[-1],
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WIN=cfg.win,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _forward(q, k, v, q_offsets, k_offsets, block_map, scale, config: VarBlockConfig | None = None):
    cfg = config or default_config(q.device.type, q.shape[-1])
    meta = build_varblock_metadata(q_offsets, k_offsets, block_map, q.shape[2], k.shape[2], cfg)
    return varblock_attention_with_metadata(q, k, v, meta, scale)


@torch.library.custom_op("svg2_kernels::varblock_attention", mutates_args=())
def _varblock_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _forward(q, k, v, q_offsets, k_offsets, block_map, scale)


@_varblock_attention_op.register_fake
def _(q, k, v, q_offsets, k_offsets, block_map, scale):
    return torch.empty_like(q)


def varblock_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Variable-block sparse attention (Triton), same contract as ``varblock_attention_reference``.

    Args:
        q: (batch, heads, seqlen_q, headdim) fp16/bf16/fp32, rows sorted by query cluster.
        k, v: (batch, heads, seqlen_k, headdim), rows sorted by key cluster.
        q_offsets: (batch, heads, Cq + 1) int, exclusive prefix sums of query cluster sizes.
        k_offsets: (batch, heads, Ck + 1) int; rows past ``k_offsets[..., -1]`` are never attended.
        block_map: (batch, heads, Cq, Ck) bool.
        scale: softmax scale, default ``1/sqrt(headdim)``.
    Returns:
        (batch, heads, seqlen_q, headdim) in q's dtype; rows that select no key are zero.
    """
    _check(q, k, v, q_offsets, k_offsets, block_map)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _varblock_attention_op(q, k, v, q_offsets, k_offsets, block_map, scale)


def _check(q, k, v, q_offsets, k_offsets, block_map) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q (B,H,Sq,D) and k, v (B,H,Sk,D) with matching B, H, D; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    bh = tuple(q.shape[:2])
    cq, ck = block_map.shape[-2], block_map.shape[-1]
    if tuple(block_map.shape) != (*bh, cq, ck):
        raise ValueError(f"block_map must be (B,H,Cq,Ck) = {(*bh, 'Cq', 'Ck')}, got {tuple(block_map.shape)}")
    if tuple(q_offsets.shape) != (*bh, cq + 1) or tuple(k_offsets.shape) != (*bh, ck + 1):
        raise ValueError(
            f"q_offsets must be (B,H,Cq+1) = {(*bh, cq + 1)} and k_offsets (B,H,Ck+1) = {(*bh, ck + 1)}; "
            f"got {tuple(q_offsets.shape)} and {tuple(k_offsets.shape)}"
        )
    if not (q.device == k.device == q_offsets.device == k_offsets.device == block_map.device):
        raise ValueError("q, k, v, offsets and block_map must be on one device")


class TritonVarBlockAttention(AttentionVariant):
    """Triton variable-block kernel: key clusters as (start, length) runs packed into dense tiles."""

    name = "triton"
    priority = 100
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    requires = ("triton",)

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.head_dim > 256:
            reasons.append(f"head dim {inputs.head_dim} > 256")
        return reasons

    def forward(self, q, k, v, q_offsets, k_offsets, block_map, scale=None):
        return varblock_attention(q, k, v, q_offsets, k_offsets, block_map, scale)


register_attention_variant(TritonVarBlockAttention())
