"""Compensation kernel ``triton_sorted``: query tiles in cluster order, one skip row per tile, only the
centroid tiles a query tile skips something in.

Same contract and numbers as :func:`svg2_kernels.compensation.compensation_attention` (backend ``triton``:
centroid attention over the skipped, non-empty key clusters, merged with the sparse out / LSE in the epilogue).
What differs is how the work is laid out:

* **Query tiles in cluster order.** Program ``(m, head)`` takes rows ``q_perm[m * BLOCK_M : (m + 1) * BLOCK_M]``
  (``layout.q_perm``: rows sorted by query cluster), reads Q, the sparse out and LSE through that permutation
  (each row one contiguous D-vector) and writes the merged rows back in token order. A tile then lies in one
  or two query clusters, so its bias is one or two *vectors* of the skip table, selected per row, instead of a
  (BLOCK_M, BLOCK_N) per-row gather. The loop comes in three forms chosen once per program (a uniform branch):
  one cluster (bias broadcast), two clusters (bias selected per row), more (the per-row gather, as
  ``triton``); any permutation gives the right numbers, a cluster-sorted one makes most tiles the first two.
* **Only the centroid tiles that matter.** Key clusters are numbered along a chain of similar centroids
  (``order_key_clusters``), so the clusters a query cluster keeps sit in runs and some ``BLOCK_N``-wide centroid
  tiles hold nothing it skips. A small host-built table lists, per query tile, the centroid tiles where any of
  its query clusters skips a non-empty key cluster (the tile's label range is a superset of its clusters, so
  the list never misses a term); the loop walks only those.
* **The FlashAttention loop of ``triton_tma``.** Centroid and value-mean tiles are whole boxes (tensor
  descriptors, TMA on sm_90+; contiguous pointer loads otherwise: an autotuned choice), the bias is additive in
  raw-score units (``ln n_j / scale``, ``-inf`` where the cluster is kept, empty or padding), the max is taken on
  raw scores and the exponent is one FMA, and ``P V`` accumulates into ``acc`` in the dot.

Why: ``triton`` runs its loop at about half of cuDNN's rate on an H200 (5.9 ms at Wan 14B (300, 1000));
the per-row gather of skip bytes is the kind of load that held the sparse kernel's loop to 0.55-0.65 of
cuDNN, against 0.88-0.95 with descriptor loads (notes/kernels.md).
"""

from __future__ import annotations

import functools

import torch

from svg2_kernels._triton import HAS_TMA, HAS_TRITON, TensorDescriptor, interpreting, tl, triton
from svg2_kernels.compensation import (
    _CK_ALIGN,
    CompensationTiles,
    TritonCompensation,
    _pad_rows,
    check_compensation_args,
)
from svg2_kernels.registry import register_compensation_variant

__all__ = [
    "default_sorted_tiles",
    "sorted_tables",
    "walk_tables",
    "compensation_attention_sorted",
    "last_sorted_config",
    "sorted_autotune_configs",
    "TritonSortedCompensation",
]

_LOG2E = 1.4426950408889634


def default_sorted_tiles(head_dim: int, device_type: str) -> CompensationTiles:
    """Tiles of the sorted kernel (BLOCK_M and BLOCK_N fixed, since the walk table depends on them; on CUDA
    warps, stages and the load kind are autotuned unless the caller passes tiles). 128 x 64 is the
    FlashAttention-forward tile of Hopper at D <= 128 (8 warps: no spills on sm_90a); D > 128 halves both (a
    64 x 256 fp32 accumulator is 128 registers a thread at 4 warps). Interpreter: 16 x 16."""
    if device_type != "cuda" or interpreting():
        return CompensationTiles(16, 16, 4, 1)
    if head_dim > 128:
        return CompensationTiles(64, 32, 4, 2)
    return CompensationTiles(128, 64, 8 if head_dim > 64 else 4, 2)


