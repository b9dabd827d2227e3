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
* **Modes** (``bias=``, ``walk=``; the same numbers bit for bit, ``DEFAULT_MODE`` unless named). The bias comes
  from the fp32 (Cq, CK_PAD) table above ("table") or is built per tile from the caller's ``skipped`` read in
  place (as int32 words: wide enough for asynchronous copies) and ln(n_j)/scale per key cluster ("skip"); the
  tiles come from the host list ("list"), are all of them ("all": a tile without a term is an exact no-op), or
  come from a bitmask the kernel builds in its prologue from the tile's two skip rows ("bits"). The host work
  per mode at Wan 14B (300, 1000) (``experiments/bench_compensation.py --count-ops``): 41 aten ops and 308 MB
  written (table list), 12 and 156 MB (table all / bits), 34 and 125 MB (skip list), 7 and 43 MB (skip all /
  bits). Compensation by compacted (gathered) centroid tiles is not here: see notes/kernels_lab_notebook.md.
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
    CompensationTiles,
    TritonCompensation,
    _block_d,
    _ck_pad,
    _pad_rows,
    _padded_centroids,
    check_compensation_args,
)
from svg2_kernels.registry import register_compensation_variant

__all__ = [
    "DEFAULT_MODE",
    "default_sorted_tiles",
    "sorted_tables",
    "skip_tables",
    "tile_liveness",
    "walk_tables",
    "walk_tables_skip",
    "SORTED_BIAS",
    "SORTED_WALKS",
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

# Walk modes (the kernel's WALK): 0 the host-built tile list, 1 every centroid tile, 2 the tiles of an in-kernel
# bitmask (int64 scalar: at most 62 tiles, else the launch walks every tile; 62 x 64 = 3968 key clusters).
_WALKS = {"list": 0, "all": 1, "bits": 2}
_BITS_MAX_TILES = 62

if HAS_TRITON:

    @triton.jit
    def _load_cols(ptr, cols, CK, other, MASK: tl.constexpr):
        """A per-column load; with MASK the columns at or past CK read ``other`` (the unpadded last tile)."""
        if MASK:
            x = tl.load(ptr, mask=cols < CK, other=other)
        else:
            x = tl.load(ptr)
        return x

    @triton.jit
    def _skip_set(ptr, cols, s_bk, CK, byte_mask, WORD: tl.constexpr, MASK: tl.constexpr):
        """Whether the skip byte of each column is set, ``ptr`` pointing at a row (or rows) of ``skipped`` viewed
        as WORD-byte integers (WORD = 4 / 2: each load brings WORD columns; 1: bytes). ``byte_mask``: each column's
        byte within its word (little-endian: byte k is column k), loop-invariant. Loads of 4 bytes let the software
        pipeliner copy them asynchronously one tile ahead, like the fp32 table's rows (sm_90a compile, Triton 3.6
        and 3.8: single-byte loads stay synchronous, ahead of the QK MMA that takes the bias as its accumulator)."""
        if WORD == 1:
            x = _load_cols(ptr + cols * s_bk, cols, CK, 0, MASK)
        else:
            x = _load_cols(ptr + (cols // WORD) * s_bk, cols, CK, 0, MASK) & byte_mask
        return x != 0

    @triton.jit
    def _tile_bias(cols, first, bias_rows, bias0, bias1, s_bk, lnb_head, CK, byte_mask,
                   GATHER: tl.constexpr, SKIP_BIAS: tl.constexpr, MASK_N: tl.constexpr, WORD: tl.constexpr):
        """The (BLOCK_M, BLOCK_N) bias of one centroid tile in raw-score units (-inf: not a term).

        SKIP_BIAS: built from the skip bytes (``skipped`` read in place) and the per-head vector ln(n_j)/scale
        (-inf for empty clusters and padding): ``skip[c, j] ? lnb[j] : -inf``, the very values of the table below.
        Else read from the fp32 (Cq, CK_PAD) bias table. Rows: ``bias0`` where ``first`` else ``bias1`` (tiles
        within two query clusters), or with GATHER each row's own (``bias_rows``)."""
        if SKIP_BIAS:
            lnb = tl.load(lnb_head + cols)  # padded to CK_PAD with -inf: no mask
            if GATHER:
                sk = _skip_set(bias_rows, cols[None, :], s_bk, CK, byte_mask[None, :], WORD, MASK_N)
                bias = tl.where(sk, lnb[None, :], float("-inf"))
            else:
                b0 = tl.where(_skip_set(bias0, cols, s_bk, CK, byte_mask, WORD, MASK_N), lnb, float("-inf"))
                b1 = tl.where(_skip_set(bias1, cols, s_bk, CK, byte_mask, WORD, MASK_N), lnb, float("-inf"))
                bias = tl.where(first[:, None], b0[None, :], b1[None, :])
        else:
            if GATHER:
                bias = tl.load(bias_rows + cols[None, :])
            else:
                bias = tl.where(first[:, None], tl.load(bias0 + cols)[None, :], tl.load(bias1 + cols)[None, :])
        return bias

    @triton.jit
    def _live_bits(bias0, bias1, s_bk, lnb_head, CK, BLOCK_N: tl.constexpr, NT_P2: tl.constexpr,
                   WORD: tl.constexpr, SKIP_BIAS: tl.constexpr):
        """Bit t set where query cluster c0 or c1 (rows ``bias0``, ``bias1``) skips a non-empty key cluster in
        centroid tile t (a finite bias), and how many bits are set: the host list's entries for this tile, built
        in the prologue from two skip rows and ln(n)/scale (6 KB at Ck = 1000) or two fp32 bias rows (8 KB); the
        loop then reads 16 x 32 KB of centroid tiles."""
        t = tl.arange(0, NT_P2)
        cols = t[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        if SKIP_BIAS:
            lnb = tl.load(lnb_head + cols, mask=cols < CK, other=float("-inf"))
            byte_mask = tl.full([BLOCK_N], 0xFF, tl.int32) << ((tl.arange(0, BLOCK_N) % WORD) * 8)
            sk = (_skip_set(bias0, cols, s_bk, CK, byte_mask[None, :], WORD, True)
                  | _skip_set(bias1, cols, s_bk, CK, byte_mask[None, :], WORD, True))
            live = sk & (lnb > float("-inf"))
        else:
            live = ((tl.load(bias0 + cols, mask=cols < CK, other=float("-inf")) > float("-inf"))
                    | (tl.load(bias1 + cols, mask=cols < CK, other=float("-inf")) > float("-inf")))
        tile_live = tl.max(live.to(tl.int32), 1)  # (NT_P2,) 0 / 1
        return tl.sum(tile_live.to(tl.int64) << t.to(tl.int64), 0), tl.sum(tile_live, 0)

    @triton.jit
    def _walk(q, first, bias_rows, bias0, bias1, s_bk, lnb_head, KC, VM, desc_kc, desc_vm, lst, n_t, bits, kv_row0,
              CK, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GATHER: tl.constexpr,
              STAGES: tl.constexpr, USE_TMA: tl.constexpr, IEEE: tl.constexpr, SKIP_BIAS: tl.constexpr,
              WALK: tl.constexpr, MASK_N: tl.constexpr, WORD: tl.constexpr):
        """Online softmax (base 2, raw-score max) over ``n_t`` centroid tiles: the listed ones (WALK 0), every one
        (1), or the set bits of ``bits``, lowest first (2: the list's order). Bias per tile: :func:`_tile_bias`.
        ``STAGES``: the loop's software pipeline depth (1: none, for the rare gather loop, so it adds no
        shared-memory buffers). MASK_N: the last tile is partial (unpadded tables); pointer loads mask it,
        descriptor loads read the next head's rows (or zeros past the end), weighted exactly 0 by a -inf bias."""
        n_off = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        byte_mask = tl.full([BLOCK_N], 0xFF, tl.int32) << ((n_off % WORD) * 8)  # tiles start at word boundaries
        # The max starts finite: a tile with no skipped column leaves the state unchanged (exp2(-inf) = 0, alpha = 1),
        # so walking a tile that holds no term changes no bit of the result.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for i in tl.range(0, n_t, num_stages=STAGES):
            if WALK == 0:
                col0 = tl.load(lst + i) * BLOCK_N
            elif WALK == 1:
                col0 = i * BLOCK_N
            else:
                low = bits & (-bits)  # the lowest set bit; its index is the exponent of its (exact) float32 value
                col0 = ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127) * BLOCK_N
                bits = bits ^ low
            cols = col0 + n_off
            if USE_TMA:
                kc = desc_kc.load([kv_row0 + col0, 0])  # (BLOCK_N, BLOCK_D)
                vm = desc_vm.load([kv_row0 + col0, 0])
            elif MASK_N:
                kc = tl.load(KC + cols[:, None] * BLOCK_D + d[None, :], mask=(cols < CK)[:, None], other=0.0)
                vm = tl.load(VM + cols[:, None] * BLOCK_D + d[None, :], mask=(cols < CK)[:, None], other=0.0)
            else:
                kc = tl.load(KC + cols[:, None] * BLOCK_D + d[None, :])  # KC, VM: the head's tables
                vm = tl.load(VM + cols[:, None] * BLOCK_D + d[None, :])
            bias = _tile_bias(cols, first, bias_rows, bias0, bias1, s_bk, lnb_head, CK, byte_mask, GATHER, SKIP_BIAS,
                              MASK_N, WORD)
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
        Q, KC, VM, desc_kc, desc_vm, BIAS, LNB, LABS, PERM, LIST, COUNT, O_IN, L_IN, OUT, LSE,
        qk_scale,
        s_qb, s_qh, s_qs, s_qd,
        s_pb, s_ph, s_ps,
        s_ob, s_oh, s_os, s_od,
        s_eb, s_eh, s_es,
        s_bb, s_bh, s_bq, s_bk, s_lh,
        H, S, CQ, CK, NUM_M, NUM_T,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MERGE: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr, STAGES: tl.constexpr,
        SKIP_BIAS: tl.constexpr, WALK: tl.constexpr, MASK_N: tl.constexpr, NT_P2: tl.constexpr,
        WORD: tl.constexpr, ROW_ALIGN: tl.constexpr,
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

        # Skip rows: of the fp32 bias table (raw-score units: ln(n_j) / scale where the cluster skips j, else -inf)
        # or, with SKIP_BIAS, of the skip bytes (the bias then comes from ln(n_j) / scale, ``LNB``, per column).
        bias_head = BIAS + b * s_bb + h * s_bh
        bias0 = bias_head + tl.multiple_of(c0 * s_bq, ROW_ALIGN)
        bias1 = bias_head + tl.multiple_of(c1 * s_bq, ROW_ALIGN)
        if SKIP_BIAS:  # the gather loop reads bytes: per-row words would hold WORD x the registers
            bias_rows = (bias_head.to(tl.pointer_type(tl.uint8))
                         + tl.multiple_of(lab[:, None] * s_bq * WORD, [1, ROW_ALIGN * WORD]))
        else:
            bias_rows = bias_head + tl.multiple_of(lab[:, None] * s_bq, [1, ROW_ALIGN])
        lnb_head = LNB + bh64 * s_lh
        item = bh64 * NUM_M + pid_m
        lst = LIST + item * NUM_T
        bits = tl.zeros([], tl.int64)
        if WALK == 0:
            n_t = tl.load(COUNT + item)
        elif WALK == 1:
            n_t = NUM_T
        else:
            # Tiles within one or two query clusters: the tiles either skips a non-empty key cluster in (what the
            # host list holds); tiles over three or more: every tile (rare; exact either way).
            live, n_live = _live_bits(bias0, bias1, s_bk, lnb_head, CK, BLOCK_N, NT_P2, WORD, SKIP_BIAS)
            every = (tl.full([], 1, tl.int64) << NUM_T) - 1
            bits = tl.where(n_other == 0, live, every)
            n_t = tl.where(n_other == 0, n_live, NUM_T)
        kv_row0 = (bh * CK).to(tl.int32)  # first table row of the head (a TMA coordinate: int32)
        KC = KC + bh64 * CK * BLOCK_D
        VM = VM + bh64 * CK * BLOCK_D
        if n_other == 0:  # one or two query clusters (c0 == c1: both rows the same): two vector loads a tile
            m_i, l_i, acc = _walk(q, first, bias_rows, bias0, bias1, s_bk, lnb_head, KC, VM, desc_kc, desc_vm, lst,
                                  n_t, bits, kv_row0, CK, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, False, STAGES,
                                  USE_TMA, IEEE, SKIP_BIAS, WALK, MASK_N, WORD)
        else:
            m_i, l_i, acc = _walk(q, first, bias_rows, bias0, bias1, s_bk, lnb_head, KC, VM, desc_kc, desc_vm, lst,
                                  n_t, bits, kv_row0, CK, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, True, 1, USE_TMA,
                                  IEEE, SKIP_BIAS, WALK, MASK_N, 1)

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
        """The kernel autotuned over :func:`sorted_autotune_configs` (key: head dim, table rows per head, tiles,
        bias source and walk mode: each mode is tuned on its own)."""
        configs = [triton.Config({"USE_TMA": tma, "STAGES": st}, num_warps=w, num_stages=st)
                   for tma, w, st in sorted_autotune_configs(allow_tma, head_dim)]
        return triton.autotune(configs=configs, key=["HEAD_DIM", "CK", "BLOCK_M", "BLOCK_N", "SKIP_BIAS", "WALK",
                                                     "MERGE"])(_sorted_kernel)


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
    """The tables of ``bias="table"``: centroids and value means (B, H, CK_PAD, BLOCK_D) in ``dtype`` (zero
    padding), and the bias table (B, H, Cq, CK_PAD) fp32 in raw-score units: ``ln(n_j) / scale`` where query
    cluster i skips non-empty key cluster j, else -inf (kept, empty, padding). CK_PAD: Ck rounded up to 128;
    BLOCK_D: the head dim rounded up to a power of two >= 16. About 49 MB of bias at Wan 14B (300, 1000)."""
    ck = centroids.shape[-2]
    ck_pad = _ck_pad(ck)
    kc, vm = _padded_centroids(centroids, value_means, dtype)
    lnb = torch.log(sizes.float()) * (1.0 / float(scale))  # log 0 = -inf: empty clusters weigh 0
    bias = torch.where(skipped, lnb[:, :, None, :], float("-inf"))
    bias = torch.nn.functional.pad(bias, (0, ck_pad - ck), value=float("-inf")).contiguous()
    return kc, vm, bias


def skip_tables(centroids: torch.Tensor, value_means: torch.Tensor, sizes: torch.Tensor, scale: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tables of ``bias="skip"`` (the kernel builds each tile's bias from the caller's ``skipped``, read in
    place, and the vector returned here): centroids and value means (B, H, Ck, BLOCK_D) in ``dtype``, Ck *not*
    padded (the kernel masks the partial last tile, or reads past it with weight exactly 0), the head dim padded
    with zeros only when it is not already BLOCK_D; and ``ln(n_j) / scale`` (B, H, CK_PAD) fp32 (-inf: empty
    clusters and the padding), the values of :func:`sorted_tables`' bias bit for bit. CK_PAD (Ck rounded up to
    128) keeps every head's vector 16-byte aligned, which an sm_90a compile needs to load it asynchronously
    (a per-head stride of 1000 floats is not known to be). At Wan 14B (300, 1000), D = 128: two casts (10 + 10 MB
    of bf16) and three small ops (160 KB) instead of the 49 MB (Cq, CK_PAD) fp32 table."""
    d = centroids.shape[-1]
    bd = _block_d(d)
    if bd == d:
        kc, vm = centroids.to(dtype).contiguous(), value_means.to(dtype).contiguous()  # no copy when already so
    else:
        kc, vm = (_pad_rows(x.to(dtype), x.shape[-2], bd) for x in (centroids, value_means))
    ck = sizes.shape[-1]
    ck_pad = _ck_pad(ck)
    lnb = torch.full((*sizes.shape[:-1], ck_pad), float("-inf"), device=sizes.device)
    # log of an integer tensor is computed in the default float dtype (one launch instead of a cast and a log).
    direct = not sizes.is_floating_point() and torch.get_default_dtype() == torch.float32
    torch.log(sizes if direct else sizes.float(), out=lnb[..., :ck])  # log 0 = -inf: empty clusters weigh 0
    lnb[..., :ck].mul_(1.0 / float(scale))
    return kc, vm, lnb


def tile_liveness(skipped: torch.Tensor, sizes: torch.Tensor, block_n: int) -> torch.Tensor:
    """(B * H, Cq, cdiv(Ck, block_n)) bool: query cluster i skips a non-empty key cluster in centroid tile t."""
    b, h, cq, ck = skipped.shape
    nt = -(-ck // block_n)
    live = skipped & (sizes > 0)[:, :, None, :]
    if nt * block_n > ck:
        live = torch.nn.functional.pad(live, (0, nt * block_n - ck))
    return live.reshape(b * h, cq, nt, block_n).any(-1)


def _walk_lists(lab: torch.Tensor, live: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile of ``lab`` ((N, Sq) labels in walk order): the centroid tiles some query cluster of its label
    range ``[min, max]`` needs (``live`` (N, Cq, T)), first and ascending, then the others; and how many."""
    n, s = lab.shape
    cq, nt = live.shape[-2:]
    nm = -(-s // block_m)
    if nm * block_m > s:  # the last tile's missing rows repeat its last label (no new cluster)
        lab = torch.cat([lab, lab[:, -1:].expand(n, nm * block_m - s)], 1)
    lab = lab.view(n, nm, block_m)
    c0, c1 = lab.amin(-1), lab.amax(-1)
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
    return lst.reshape(n * nm, nt).contiguous(), count.reshape(n * nm).contiguous()


def walk_tables(q_labels: torch.Tensor, q_perm: torch.Tensor, bias: torch.Tensor, block_m: int,
                block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query labels in walk order, and the centroid tiles each query tile walks (listed first, ascending)
    with how many (``bias="table"``, ``walk="list"``).

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
    n, nt = b * h, ck_pad // block_n
    lab = torch.gather(q_labels, 2, q_perm.long()).reshape(n, s)
    live = torch.isfinite(bias).view(n, cq, nt, block_n).any(-1)  # (n, cq, nt)
    return (lab.to(torch.int32), *_walk_lists(lab, live, block_m))


def walk_tables_skip(q_labels: torch.Tensor, q_perm: torch.Tensor, skipped: torch.Tensor, sizes: torch.Tensor,
                     block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`walk_tables` from ``skipped`` and the cluster sizes (``bias="skip"``, ``walk="list"``): the same
    lists over T = cdiv(Ck, block_n) tiles (the unpadded tables), labels (B, H, Sq) in ``q_labels``' dtype."""
    b, h, s = q_labels.shape
    lab = torch.gather(q_labels, 2, q_perm.long())
    return (lab, *_walk_lists(lab.view(b * h, s), tile_liveness(skipped, sizes, block_n), block_m))


def _skip_words(skipped: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``skipped`` (bool) viewed, without a copy, as the widest integers up to 4 bytes whose words tile every row
    (contiguous rows, Ck, the row strides and the offset multiples of the width), and that width; else as bytes
    (width 1). 4 bytes, not 8: each thread extracts 16 columns of a tile from their words in the loop, and int64
    words cost more registers for it (sm_90a compile, Triton 3.8, 4 warps: 272-320 bytes of spills vs 244-280)."""
    if skipped.dtype != torch.bool:
        return skipped, 1
    for width, dtype in ((4, torch.int32), (2, torch.int16)):
        if (skipped.stride(-1) == 1 and skipped.shape[-1] % width == 0
                and all(st % width == 0 for st in skipped.stride()[:-1]) and skipped.data_ptr() % width == 0):
            return skipped.view(dtype), width
    return skipped.view(torch.uint8), 1


def _row_align(row_stride: int) -> int:
    """The largest power of two up to 16 dividing a skip row's stride (in elements): what the kernel may assume of
    every row's offset (Triton only learns "divisible by 16" from an argument). Measured on an sm_90a compile
    (Triton 3.8, 4 warps, Ck = 1000 bytes a row, unknown to be 8-aligned): the rare gather loop's byte gathers kept
    one 64-bit address per element, 1,164 bytes of spills; with the hint, 208 (the fp32 table: 356)."""
    return 16 if row_stride % 16 == 0 else row_stride & -row_stride


def _launch(q, kc, vm, bias, log_n, labs, q_perm, lst, count, out_in, lse_in, scale, tiles, use_tma, walk):
    b, h, s, d = q.shape
    cq = bias.shape[-2]
    ck = kc.shape[-2]  # table rows per head: CK_PAD (bias table) or Ck (skip bytes: unpadded)
    out = torch.empty((b, h, s, d), dtype=q.dtype if out_in is None else out_in.dtype, device=q.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    if s == 0 or b * h == 0:
        return out, lse
    block_m, block_n, num_warps, num_stages, tuned = tiles
    block_d = kc.shape[-1]
    merge = out_in is not None
    oi = out_in if merge else out  # placeholders: never read without MERGE
    li = lse_in if merge else lse
    skip = log_n is not None
    word = 1
    if skip:  # the caller's bytes, zero-copy, as the widest integers that tile its rows
        bias, word = _skip_words(bias)
    nm, nt = -(-s // block_m), -(-ck // block_n)
    if walk == _WALKS["bits"] and nt > _BITS_MAX_TILES:
        walk = _WALKS["all"]  # the bitmask is one int64: more tiles walk them all (the same numbers)
    allow_tma = (_tma_ok(q, block_d) and kc.data_ptr() % 16 == 0 and vm.data_ptr() % 16 == 0
                 if use_tma != 0 else False)
    if use_tma == 1 and not allow_tma:
        raise NotImplementedError("descriptor (TMA) loads are unavailable here (Triton >= 3.4, sm_90+ and rows of a "
                                  "multiple of 16 bytes needed); pass use_tma=None or False")
    kc2, vm2 = kc.view(b * h * ck, block_d), vm.view(b * h * ck, block_d)
    if allow_tma:
        desc_kc = TensorDescriptor.from_tensor(kc2, [block_n, block_d])
        desc_vm = TensorDescriptor.from_tensor(vm2, [block_n, block_d])
    else:  # placeholders: never read without USE_TMA
        desc_kc, desc_vm = kc2, vm2
    lnb = log_n if skip else bias  # placeholders: never read without SKIP_BIAS / the list walk
    lst = labs if lst is None else lst
    count = labs if count is None else count
    args = (
        q, kc2, vm2, desc_kc, desc_vm, bias, lnb, labs, q_perm, lst, count, oi, li, out, lse,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        q_perm.stride(0), q_perm.stride(1), q_perm.stride(2),
        oi.stride(0), oi.stride(1), oi.stride(2), oi.stride(3),
        li.stride(0), li.stride(1), li.stride(2),
        bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3), lnb.shape[-1],
        h, s, cq, ck, nm, nt,
    )
    flags = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MERGE=merge,
                 IEEE=q.dtype == torch.float32, SKIP_BIAS=skip, WALK=walk, MASK_N=ck % block_n != 0,
                 NT_P2=triton.next_power_of_2(nt) if walk == _WALKS["bits"] else 1, WORD=word,
                 ROW_ALIGN=_row_align(bias.stride(2)))
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
    log_n: torch.Tensor | None,
    walk_labels: torch.Tensor,
    q_perm: torch.Tensor,
    walk_list: torch.Tensor | None,
    walk_count: torch.Tensor | None,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float,
    tiles: list[int],
    use_tma: int,
    walk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared tensors in (see :func:`compensation_attention_sorted`), ``(out, lse)`` out. ``bias``: the fp32 bias
    table (``log_n`` None) or the bool skip table (B, H, Cq, Ck) with ``log_n`` = ln(n_j) / scale (B, H, Ck).
    ``walk``: 0 the list (``walk_list`` / ``walk_count``), 1 every tile, 2 the in-kernel bitmask (lists None).
    ``tiles``: block_m, block_n, warps, stages, autotuned (1: warps, stages and loads tuned). ``use_tma``: -1
    descriptors where available, 0 pointer loads, 1 descriptors (an error where unavailable)."""
    return _launch(q, centroids, value_means, bias, log_n, walk_labels, q_perm, walk_list, walk_count, out, lse,
                   scale, tiles, None if use_tma < 0 else use_tma, walk)


@_sorted_op.register_fake
def _(q, centroids, value_means, bias, log_n, walk_labels, q_perm, walk_list, walk_count, out, lse, scale, tiles,
      use_tma, walk):
    dtype = q.dtype if out is None else out.dtype
    return q.new_empty(q.shape, dtype=dtype), q.new_empty(tuple(q.shape[:3]), dtype=torch.float32)


SORTED_BIAS = ("table", "skip")
SORTED_WALKS = tuple(_WALKS)
# The (bias, walk) mode of calls that name none (the registry entry, so ``auto``). Every mode gives the same numbers
# bit for bit; they differ in host work (Wan 14B (300, 1000), fake-tensor count: 41 aten ops and 308 MB written for
# table list -> 12 for table all / bits, 7 for skip all / bits) and in the loop ("all" walks ~3.5% more centroid
# tiles at density 0.25, "bits" adds a prologue, the skip-byte bias lengthens the loop: sm_90a SASS, Triton 3.6,
# 4 warps, one tile: table list 761 instructions, table all 745, table bits 766, skip all 929, skip bits 1006).
# "table all" is the default because it was the fastest compensation pass measured on the H200 (Wan 14B 720p,
# (300, 1000), density 0.25, experiments/bench_compensation.py): 4.72 ms against 5.56 for table list (its host
# tables 0.37 vs 1.44 ms), and no slower inside the compensated call (86.9 vs 87.1 ms; results/compensation).
DEFAULT_MODE: tuple[str, str] = ("table", "all")


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
    bias: str | None = None,
    walk: str | None = None,
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
        bias: where each tile's bias comes from (None: ``DEFAULT_MODE``'s). "table": the fp32 (B, H, Cq, CK_PAD)
            table of :func:`sorted_tables` (49 MB at Wan 14B (300, 1000)); "skip": built in the kernel from
            ``skipped``, read in place, and ln(n_j) / scale per key cluster (:func:`skip_tables`). The same values.
        walk: which centroid tiles a query tile visits (None: ``DEFAULT_MODE``'s). "list": those where one of its
            query clusters skips a non-empty key cluster, listed by host ops (:func:`walk_tables` /
            :func:`walk_tables_skip`: ~30 aten ops); "all": every tile, no list (a tile without a term is an
            exact no-op: about 3% more tiles at Wan 14B (300, 1000), density 0.25); "bits": the list's tiles from
            a bitmask the kernel builds in its prologue from the tile's two skip rows (no host ops; more than 62
            tiles, or tiles over three or more query clusters: every tile). Every (bias, walk) gives the same
            numbers bit for bit.
    """
    check_compensation_args(q, centroids, value_means, sizes, skipped, q_labels, out, lse)
    b, h, sq, d = q.shape
    if q_perm is not None and tuple(q_perm.shape) != (b, h, sq):
        raise ValueError(f"q_perm must be (batch, heads, seqlen_q) = {(b, h, sq)}, got {tuple(q_perm.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (the bias ln n / scale is in raw-score units), got {scale}")
    bias = DEFAULT_MODE[0] if bias is None else bias
    walk = DEFAULT_MODE[1] if walk is None else walk
    if bias not in SORTED_BIAS or walk not in SORTED_WALKS:
        raise ValueError(f"bias must be one of {SORTED_BIAS} and walk one of {SORTED_WALKS}, got bias={bias!r}, "
                         f"walk={walk!r}")
    if skipped.dtype != torch.bool:
        raise TypeError(f"skipped must be a bool tensor, got {skipped.dtype}")
    tuned = tiles is None and use_tma is None and q.device.type == "cuda" and not interpreting()
    tiles = tiles or default_sorted_tiles(d, q.device.type)
    if q_perm is None:
        q_perm = torch.sort(q_labels, dim=-1, stable=True).indices
    lst = count = log_n = None
    if bias == "table":
        kc, vm, tab = sorted_tables(centroids, value_means, sizes, skipped, scale, q.dtype)
        if walk == "list":
            labs, lst, count = walk_tables(q_labels, q_perm, tab, tiles.block_m, tiles.block_n)
        else:
            labs = torch.gather(q_labels, 2, q_perm.long())
    else:
        kc, vm, log_n = skip_tables(centroids, value_means, sizes, scale, q.dtype)
        tab = skipped
        if walk == "list":
            labs, lst, count = walk_tables_skip(q_labels, q_perm, skipped, sizes, tiles.block_m, tiles.block_n)
        else:  # the labels in walk order: the one host op a walk needs (the kernel reads them beside q_perm)
            labs = torch.gather(q_labels, 2, q_perm.long())
    return _sorted_op(q, kc, vm, tab, log_n, labs, q_perm, lst, count, out,
                      None if lse is None else lse.float(), float(scale),
                      [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages, int(tuned)],
                      -1 if use_tma is None else int(use_tma), _WALKS[walk])


# ----------------------------------------------------------------------------------------------- registry


class TritonSortedCompensation(TritonCompensation):
    """The cluster-order kernel above (one launch, merge in the epilogue, only the needed centroid tiles) in
    ``DEFAULT_MODE``; it supports and refuses what ``triton`` does."""

    name = "triton_sorted"
    priority = 110  # H200, (300, 1000) clusters at Wan 14B 720p: 5.52 ms vs triton's 5.84 ms (results/compensation)

    def run(self, q, centroids, value_means, sizes, skipped, q_labels, scale, out=None, lse=None, q_perm=None):
        return compensation_attention_sorted(q, centroids, value_means, sizes, skipped, q_labels, scale, out, lse,
                                             q_perm=q_perm)


register_compensation_variant(TritonSortedCompensation())
