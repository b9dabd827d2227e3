"""Variable-block sparse attention forward in Triton (the SVG2 attention kernel).

Query cluster ``i`` of head ``n`` (rows ``q_offsets[n, i]:q_offsets[n, i+1]`` of the cluster-sorted Q)
attends with an exact online softmax to the union of the selected key clusters ``j`` (``block_map[n, i,
j]``), each a contiguous ``(start, length)`` range of the cluster-sorted K/V. Semantics are those of
:func:`svg2_kernels.reference.varblock_attention_reference`.

How the work is laid out (DESIGN.md §4):

* **Key side** (``VarBlockConfig.key_layout``). Selected, adjacent, non-empty key clusters are merged into
  *runs*, and the runs of one query cluster form a virtual key sequence walked in ``BLOCK_N`` tiles.
  - ``"tma"`` (v5, the default on sm_90+; :mod:`svg2_kernels.varblock_tma`): every run is cut into whole
    ``BLOCK_N``-row boxes (the last partial), each loaded by a tensor descriptor (TMA) straight into shared
    memory. Costs up to ``BLOCK_N - 1`` padding rows per run; ordering key clusters so co-selected ones are
    adjacent (:mod:`svg2_kernels.order`) keeps runs long. Falls back to the chunk kernel (same table, one
    chunk per tile) where descriptors are unavailable.
  - ``"chunks"`` (v4, the default on pre-Hopper GPUs; :mod:`svg2_kernels.varblock_chunks`): runs are cut into
    ``chunk``-row pieces and a tile is ``BLOCK_N // chunk`` of them, so a tile's row addresses are one
    broadcast load (no search, nothing loop-carried) and Triton's pipeliner leaves no synchronous load in
    the loop. Costs at most ``chunk - 1`` padding rows per run.
  - ``"window"`` (v3): runs packed densely into tiles; a row's address is ``pos + delta[run]``, the run
    found by comparing ``pos`` against a window of ``WIN`` run starts (every run padded to at least
    ``ceil(BLOCK_N / (WIN - 1))`` virtual rows so a tile never spans more runs than the window holds).
* **Query side: tiles of clusters.** Each query cluster is split into ``BLOCK_M``-row tiles (plus an optional
  second tier of ``block_m_small`` rows for small remainders); the schedule of ``(head, cluster, first row)``
  work items is built on the GPU with a fixed upper bound on its length, so the grid needs no host sync;
  surplus programs exit. Rows past ``q_offsets[-1]`` form one extra cluster with no keys (zeros written).
* All metadata is built on the device: no ``.item()``, no host copies; the op is CUDA-graph capturable and
  is a ``torch.library.custom_op`` with a fake implementation for ``torch.compile``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from svg2_kernels.registry import (
    AttentionInputs,
    AttentionVariant,
    register_attention_variant,
    triton_interpreting,
)

try:  # Triton is optional (CPU-only installs on other platforms); the variant refuses without it.
    import triton
    import triton.language as tl
    from svg2_kernels.varblock_common import online_softmax_init, online_softmax_step, query_tile, store_output

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False

__all__ = [
    "VarBlockConfig",
    "VarBlockMetadata",
    "build_varblock_metadata",
    "varblock_attention",
    "varblock_attention_with_metadata",
    "varblock_attention_token_order",
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
    block_m_small: int = 0  # >0: remainders of <= this many rows run as a second launch with this tile
    num_warps_small: int = 4
    # True: each key tile finds its run window through a per-tile table (tile_run) instead of carrying
    # it from the previous tile. Costs (N, Cq+1, T_row) int32 of metadata, but removes the loop-carried
    # dependency from the address chain, so Triton's pipeliner can issue the loads stages ahead.
    tile_table: bool = False
    # "window": v3 (runs packed densely into tiles, a run-window search per tile); "chunks": v4 (tiles of
    # contiguous ``chunk``-row pieces of runs, one broadcast load per tile: svg2_kernels.varblock_chunks);
    # "tma": v5 (tiles are whole boxes of one run, tensor-descriptor loads: svg2_kernels.varblock_tma).
    key_layout: str = "window"
    chunk: int = 64
    # Longest-first order of work items inside each head (heads stay in order for L2 reuse of K/V);
    # lpt_global: longest-first over all heads (measured against the per-head order in run r9).
    lpt: bool = False
    lpt_global: bool = False
    # Query-tile schedule from svg2_kernels.varblock_schedule (2 launches) instead of torch ops (~50): the
    # metadata of a Wan 1.3B call fell from 2.23 to 0.74 ms eager on an H200 (run r13); False: torch ops.
    triton_schedule: bool = True

    def __post_init__(self) -> None:
        if self.key_layout not in ("window", "chunks", "tma"):
            raise ValueError(f"key_layout must be 'window', 'chunks' or 'tma', got {self.key_layout!r}")
        for name in ("tile_table", "lpt", "lpt_global", "triton_schedule"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"VarBlockConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.key_layout == "tma" and not 16 <= self.block_n <= 128:
            raise ValueError(f"key_layout 'tma' needs 16 <= block_n <= 128 (one box per tile), got {self.block_n}")
        if self.key_layout == "chunks" and (self.block_n % self.chunk or not 1 <= self.chunk <= 128
                                            or self.chunk & (self.chunk - 1)):
            raise ValueError(f"chunk ({self.chunk}) must be a power of two <= 128 dividing block_n "
                             f"({self.block_n})")

    @property
    def min_run(self) -> int:
        """Smallest virtual run length: a BLOCK_N tile then touches at most ``win`` runs."""
        return -(-self.block_n // (self.win - 1))


def default_config(device_type: str, head_dim: int, capability: tuple[int, int] = (9, 0),
                   seqlen_k: int | None = None) -> VarBlockConfig:
    if device_type != "cuda" or triton_interpreting():
        return VarBlockConfig(block_m=16, block_n=16, win=8, num_warps=4, num_stages=1)
    if capability[0] >= 9 and head_dim <= 128:
        # v5 (TMA boxes of whole runs), the fastest measured on an H200 at Wan 14B shapes (runs r6, r6tune).
        # 128x64 tiles with one warpgroup (4 warps): two programs per SM hide each other's softmax.
        # Longest-first over all heads won at Wan 1.3B (S=32760: 4.43 -> 4.04 ms) and lost at Wan 14B (S=75600:
        # 60.8 -> 62.2 ms, 69.5 -> 76.2 ms) against the per-head order (run r9); the threshold sits between.
        return VarBlockConfig(block_m=128, block_n=64, win=16, num_warps=4, num_stages=2, block_m_small=64,
                              key_layout="tma", lpt=True, lpt_global=seqlen_k is not None and seqlen_k <= 49152)
    if head_dim > 128:  # 128x128 tiles of D=256 exceed shared memory; 64x64, 4 warps fit (164 KB)
        return VarBlockConfig(block_m=64, block_n=64, win=16, num_warps=4, num_stages=2, key_layout="chunks",
                              chunk=16)
    # v4 (chunk key layout), the fastest measured on an H200 at Wan 1.3B and 14B shapes (runs r4a/r4b):
    # 128x128 tiles, 8 warps, 3 stages, 64-row second query tier, 16-row chunks.
    return VarBlockConfig(block_m=128, block_n=128, win=16, num_warps=8, num_stages=3, block_m_small=64,
                          key_layout="chunks", chunk=16)



@dataclass
class VarBlockMetadata:
    """Scheduling metadata (all int32 device tensors, fixed shapes given the layout's sizes).

    work: (T_max, 3) ``(head, query cluster, first row)`` work items of ``block_m`` rows, the first
        ``num_work`` valid; work_small / num_work_small: the same for the ``block_m_small`` tier (remainders
        of at most ``block_m_small`` rows), empty when that tier is off.
    q_bounds: (N, Cq + 2) query cluster offsets plus the sequence end (the tail "cluster" Cq).
    num_tiles: (N, Cq + 1) key tiles per query cluster (0 for the tail).
    run_vstart, run_delta, run_vend: (N, Cq + 1, R) per run: virtual start, physical row - virtual
        position, virtual end of the real rows.
    tile_run: (N, Cq + 1, T_row) first run of every key tile (``config.tile_table``), else (1, 1, 1).
    """

    config: VarBlockConfig
    work: torch.Tensor
    num_work: torch.Tensor
    work_small: torch.Tensor
    num_work_small: torch.Tensor
    q_bounds: torch.Tensor
    num_tiles: torch.Tensor
    run_vstart: torch.Tensor
    run_delta: torch.Tensor
    run_vend: torch.Tensor
    tile_run: torch.Tensor | None = None
    chunk_table: torch.Tensor | None = None  # (N, Cq + 1, T) packed chunks (key_layout "chunks")
    chunk_count: torch.Tensor | None = None  # (N, Cq + 1)


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

    def selected():  # (n, cq+1, ck); the extra all-false row is the tail "cluster" past q_offsets[-1]
        sel = bm & (ksz > 0).unsqueeze(1)
        return torch.cat([sel, torch.zeros(n, 1, ck, dtype=torch.bool, device=dev)], dim=1)

    if config.key_layout in ("chunks", "tma"):
        from svg2_kernels.varblock_chunks import build_chunk_table, build_chunk_table_triton

        chunk = config.block_n if config.key_layout == "tma" else config.chunk  # tma: one box per tile
        if _HAS_TRITON and (dev.type == "cuda" or triton_interpreting()):  # one launch instead of ~30 torch ops
            table, count = build_chunk_table_triton(ko, bm, seqlen_k, chunk)
        else:
            table, count = build_chunk_table(ko, selected(), seqlen_k, chunk)
        empty = torch.zeros(1, 1, 1, dtype=i32, device=dev)
        nch = config.block_n // chunk
        return _with_query_tiles(qo, seqlen_q, n, cq, config, num_tiles=(count + nch - 1) // nch, run_vstart=empty,
                                 run_delta=empty, run_vend=empty, tile_run=empty, chunk_table=table,
                                 chunk_count=count)
    sel = selected()
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
    if config.tile_table:
        t_row = -(-(seqlen_k + ck * config.min_run) // config.block_n) + 1
        tile_pos = torch.arange(t_row, device=dev, dtype=i32) * config.block_n
        tile_run = torch.searchsorted(
            run_vstart.to(i32).reshape(n * (cq + 1), ck).contiguous(),
            tile_pos.expand(n * (cq + 1), t_row).contiguous(), right=True, out_int32=True,
        ) - 1
        tile_run = tile_run.clamp_min(0).reshape(n, cq + 1, t_row).contiguous()
    else:
        tile_run = torch.zeros(1, 1, 1, dtype=i32, device=dev)
    return _with_query_tiles(qo, seqlen_q, n, cq, config, num_tiles=num_tiles.to(i32).contiguous(),
                             run_vstart=run_vstart.to(i32).contiguous(), run_delta=run_delta.to(i32).contiguous(),
                             run_vend=run_vend.to(i32).contiguous(), tile_run=tile_run)


def _with_query_tiles(qo, seqlen_q: int, n: int, cq: int, config: VarBlockConfig, **key_side) -> VarBlockMetadata:
    """Add the query-tile schedule to the key-side metadata."""
    dev, i32 = qo.device, torch.int32
    # -- query tiles: (head, cluster, first row) work items, fixed upper bounds on their number --
    q_bounds = torch.cat([qo, torch.full((n, 1), seqlen_q, dtype=i32, device=dev)], dim=1)
    # Two Triton launches instead of ~50 torch ops, equal to the torch schedule (interpreter tests, and on an
    # H200 in run r11); the default on GPUs (config.triton_schedule), the torch ops otherwise.
    if _HAS_TRITON and (triton_interpreting() or (dev.type == "cuda" and config.triton_schedule)):
        from svg2_kernels.varblock_schedule import build_work_items_triton

        work, num_work, work_s, num_work_s = build_work_items_triton(
            qo, key_side["num_tiles"].to(i32), seqlen_q, config.block_m, config.block_m_small, config.lpt,
            config.lpt_global)
        return VarBlockMetadata(config=config, work=work, num_work=num_work, work_small=work_s,
                                num_work_small=num_work_s, q_bounds=q_bounds.contiguous(), **key_side)
    return _with_query_tiles_torch(qo, q_bounds, seqlen_q, n, cq, config, **key_side)


def _with_query_tiles_torch(qo, q_bounds, seqlen_q: int, n: int, cq: int, config: VarBlockConfig,
                            **key_side) -> VarBlockMetadata:
    """The torch schedule (CPU, and the definition the Triton builder is tested against)."""
    i32 = torch.int32
    qsz = (q_bounds[:, 1:] - q_bounds[:, :-1]).clamp_min(0).reshape(-1)  # (n*(cq+1),)
    bm_, bs_ = config.block_m, config.block_m_small
    if bs_ > 0:  # full tiles + a large remainder in the big tier; a small remainder in the small tier
        rem = qsz % bm_
        big = qsz // bm_ + (rem > bs_).to(i32)
        small = ((rem > 0) & (rem <= bs_)).to(i32)
    else:
        big = (qsz + bm_ - 1) // bm_
        small = torch.zeros_like(qsz)
    work, num_work = _work_items(big, cq + 1, n * (-(-seqlen_q // bm_) + cq + 1), bm_, None)
    work_s, num_work_s = _work_items(small, cq + 1, n * (cq + 1) if bs_ > 0 else 0, bm_, qsz // bm_)
    if config.lpt:
        work = _longest_first(work, num_work, key_side["num_tiles"], config.lpt_global)
        work_s = _longest_first(work_s, num_work_s, key_side["num_tiles"], config.lpt_global)
    return VarBlockMetadata(config=config, work=work, num_work=num_work, work_small=work_s,
                            num_work_small=num_work_s, q_bounds=q_bounds.contiguous(), **key_side)


def _longest_first(work, num_work, num_tiles, across_heads: bool = False):
    """Reorder work items: heads stay in order (concurrent programs share one head's K/V in L2), and inside
    a head the items with the most key tiles come first, so the last wave holds short items (less tail).
    ``across_heads``: one longest-first order over all heads instead."""
    if work.shape[0] == 0:
        return work
    cost = num_tiles.reshape(-1).gather(0, (work[:, 0].long() * num_tiles.shape[1] + work[:, 1].long()))
    key = ((1 << 31) - 1 - cost.long()) + (0 if across_heads else work[:, 0].long() << 32)
    valid = torch.arange(work.shape[0], device=work.device) < num_work
    key = torch.where(valid, key, torch.iinfo(torch.int64).max)  # surplus slots stay at the end
    return work.index_select(0, torch.argsort(key, stable=True)).contiguous()


def _work_items(count, cq1: int, t_max: int, block_m: int, first_tile):
    """Expand per-(head, cluster) tile counts (flat, int32) into (t_max, 3) work items without a sync.

    Item j of cluster c starts at row ``(first_tile[c] + j) * block_m`` (first_tile None: 0)."""
    dev = count.device
    i32 = torch.int32
    cum = torch.cumsum(count, dim=0, dtype=i32)
    if t_max == 0:
        return torch.zeros(0, 3, dtype=i32, device=dev), cum[-1:].contiguous()
    t = torch.arange(t_max, device=dev, dtype=i32)
    item = torch.searchsorted(cum, t, right=True, out_int32=True).clamp_max(count.numel() - 1)
    j = t - (cum.gather(0, item.long()) - count.gather(0, item.long()))
    if first_tile is not None:
        j = j + first_tile.gather(0, item.long())
    work = torch.stack([item // cq1, item % cq1, j * block_m], dim=1).to(i32).contiguous()
    return work, cum[-1:].contiguous()


if _HAS_TRITON:

    @triton.jit
    def _varblock_fwd_kernel(
        Q, K, V, Out, QIDX,
        work_ptr, num_work_ptr, q_bounds_ptr, num_tiles_ptr,
        vstart_ptr, delta_ptr, vend_ptr, tile_run_ptr,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        H, Cq1, RUNS, SEQ_Q, T_ROW,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIN: tl.constexpr, GATHER_Q: tl.constexpr,
        TILE_TABLE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid >= tl.load(num_work_ptr):
            return
        q, n, b, h, row_id, q_rows, m_mask, offs_d, d_mask = query_tile(
            pid, Q, QIDX, work_ptr, q_bounds_ptr, stride_qb, stride_qh, stride_qs, H, Cq1, SEQ_Q,
            HEAD_DIM, BLOCK_D, BLOCK_M, GATHER_Q,
        )
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
        n_tiles = tl.load(num_tiles_ptr + row_id)
        meta = row_id.to(tl.int64) * RUNS
        offs_w = tl.arange(0, WIN)
        offs_n = tl.arange(0, BLOCK_N)
        # Window of WIN runs starting at the run that holds the tile's first position. Runs are at least
        # ceil(BLOCK_N / (WIN - 1)) long, so the window also holds the run of the next tile's first
        # position: the next window is found from this one and prefetched one tile ahead.
        r0 = 0
        w_mask = offs_w < RUNS
        w_start = tl.load(vstart_ptr + meta + offs_w, mask=w_mask, other=1 << 30)
        w_delta = tl.load(delta_ptr + meta + offs_w, mask=w_mask, other=0)
        w_end = tl.load(vend_ptr + meta + offs_w, mask=w_mask, other=0)
        for t in range(0, n_tiles):
            if TILE_TABLE:  # window from the per-tile table: no dependency on the previous iteration
                r0 = tl.load(tile_run_ptr + row_id.to(tl.int64) * T_ROW + t)
                w_idx = r0 + offs_w
                w_mask = w_idx < RUNS
                w_start = tl.load(vstart_ptr + meta + w_idx, mask=w_mask, other=1 << 30)
                w_delta = tl.load(delta_ptr + meta + w_idx, mask=w_mask, other=0)
                w_end = tl.load(vend_ptr + meta + w_idx, mask=w_mask, other=0)
            # -- row addresses of this tile of the virtual key sequence --
            pos = t * BLOCK_N + offs_n
            run = tl.sum((w_start[None, :] <= pos[:, None]).to(tl.int32), axis=1) - 1
            hit = offs_w[None, :] == run[:, None]
            p_delta = tl.sum(tl.where(hit, w_delta[None, :], 0), axis=1)
            p_end = tl.sum(tl.where(hit, w_end[None, :], 0), axis=1)
            n_mask = pos < p_end
            rows = tl.where(n_mask, pos + p_delta, 0)
            k = tl.load(
                k_base + rows[None, :] * stride_ks + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None], other=0.0,
            )
            v = tl.load(
                v_base + rows[:, None] * stride_vs + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0,
            )
            if not TILE_TABLE:  # -- prefetch the next tile's run window --
                r0 = r0 + tl.sum((w_start <= (t + 1) * BLOCK_N).to(tl.int32), axis=0) - 1
                w_idx = r0 + offs_w
                w_mask = w_idx < RUNS
                w_start = tl.load(vstart_ptr + meta + w_idx, mask=w_mask, other=1 << 30)
                w_delta = tl.load(delta_ptr + meta + w_idx, mask=w_mask, other=0)
                w_end = tl.load(vend_ptr + meta + w_idx, mask=w_mask, other=0)
            # -- scores and online softmax --
            qk = tl.dot(q, k)
            m_i, l_i, acc = online_softmax_step(qk, n_mask, v, qk_scale, m_i, l_i, acc)
        store_output(Out, acc, l_i, b, h, q_rows, m_mask, offs_d, d_mask, stride_ob, stride_oh, stride_os)


def varblock_attention_with_metadata(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarBlockMetadata,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    q_perm: torch.Tensor | None = None,
    compile_info: list | None = None,
) -> torch.Tensor:
    """Launch the kernel with prebuilt metadata (reuse it across calls that share a layout).

    q_perm: optional (B, H, Sq) int sorted position -> token index. Then q is in *token* order, the kernel
    gathers its rows through q_perm and scatters the output back to token order (fusing the query
    permutation and the inverse permutation of the output into the kernel). compile_info: a list that
    receives one dict per launch (registers, spills, shared memory, K/V pipeline depth) for benchmarks.
    """
    bsz, h, sq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = meta.config
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    qidx = q_perm.reshape(bsz * h, sq).to(torch.int32) if q_perm is not None else meta.num_work
    cq1 = meta.num_tiles.shape[1]
    tma_reason = None
    if cfg.key_layout == "tma":
        from svg2_kernels.varblock_tma import tma_refusal

        tma_reason = tma_refusal(k, v, cfg.block_n)
    tiers = [(meta.work, meta.num_work, cfg.block_m, cfg.num_warps)]
    if cfg.block_m_small > 0:
        tiers.append((meta.work_small, meta.num_work_small, cfg.block_m_small, cfg.num_warps_small))
    for work, num_work, block_m, warps in tiers:
        if work.shape[0] == 0:
            continue
        if cfg.key_layout == "tma" and tma_reason is None:
            from svg2_kernels.varblock_tma import launch_tma_kernel

            compiled = launch_tma_kernel(q, k, v, out, qidx, q_perm is not None, work, num_work, meta.q_bounds,
                                         meta.chunk_count, meta.chunk_table, scale, block_m, cfg.block_n, warps,
                                         cfg.num_stages)
        elif cfg.key_layout in ("chunks", "tma"):  # tma without descriptors: the same table, one chunk per tile
            from svg2_kernels.varblock_chunks import launch_chunk_kernel

            chunk = cfg.block_n if cfg.key_layout == "tma" else cfg.chunk
            compiled = launch_chunk_kernel(q, k, v, out, qidx, q_perm is not None, work, num_work, meta.q_bounds,
                                           meta.chunk_count, meta.chunk_table, scale, block_m, cfg.block_n,
                                           chunk, warps, cfg.num_stages)
        else:
            compiled = _varblock_fwd_kernel[(work.shape[0],)](
                q, k, v, out, qidx,
                work, num_work, meta.q_bounds, meta.num_tiles,
                meta.run_vstart, meta.run_delta, meta.run_vend, meta.tile_run,
                scale * 1.4426950408889634,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                h, cq1, meta.run_vstart.shape[-1], sq, meta.tile_run.shape[-1],
                HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
                BLOCK_M=block_m, BLOCK_N=cfg.block_n, WIN=cfg.win, GATHER_Q=q_perm is not None,
                TILE_TABLE=cfg.tile_table,
                num_warps=warps, num_stages=cfg.num_stages,
            )
        if compile_info is not None:
            compile_info.append(_compile_summary(compiled, block_m))
            if tma_reason is not None:
                compile_info[-1]["tma_fallback"] = tma_reason
    return out


def _compile_summary(compiled, block_m: int) -> dict:
    """Registers, spills, shared memory and K/V pipeline depth (buffers per tile) of one compiled launch."""
    import re

    info = {"block_m": block_m}
    for key in ("n_regs", "n_spills"):
        info[key] = getattr(compiled, key, None)
    info["shared"] = getattr(getattr(compiled, "metadata", None), "shared", None)
    try:
        ttgir = compiled.asm["ttgir"]
        depths = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x(?:bf16|f16|f32)", ttgir)
        info["kv_buffers"] = max((int(x) for x in depths), default=1)
        info["sync_loads_in_loop"] = _sync_loads_in_loop(ttgir)
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        info["ttgir_error"] = f"{type(e).__name__}: {e}"[:200]
    return info


def _sync_loads_in_loop(ttgir: str) -> int:
    """Plain (synchronous) tt.load ops inside the first scf.for of the kernel body."""
    lines = ttgir.splitlines()
    depth, inside, count = 0, False, 0
    for ln in lines:
        if not inside and "scf.for" in ln:
            inside, depth = True, 0
        if inside:
            depth += ln.count("{") - ln.count("}")
            if "tt.load" in ln:
                count += 1
            if depth <= 0 and "scf.yield" not in ln and "scf.for" not in ln:
                break
    return count


def _forward(q, k, v, q_offsets, k_offsets, block_map, scale, config: VarBlockConfig | None = None,
             q_perm: torch.Tensor | None = None):
    cap = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else (0, 0)
    cfg = config or default_config(q.device.type, q.shape[-1], cap, k.shape[2])
    meta = build_varblock_metadata(q_offsets, k_offsets, block_map, q.shape[2], k.shape[2], cfg)
    return varblock_attention_with_metadata(q, k, v, meta, scale, q_perm=q_perm)


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


@torch.library.custom_op("svg2_kernels::varblock_attention_token_order", mutates_args=())
def _varblock_attention_token_order_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_perm: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _forward(q, k, v, q_offsets, k_offsets, block_map, scale, q_perm=q_perm)


@_varblock_attention_token_order_op.register_fake
def _(q, k, v, q_perm, q_offsets, k_offsets, block_map, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def varblock_attention_token_order(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_perm: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Like :func:`varblock_attention` but q and the output are in *token* order: the kernel gathers Q rows
    through ``q_perm`` (B, H, Sq) (sorted position -> token) and scatters O back, so the query permutation and
    the inverse output permutation cost no separate passes. k, v stay cluster-sorted."""
    _check(q, k, v, q_offsets, k_offsets, block_map)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _varblock_attention_token_order_op(q, k, v, q_perm, q_offsets, k_offsets, block_map, scale)


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
    # CPU only under Triton's interpreter (tests); on CPU otherwise the torch path is the right one.
    devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    requires = ("triton",)

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.head_dim > 256:
            reasons.append(f"head dim {inputs.head_dim} > 256")
        return reasons

    fuses_query_permutation = True

    def forward(self, q, k, v, q_offsets, k_offsets, block_map, scale=None):
        return varblock_attention(q, k, v, q_offsets, k_offsets, block_map, scale)

    def forward_token_order(self, q, k, v, q_perm, q_offsets, k_offsets, block_map, scale=None):
        # The kernel gathers Q rows through q_perm and scatters O back: no separate permutation passes.
        return varblock_attention_token_order(q, k, v, q_perm, q_offsets, k_offsets, block_map, scale)

    def gather_rows(self, x, perm):
        from svg2_kernels.permute import permute_rows

        return permute_rows(x, perm)


register_attention_variant(TritonVarBlockAttention())