def _tma_ok(q: torch.Tensor, block_d: int) -> bool:
    """Descriptor loads: Triton with tensor descriptors, rows a multiple of 16 bytes, and sm_90+ on CUDA."""
    if not HAS_TMA or (block_d * q.element_size()) % 16:
        return False
    if q.device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_capability(q.device)[0] >= 9
    return True


# ------------------------------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _walk(q, first, bias_rows, bias0, bias1, KC, VM, desc_kc, desc_vm, lst, n_t, kv_row0, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GATHER: tl.constexpr,
              STAGES: tl.constexpr, USE_TMA: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax (base 2, raw-score max) over the listed centroid tiles. Bias per tile: row ``bias0``
        of the bias table where ``first`` else row ``bias1`` (tiles within two query clusters), or with GATHER
        each row's own (``bias_rows``, the rare tiles over three or more clusters). ``STAGES``: the loop's
        software pipeline depth (1: none, for the rare gather loop, so it adds no shared-memory buffers)."""
        n_off = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        # The max starts finite: a tile with no skipped column leaves the state unchanged (exp2(-inf) = 0).
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for i in tl.range(0, n_t, num_stages=STAGES):
            col0 = tl.load(lst + i) * BLOCK_N
            cols = col0 + n_off
            if USE_TMA:
                kc = desc_kc.load([kv_row0 + col0, 0])  # (BLOCK_N, BLOCK_D)
                vm = desc_vm.load([kv_row0 + col0, 0])
            else:
                kc = tl.load(KC + cols[:, None] * BLOCK_D + d[None, :])  # KC, VM: the head's tables
                vm = tl.load(VM + cols[:, None] * BLOCK_D + d[None, :])
            if GATHER:
                bias = tl.load(bias_rows + cols[None, :])
            else:
                bias = tl.where(first[:, None], tl.load(bias0 + cols)[None, :], tl.load(bias1 + cols)[None, :])
            if IEEE:
                qk = tl.dot(q, tl.trans(kc), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(kc))
            qk = qk + bias
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p.to(vm.dtype), vm, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(vm.dtype), vm, acc)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _sorted_kernel(
        Q, KC, VM, desc_kc, desc_vm, BIAS, LABS, PERM, LIST, COUNT, O_IN, L_IN, OUT, LSE,
        qk_scale,
        s_qb, s_qh, s_qs, s_qd,
        s_pb, s_ph, s_ps,
        s_ob, s_oh, s_os, s_od,
        s_eb, s_eh, s_es,
        H, S, CQ, CK_PAD, NUM_M, NUM_T,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MERGE: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr, STAGES: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        bh64 = bh.to(tl.int64)
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs < S
        rows = tl.load(PERM + b * s_pb + h * s_ph + offs * s_ps, mask=row_ok, other=0).to(tl.int32)  # S < 2^31
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        # Labels in walk order (host-gathered, contiguous): loaded beside the permutation, not after it.
        lab = tl.load(LABS + bh64 * S + offs, mask=row_ok, other=0)
        q = tl.load(Q + b * s_qb + h * s_qh + rows.to(tl.int64)[:, None] * s_qs + d[None, :] * s_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # The tile's label range; rows past S take c0 (valid skip rows, never stored).
        c0 = tl.min(tl.where(row_ok, lab, CQ), 0)
        c1 = tl.max(tl.where(row_ok, lab, -1), 0)
        lab = tl.where(row_ok, lab, c0)
        first = lab == c0
        n_other = tl.sum(((lab != c0) & (lab != c1)).to(tl.int32), 0)

        # Bias table rows (fp32, raw-score units): ln(n_j) / scale where the cluster skips j, else -inf.
        bias_head = BIAS + bh64 * CQ * CK_PAD
        bias_rows = bias_head + lab[:, None] * CK_PAD
        bias0 = bias_head + c0 * CK_PAD
        bias1 = bias_head + c1 * CK_PAD
        item = bh64 * NUM_M + pid_m
        lst = LIST + item * NUM_T
        n_t = tl.load(COUNT + item)
        kv_row0 = (bh * CK_PAD).to(tl.int32)  # first table row of the head (a TMA coordinate: int32)
        KC = KC + bh64 * CK_PAD * BLOCK_D
        VM = VM + bh64 * CK_PAD * BLOCK_D
        if n_other == 0:  # one or two query clusters (c0 == c1: both rows the same): two vector loads a tile
            m_i, l_i, acc = _walk(q, first, bias_rows, bias0, bias1, KC, VM, desc_kc, desc_vm, lst, n_t,
                                  kv_row0, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, False, STAGES, USE_TMA, IEEE)
        else:
            m_i, l_i, acc = _walk(q, first, bias_rows, bias0, bias1, KC, VM, desc_kc, desc_vm, lst, n_t,
                                  kv_row0, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, True, 1, USE_TMA, IEEE)

        # l_i = 0: the row skips no non-empty cluster (its centroid set is empty: max -inf).
        m_b = tl.where(l_i > 0, m_i, float("-inf"))
        st_ok = row_ok[:, None] & d_ok[None, :]
        if MERGE:
            lse_in = tl.load(L_IN + b * s_eb + h * s_eh + rows.to(tl.int64) * s_es, mask=row_ok,
                             other=float("-inf"))
            lse_a = lse_in * 1.4426950408889634
            out_a = tl.load(O_IN + b * s_ob + h * s_oh + rows.to(tl.int64)[:, None] * s_os + d[None, :] * s_od,
                            mask=st_ok, other=0.0).to(tl.float32)
            # Reference point M = max(lse_a, m): w_a, w_b <= 1 and the denominator >= 1 wherever a key exists.
            mx = tl.maximum(lse_a, m_b)
            mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
            w_a = tl.math.exp2(lse_a - mx_safe)
            w_b = tl.math.exp2(m_b - mx_safe)
            denom = w_a + w_b * l_i
            # An empty sparse set (lse_a = -inf) weighs 0 whatever its output holds; both empty: out 0, lse -inf.
            num = tl.where(w_a[:, None] > 0, out_a * w_a[:, None], 0.0) + acc * w_b[:, None]
            den_safe = tl.where(denom > 0, denom, 1.0)
            out = num / den_safe[:, None]
            lse = tl.where(denom > 0, (mx_safe + tl.math.log2(den_safe)) * 0.6931471805599453, float("-inf"))
            lse = tl.where(l_i > 0, lse, lse_in)  # a row that skips nothing keeps the sparse LSE bit for bit
        else:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            out = acc / l_safe[:, None]
            lse = tl.where(l_i > 0, (m_b + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(OUT + bh64 * S * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=st_ok)
        tl.store(LSE + bh64 * S + rows, lse, mask=row_ok)

    @functools.cache
    def _tuned_kernel(allow_tma: bool, head_dim: int):
        """The kernel autotuned over :func:`sorted_autotune_configs` (key: head dim, padded Ck, tiles)."""
        configs = [triton.Config({"USE_TMA": tma, "STAGES": st}, num_warps=w, num_stages=st)
                   for tma, w, st in sorted_autotune_configs(allow_tma, head_dim)]
        return triton.autotune(configs=configs, key=["HEAD_DIM", "CK_PAD", "BLOCK_M", "BLOCK_N"])(_sorted_kernel)


def sorted_autotune_configs(allow_tma: bool, head_dim: int) -> list[tuple[bool, int, int]]:
    """(descriptor loads, warps, stages) the autotuner tries at the default tiles (pruned: four compiles).

    Compiled for sm_90a (Triton 3.8, bf16, D=128, 128 x 64 tiles, merge on): 8 warps 210-234 registers and
    no spills; 4 warps 255 registers and ~50 spill instructions per loop iteration (of ~780), but two programs
    per SM hide each other's prologue and softmax (what made 4 warps the measured choice of ``triton_tma``).
    Descriptor vs pointer loads of the centroid tiles: both. D > 128 runs 64 x 32 tiles with 4 warps."""
    if head_dim > 128:
        return [(True, 4, 2), (False, 4, 2)] if allow_tma else [(False, 4, 2), (False, 4, 3)]
    if allow_tma:
        return [(True, 8, 2), (True, 4, 2), (False, 8, 2), (False, 8, 3)]
    return [(False, 8, 2), (False, 8, 3), (False, 4, 2)]


def last_sorted_config(q: torch.Tensor) -> str | None:
    """The configuration the autotuner picked for calls like ``q`` (device, head dim), for benchmark records;
    None before the first tuned call."""
    if not HAS_TRITON or _tuned_kernel.cache_info().currsize == 0:
        return None
    d = q.shape[-1]
    cfg = getattr(_tuned_kernel(_tma_ok(q, max(16, triton.next_power_of_2(d))), d), "best_config", None)
    return None if cfg is None else str(cfg)


# --------------------------------------------------------------------------------------------- host side


def sorted_tables(centroids: torch.Tensor, value_means: torch.Tensor, sizes: torch.Tensor, skipped: torch.Tensor,
                  scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's per-head tables: centroids and value means (B, H, CK_PAD, BLOCK_D) in ``dtype`` (zero
    padding), and the bias table (B, H, Cq, CK_PAD) fp32 in raw-score units: ``ln(n_j) / scale`` where query
    cluster i skips non-empty key cluster j, else -inf (kept, empty, padding). CK_PAD: Ck rounded up to 128;
    BLOCK_D: the head dim rounded up to a power of two >= 16. About 49 MB of bias at Wan 14B (300, 1000)."""
    ck, d = centroids.shape[-2:]
    ck_pad = -(-ck // _CK_ALIGN) * _CK_ALIGN
    bd = max(16, 1 << (d - 1).bit_length())
    kc = _pad_rows(centroids.to(dtype), ck_pad, bd)
    vm = _pad_rows(value_means.to(dtype), ck_pad, bd)
    lnb = torch.log(sizes.float()) * (1.0 / float(scale))  # log 0 = -inf: empty clusters weigh 0
    bias = torch.where(skipped, lnb[:, :, None, :], float("-inf"))
    bias = torch.nn.functional.pad(bias, (0, ck_pad - ck), value=float("-inf")).contiguous()
    return kc, vm, bias


def walk_tables(q_labels: torch.Tensor, q_perm: torch.Tensor, bias: torch.Tensor, block_m: int,
                block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query labels in walk order, and the centroid tiles each query tile walks (listed first, ascending)
    with how many.

    Query tile ``m`` of head ``n`` is rows ``q_perm[n, m * block_m:(m + 1) * block_m]``; it must walk centroid tile
    ``t`` (key clusters ``[t * block_n, (t + 1) * block_n)``) when some query cluster of the tile's label range
    ``[min label, max label]`` has a finite bias there (skips a non-empty key cluster). A range holds every label
    of the tile, so the list covers every term (sorted rows make the range one or two clusters). Sync-free.

    Args:
        bias: (B, H, Cq, CK_PAD) the bias table of :func:`sorted_tables`.
    Returns:
        labels (N, Sq) int32 (``q_labels`` gathered through ``q_perm``),
        list (N * M, T) int32 (first ``count`` entries: tile indices, ascending; the rest: the other tiles),
        count (N * M,) int32; N = B * H, M = cdiv(Sq, block_m), T = CK_PAD // block_n.
    """
    b, h, s = q_labels.shape
    cq, ck_pad = bias.shape[-2:]
    n, nm, nt = b * h, -(-s // block_m), ck_pad // block_n
    lab = torch.gather(q_labels, 2, q_perm.long()).reshape(n, s)
    walk_labels = lab.to(torch.int32)
    if nm * block_m > s:  # the last tile's missing rows repeat its last label (no new cluster)
        lab = torch.cat([lab, lab[:, -1:].expand(n, nm * block_m - s)], 1)
    lab = lab.view(n, nm, block_m)
    c0, c1 = lab.amin(-1), lab.amax(-1)
    live = torch.isfinite(bias).view(n, cq, nt, block_n).any(-1)  # (n, cq, nt)
    # Prefix counts over query clusters: "some cluster of [c0, c1] needs tile t" is one difference.
    pref = torch.nn.functional.pad(torch.cumsum(live.to(torch.int32), 1), (0, 0, 1, 0))  # (n, cq + 1, nt)
    hi = torch.gather(pref, 1, (c1 + 1)[..., None].expand(n, nm, nt))
    lo = torch.gather(pref, 1, c0[..., None].expand(n, nm, nt))
    need = (hi - lo) > 0  # (n, nm, nt)
    count = need.sum(-1, dtype=torch.int32)
    # Stable compaction: needed tiles first, each group ascending.
    needed_pos = torch.cumsum(need.to(torch.int32), -1) - 1
    other_pos = count[..., None] + torch.cumsum((~need).to(torch.int32), -1) - 1
    pos = torch.where(need, needed_pos, other_pos).long()
    tiles = torch.arange(nt, device=need.device, dtype=torch.int32).expand(n, nm, nt)
    lst = torch.empty_like(tiles).scatter_(-1, pos, tiles)
    return walk_labels, lst.reshape(n * nm, nt).contiguous(), count.reshape(n * nm).contiguous()


def _launch(q, kc, vm, bias, labs, q_perm, lst, count, out_in, lse_in, scale, tiles, use_tma):
    b, h, s, d = q.shape
    cq, ck_pad = bias.shape[-2:]
    out = torch.empty((b, h, s, d), dtype=q.dtype if out_in is None else out_in.dtype, device=q.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    if s == 0 or b * h == 0:
        return out, lse
    block_m, block_n, num_warps, num_stages, tuned = tiles
    block_d = kc.shape[-1]
    merge = out_in is not None
    oi = out_in if merge else out  # placeholders: never read without MERGE
    li = lse_in if merge else lse
    nm, nt = -(-s // block_m), ck_pad // block_n
    allow_tma = _tma_ok(q, block_d) if use_tma != 0 else False
    if use_tma == 1 and not allow_tma:
        raise NotImplementedError("descriptor (TMA) loads are unavailable here (Triton >= 3.4, sm_90+ and rows of a "
                                  "multiple of 16 bytes needed); pass use_tma=None or False")
    kc2, vm2 = kc.view(b * h * ck_pad, block_d), vm.view(b * h * ck_pad, block_d)
    if allow_tma:
        desc_kc = TensorDescriptor.from_tensor(kc2, [block_n, block_d])
        desc_vm = TensorDescriptor.from_tensor(vm2, [block_n, block_d])
    else:  # placeholders: never read without USE_TMA
        desc_kc, desc_vm = kc2, vm2
    args = (
        q, kc2, vm2, desc_kc, desc_vm, bias, labs, q_perm, lst, count, oi, li, out, lse,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        q_perm.stride(0), q_perm.stride(1), q_perm.stride(2),
        oi.stride(0), oi.stride(1), oi.stride(2), oi.stride(3),
        li.stride(0), li.stride(1), li.stride(2),
        h, s, cq, ck_pad, nm, nt,
    )
    flags = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MERGE=merge,
                 IEEE=q.dtype == torch.float32)
    grid = (nm, b * h)
    if tuned:
        _tuned_kernel(allow_tma, d)[grid](*args, **flags)
    else:
        _sorted_kernel[grid](*args, **flags, USE_TMA=allow_tma, STAGES=num_stages, num_warps=num_warps,
                             num_stages=num_stages)
    return out, lse


@torch.library.custom_op("svg2_kernels::compensation_attention_sorted", mutates_args=())
def _sorted_op(
    q: torch.Tensor,
    centroids: torch.Tensor,
    value_means: torch.Tensor,
    bias: torch.Tensor,
    walk_labels: torch.Tensor,
    q_perm: torch.Tensor,
    walk_list: torch.Tensor,
    walk_count: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float,
    tiles: list[int],
    use_tma: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared tensors in (see :func:`compensation_attention_sorted`), ``(out, lse)`` out. ``tiles``: block_m,
    block_n, warps, stages, autotuned (1: warps, stages and loads tuned). ``use_tma``: -1 descriptors where
    available, 0 pointer loads, 1 descriptors (an error where unavailable)."""
    return _launch(q, centroids, value_means, bias, walk_labels, q_perm, walk_list, walk_count, out, lse, scale,
                   tiles, None if use_tma < 0 else use_tma)


@_sorted_op.register_fake
def _(q, centroids, value_means, bias, walk_labels, q_perm, walk_list, walk_count, out, lse, scale, tiles,
      use_tma):
    dtype = q.dtype if out is None else out.dtype
    return q.new_empty(q.shape, dtype=dtype), q.new_empty(tuple(q.shape[:3]), dtype=torch.float32)


def compensation_attention_sorted(
    q: torch.Tensor,
    centroids: torch.Tensor,
    value_means: torch.Tensor,
    sizes: torch.Tensor,
    skipped: torch.Tensor,
    q_labels: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    q_perm: torch.Tensor | None = None,
    tiles: CompensationTiles | None = None,
    use_tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid attention over the skipped key clusters, merged with a sparse result when one is given; the
    arguments and results of :func:`svg2_kernels.compensation.compensation_attention`, plus:

    Args:
        q_perm: (B, H, Sq) the rows in query-cluster order (``layout.q_perm``); None sorts ``q_labels``
            (stable). Any permutation gives the same numbers; a cluster-sorted one is what makes it fast.
        tiles: launch parameters, all used as given; None: :func:`default_sorted_tiles`, and on CUDA with
            ``use_tma`` None warps, stages and the load kind autotuned (:func:`sorted_autotune_configs`).
        use_tma: descriptor (TMA) loads of the centroid tiles: True (an error where Triton or the GPU lacks
            them), False (pointer loads), None (autotuned on CUDA without ``tiles``, else descriptors where
            available).
    """
    check_compensation_args(q, centroids, value_means, sizes, skipped, q_labels, out, lse)
    b, h, sq, d = q.shape
    if q_perm is not None and tuple(q_perm.shape) != (b, h, sq):
        raise ValueError(f"q_perm must be (batch, heads, seqlen_q) = {(b, h, sq)}, got {tuple(q_perm.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (the bias ln n / scale is in raw-score units), got {scale}")
    tuned = tiles is None and use_tma is None and q.device.type == "cuda" and not interpreting()
    tiles = tiles or default_sorted_tiles(d, q.device.type)
    if q_perm is None:
        q_perm = torch.sort(q_labels, dim=-1, stable=True).indices
    kc, vm, bias = sorted_tables(centroids, value_means, sizes, skipped, scale, q.dtype)
    labs, lst, count = walk_tables(q_labels, q_perm, bias, tiles.block_m, tiles.block_n)
    return _sorted_op(q, kc, vm, bias, labs, q_perm, lst, count, out,
                      None if lse is None else lse.float(), float(scale),
                      [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages, int(tuned)],
                      -1 if use_tma is None else int(use_tma))


# ----------------------------------------------------------------------------------------------- registry


class TritonSortedCompensation(TritonCompensation):
    """The cluster-order kernel above (one launch, merge in the epilogue, only the needed centroid tiles); it
    supports and refuses what ``triton`` does."""

    name = "triton_sorted"
    priority = 110  # H200, (300, 1000) clusters at Wan 14B 720p: 5.52 ms vs triton's 5.84 ms (results/compensation)

    def run(self, q, centroids, value_means, sizes, skipped, q_labels, scale, out=None, lse=None, q_perm=None):
        return compensation_attention_sorted(q, centroids, value_means, sizes, skipped, q_labels, scale, out, lse,
                                             q_perm=q_perm)


register_compensation_variant(TritonSortedCompensation())
