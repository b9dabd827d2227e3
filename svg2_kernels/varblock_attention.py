"""Variable-block sparse attention: metadata, the custom op and the two Triton kernels' registry entries.

Query cluster ``i`` of head ``n`` (rows ``q_offsets[n, i]:q_offsets[n, i+1]`` of the cluster-sorted Q)
attends with an exact online softmax to the union of the selected key clusters ``j`` (``block_map[n, i,
j]``), each a contiguous ``(start, length)`` range of the cluster-sorted K/V. Semantics are those of
:func:`svg2_kernels.reference.varblock_attention_reference`.

How the work is laid out:

* **Key side.** Selected, adjacent, non-empty key clusters are merged into *runs*; every run is cut into
  pieces listed in one table per query cluster (:func:`svg2_kernels.varblock_chunks.build_chunk_table`):
  - ``triton_tma`` (:mod:`svg2_kernels.varblock_tma`, Hopper): pieces are whole ``block_n``-row boxes loaded
    by tensor descriptors (TMA). Costs up to ``block_n - 1`` padding rows per run; ordering key clusters so
    co-selected ones are adjacent (:mod:`svg2_kernels.order`) keeps runs long.
  - ``triton_chunks`` (:mod:`svg2_kernels.varblock_chunks`, any CUDA GPU): pieces are ``chunk``-row chunks
    and a tile is ``block_n // chunk`` of them, one broadcast load of addresses per tile.
* **Query side: tiles of clusters.** Each query cluster is split into ``block_m``-row tiles (plus an optional
  second tier of ``block_m_small`` rows for small remainders); the schedule of ``(head, cluster, first row)``
  work items is built on the GPU with a fixed upper bound on its length, so the grid needs no host sync;
  surplus programs exit. Rows past ``q_offsets[-1]`` form one extra cluster with no keys (zeros written).
* The metadata is built once per layout (:func:`svg2_kernels.plan.build_plan`), on the device, with no
  ``.item()`` and no host copy; the launch is a ``torch.library.custom_op`` that takes the plan's tensors
  (with a fake implementation for ``torch.compile``) and is CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svg2_kernels._triton import HAS_TRITON, TRITON_MISSING, interpreting
from svg2_kernels.plan import AttentionPlan, TileConfig, build_plan
from svg2_kernels.registry import AttentionInputs, AttentionVariant, register_attention_variant
from svg2_kernels.varblock_chunks import MAX_SEQ

__all__ = [
    "VarBlockMetadata",
    "build_varblock_metadata",
    "varblock_attention",
    "TritonTMAAttention",
    "TritonChunksAttention",
]


@dataclass
class VarBlockMetadata:
    """Scheduling metadata of the Triton kernels (int32 device tensors, fixed shapes given the layout's sizes).

    work: (T_max, 3) ``(head, query cluster, first row)`` work items of ``block_m`` rows, the first
        ``num_work`` valid; work_small / num_work_small: the same for the ``block_m_small`` tier (remainders
        of at most ``block_m_small`` rows), empty when that tier is off.
    q_bounds: (N, Cq + 2) query cluster offsets plus the sequence end (the tail "cluster" Cq).
    num_tiles: (N, Cq + 1) key tiles per query cluster (0 for the tail).
    chunk_table: (N, Cq + 1, T) packed key pieces ``start << 8 | valid rows``; chunk_count: (N, Cq + 1).
    """

    tiles: TileConfig
    work: torch.Tensor
    num_work: torch.Tensor
    work_small: torch.Tensor
    num_work_small: torch.Tensor
    q_bounds: torch.Tensor
    num_tiles: torch.Tensor
    chunk_table: torch.Tensor
    chunk_count: torch.Tensor


def build_varblock_metadata(
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    tiles: TileConfig,
) -> VarBlockMetadata:
    """Table of selected key pieces and the query-tile schedule, on the layout's device, without host syncs.

    Args:
        q_offsets: (B, H, Cq + 1) int; k_offsets: (B, H, Ck + 1) int; block_map: (B, H, Cq, Ck) bool.
        seqlen_q, seqlen_k: rows of the (sorted) Q and K tensors.
        tiles: a resolved TileConfig (every field set; ``chunk`` = rows per key piece).
    """
    dev = block_map.device
    cq, ck = block_map.shape[-2], block_map.shape[-1]
    n = block_map.numel() // max(1, cq * ck)
    qo = q_offsets.reshape(n, cq + 1).to(torch.int32)
    ko = k_offsets.reshape(n, ck + 1).to(torch.int32)
    bm = block_map.reshape(n, cq, ck).to(torch.bool)
    from svg2_kernels.varblock_chunks import build_chunk_table, build_chunk_table_triton

    if HAS_TRITON and (dev.type == "cuda" or interpreting()):  # one launch instead of ~30 torch ops
        table, count = build_chunk_table_triton(ko, bm, seqlen_k, tiles.chunk)
    else:
        sel = bm & (ko[:, 1:] > ko[:, :-1]).unsqueeze(1)
        sel = torch.cat([sel, torch.zeros(n, 1, ck, dtype=torch.bool, device=dev)], dim=1)  # + the tail row
        table, count = build_chunk_table(ko, sel, seqlen_k, tiles.chunk)
    nch = tiles.block_n // tiles.chunk
    num_tiles = (count + nch - 1) // nch
    i32 = torch.int32
    q_bounds = torch.cat([qo, torch.full((n, 1), seqlen_q, dtype=i32, device=dev)], dim=1).contiguous()
    key_side = dict(num_tiles=num_tiles, chunk_table=table, chunk_count=count)
    # Two Triton launches instead of ~50 torch ops, equal to the torch schedule (tested); torch ops on CPU.
    if HAS_TRITON and (interpreting() or (dev.type == "cuda" and tiles.triton_schedule)):
        from svg2_kernels.varblock_schedule import build_work_items_triton

        work, num_work, work_s, num_work_s = build_work_items_triton(
            qo, num_tiles.to(i32), seqlen_q, tiles.block_m, tiles.block_m_small, tiles.lpt, tiles.lpt_global)
        return VarBlockMetadata(tiles, work, num_work, work_s, num_work_s, q_bounds, **key_side)
    return _with_query_tiles_torch(qo, q_bounds, seqlen_q, n, cq, tiles, **key_side)


def _with_query_tiles_torch(qo, q_bounds, seqlen_q: int, n: int, cq: int, tiles: TileConfig,
                            **key_side) -> VarBlockMetadata:
    """The torch schedule (CPU, and the definition the Triton builder is tested against)."""
    i32 = torch.int32
    qsz = (q_bounds[:, 1:] - q_bounds[:, :-1]).clamp_min(0).reshape(-1)  # (n*(cq+1),)
    bm_, bs_ = tiles.block_m, tiles.block_m_small
    if bs_ > 0:  # full tiles + a large remainder in the big tier; a small remainder in the small tier
        rem = qsz % bm_
        big = qsz // bm_ + (rem > bs_).to(i32)
        small = ((rem > 0) & (rem <= bs_)).to(i32)
    else:
        big = (qsz + bm_ - 1) // bm_
        small = torch.zeros_like(qsz)
    work, num_work = _work_items(big, cq + 1, n * (-(-seqlen_q // bm_) + cq + 1), bm_, None)
    work_s, num_work_s = _work_items(small, cq + 1, n * (cq + 1) if bs_ > 0 else 0, bm_, qsz // bm_)
    if tiles.lpt:
        work = _longest_first(work, num_work, key_side["num_tiles"], tiles.lpt_global)
        work_s = _longest_first(work_s, num_work_s, key_side["num_tiles"], tiles.lpt_global)
    return VarBlockMetadata(tiles, work, num_work, work_s, num_work_s, q_bounds.contiguous(), **key_side)


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


def _launch(q, k, v, q_perm, meta: VarBlockMetadata, kernel: str, scale: float, return_lse: bool,
            compile_info: list | None = None):
    """Run one Triton kernel on prebuilt metadata. q is cluster-sorted, or in token order with q_perm."""
    bsz, h, sq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    t = meta.tiles
    out = torch.empty_like(q)
    lse = torch.empty(bsz * h, sq, dtype=torch.float32, device=q.device) if return_lse else None
    qidx = q_perm.reshape(bsz * h, sq).to(torch.int32) if q_perm is not None else meta.num_work
    tiers = [(meta.work, meta.num_work, t.block_m, t.num_warps)]
    if t.block_m_small > 0:
        tiers.append((meta.work_small, meta.num_work_small, t.block_m_small, t.num_warps_small))
    for work, num_work, block_m, warps in tiers:
        if work.shape[0] == 0:
            continue
        if kernel == "triton_tma":
            from svg2_kernels.varblock_tma import launch_tma_kernel

            compiled = launch_tma_kernel(q, k, v, out, lse, qidx, q_perm is not None, work, num_work, meta.q_bounds,
                                         meta.chunk_count, meta.chunk_table, scale, block_m, t.block_n, warps,
                                         t.num_stages)
        else:
            from svg2_kernels.varblock_chunks import launch_chunk_kernel

            compiled = launch_chunk_kernel(q, k, v, out, lse, qidx, q_perm is not None, work, num_work, meta.q_bounds,
                                           meta.chunk_count, meta.chunk_table, scale, block_m, t.block_n, t.chunk,
                                           warps, t.num_stages)
        if compile_info is not None:
            compile_info.append(_compile_summary(compiled, block_m))
    return out, (lse.view(bsz, h, sq) if return_lse else q.new_empty((0,), dtype=torch.float32))


@torch.library.custom_op("svg2_kernels::varblock_attention", mutates_args=())
def _varblock_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_perm: torch.Tensor | None,
    work: torch.Tensor,
    num_work: torch.Tensor,
    work_small: torch.Tensor,
    num_work_small: torch.Tensor,
    q_bounds: torch.Tensor,
    num_tiles: torch.Tensor,
    chunk_table: torch.Tensor,
    chunk_count: torch.Tensor,
    kernel: str,
    tiles: list[int],
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's tensors in, ``(out, lse)`` out (lse is empty unless ``return_lse``)."""
    bm_, bn, nw, ns, bms, nws, ch = tiles
    t = TileConfig(bm_, bn, nw, ns, bms, nws, ch, False, False, True)  # lpt/schedule: already in the work items
    meta = VarBlockMetadata(t, work, num_work, work_small, num_work_small, q_bounds, num_tiles, chunk_table,
                            chunk_count)
    return _launch(q, k, v, q_perm, meta, kernel, scale, return_lse)


@_varblock_attention_op.register_fake
def _(q, k, v, q_perm, work, num_work, work_small, num_work_small, q_bounds, num_tiles, chunk_table, chunk_count,
      kernel, tiles, scale, return_lse):
    lse_shape = tuple(q.shape[:3]) if return_lse else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


class _TritonVarBlock(AttentionVariant):
    """Shared part of the two Triton kernels: validation, plan (metadata) and launch through the custom op."""

    # CPU only under Triton's interpreter (tests); on CPU otherwise the torch kernel is the right one.
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    fuses_query_permutation = True  # Q read through q_perm, outputs written in token order

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if not HAS_TRITON:
            reasons.append(TRITON_MISSING)
        if inputs.head_dim > 256:
            reasons.append(f"head dim {inputs.head_dim} > 256")
        if inputs.seqlen_k >= MAX_SEQ:
            reasons.append(f"seqlen_k {inputs.seqlen_k} >= {MAX_SEQ} (key starts are packed in 23 bits)")
        return reasons

    def plan(self, q_offsets, k_offsets, block_map, inputs, tiles, skipped=()):
        resolved = tiles.resolve(self.name, inputs)
        meta = build_varblock_metadata(q_offsets, k_offsets, block_map, inputs.seqlen_q, inputs.seqlen_k, resolved)
        return AttentionPlan(self, inputs, q_offsets, k_offsets, block_map, resolved, meta, skipped)

    def run(self, q, k, v, plan, scale, q_perm, return_lse):
        m = plan.data
        out, lse = _varblock_attention_op(q, k, v, q_perm, m.work, m.num_work, m.work_small, m.num_work_small,
                                          m.q_bounds, m.num_tiles, m.chunk_table, m.chunk_count, self.name,
                                          plan.tiles.as_list(), float(scale), bool(return_lse))
        return out, (lse if return_lse else None)

    def gather_rows(self, x, perm):
        from svg2_kernels.permute import permute_rows

        return permute_rows(x, perm)


class TritonTMAAttention(_TritonVarBlock):
    """Key tiles are whole boxes of one run, loaded by TMA tensor descriptors (Hopper; the fastest measured)."""

    name = "triton_tma"
    priority = 110

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        from svg2_kernels.varblock_tma import tma_refusals

        return super().not_supported_reasons(inputs) + tma_refusals(inputs.device_type, inputs.dtype, inputs.head_dim)


class TritonChunksAttention(_TritonVarBlock):
    """Key tiles made of contiguous chunks of runs, per-row pointer loads (any CUDA GPU, any head dim <= 256)."""

    name = "triton_chunks"
    priority = 100


register_attention_variant(TritonTMAAttention())
register_attention_variant(TritonChunksAttention())


def varblock_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float | None = None,
    *,
    kernel: str = "auto",
    tiles: TileConfig | dict | None = None,
    q_perm: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Variable-block sparse attention in one call (plan + run); build the plan once to reuse a layout.

    Args:
        q: (batch, heads, seqlen_q, headdim) fp16/bf16/fp32, rows sorted by query cluster (token order with
            ``q_perm``).
        k, v: (batch, heads, seqlen_k, headdim), rows sorted by key cluster.
        q_offsets: (batch, heads, Cq + 1) int, exclusive prefix sums of query cluster sizes.
        k_offsets: (batch, heads, Ck + 1) int; rows past ``k_offsets[..., -1]`` are never attended.
        block_map: (batch, heads, Cq, Ck) bool.
        scale: softmax scale, default ``1/sqrt(headdim)``.
        kernel: a kernel name or "auto"; tiles: TileConfig overrides (Triton kernels).
        q_perm: (batch, heads, seqlen_q) sorted position -> token index (q and outputs in token order).
        return_lse: also return the log-sum-exp.
    Returns:
        out (batch, heads, seqlen_q, headdim) in q's dtype (rows that select no key are zero); with
        ``return_lse``, ``(out, lse)``, lse (batch, heads, seqlen_q) float32 natural log (-inf: no key).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q (B,H,Sq,D) and k, v (B,H,Sk,D), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    plan = build_plan(q_offsets, k_offsets, block_map, q.shape[2], k.shape[2], head_dim=q.shape[-1],
                      dtype=q.dtype, kernel=kernel, tiles=tiles)
    return plan.run(q, k, v, scale=scale, q_perm=q_perm, return_lse=return_lse)


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


