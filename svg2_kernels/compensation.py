"""Fused compensation of skipped key clusters: centroid attention merged with the sparse kernel's result.

For every query row x (query cluster ``i = label[x]``) the skipped, non-empty key clusters ``j`` are pseudo-keys
with logit ``q_x . c_j * scale + log n_j`` and value ``v̄_j`` (their mean value). One kernel computes the
softmax over those pseudo-keys *and* merges it with the sparse attention's normalised output and LSE
(``svg2.compensation`` has the formula and the torch reference):

    out = (w_a * out_a + Σ_j e^{s_j - M} v̄_j) / (w_a + Σ_j e^{s_j - M}),  w_a = e^{lse_a - M}
    lse = M + log(w_a + Σ_j e^{s_j - M})

Design (notes/kernels.md, "Compensation kernel"):

* **Grid** ``(cdiv(Sq, BLOCK_M), B * H)``: one program per tile of ``BLOCK_M`` query rows of one head. It
  loads its Q tile once, then walks *all* ``Ck`` centroids in tiles of ``BLOCK_N`` (they and the value means
  are tiny, (Ck, D) per head, and stay in L2 for every program of the head) with an online softmax in base 2:
  ``S = Q C^T`` (``tl.dot``, fp32 accumulation), bias, running max / sum, ``acc += P V̄`` (``tl.dot``).
* **Bias.** Not a (Cq, Ck) float table: a uint8 *skip* table (the caller's bool ``skipped`` viewed as
  uint8, 1 byte per (query cluster, key cluster): a quarter of an fp32 table's traffic) and one fp32 vector
  ``log2 n_j`` per head (``-inf`` for empty clusters, so "empty" needs no second test). Each row gathers the
  ``BLOCK_N`` bytes of its cluster's skip row: ``bias = skip[label, j] ? log2 n_j : -inf``. A row's bytes are
  contiguous (one or two 32-byte sectors per row per tile) and the table (Cq x Ck bytes, 300 KB per head at
  (300, 1000)) is L2-resident, so the gather costs about a quarter of the centroid tile's own traffic.
* **Row order.** Rows are read in token order (the order ``svg2_attention`` holds Q, the sparse output and
  its LSE: every load and store a contiguous (BLOCK_M, D) block) or, with ``q_perm``, in cluster order
  through the permutation (each row still a contiguous D-vector; tiles then lie in one or two query clusters,
  so the skip rows they gather are one or two, L1-resident). Both orders do the same FLOPs; the second only
  makes the skip gather cheaper, which is not the bottleneck (see the notes), so token order is the default.
* **Epilogue.** Reads the sparse ``out`` / ``lse`` rows, merges in registers, writes the merged output (in
  ``out``'s dtype) and LSE (fp32, natural log): no separate merge pass. Without ``out`` / ``lse`` it writes the
  centroid attention alone (rows that skip nothing: out 0, lse -inf).

Every number here is fp32 except the ``tl.dot`` inputs (Q's dtype: bf16/fp16, or fp32 with IEEE precision).
The launch is a ``torch.library.custom_op`` (with a fake implementation for ``torch.compile``) that allocates
its outputs and syncs nothing with the host: it is CUDA-graph capturable.

:func:`segment_means_triton` is the companion reduction: the mean of every contiguous cluster of a
cluster-sorted (B, H, S, D) tensor (the key centroids and value means the compensation needs), one program per
(head, cluster), no atomics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from svg2_kernels._triton import HAS_TRITON, TRITON_MISSING, interpreting, tl, triton
from svg2_kernels.registry import CompensationInputs, CompensationVariant, register_compensation_variant

__all__ = [
    "CompensationTiles",
    "default_compensation_tiles",
    "autotune_configs",
    "compensation_attention",
    "prepare_tables",
    "last_tuned_config",
    "segment_means_triton",
    "TritonCompensation",
]

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class CompensationTiles:
    """Launch parameters of the compensation kernel.

    block_m: query rows per program; block_n: centroids per inner tile (both powers of two >= 16, tl.dot;
    block_n <= 128, the padding of the centroid tables); num_warps, num_stages: Triton launch options (stages
    software-pipeline the centroid / value-mean / skip loads of the inner loop).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"CompensationTiles.{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.block_n > _CK_ALIGN:
            raise ValueError(f"CompensationTiles.block_n must be <= {_CK_ALIGN}, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"CompensationTiles: num_warps {self.num_warps} must be a power of two <= 16 and "
                             f"num_stages {self.num_stages} >= 1")


# Centroid tables are padded to a multiple of this many key clusters (padding: zero centroids / means, skip 0,
# log2 n = -inf, so it weighs exactly 0): every inner tile is then whole, with no column masks, and every skip
# row starts 16-byte aligned (vector loads of the gathered bytes). The largest block_n must divide it.
_CK_ALIGN = 128


def default_compensation_tiles(head_dim: int, device_type: str) -> CompensationTiles | None:
    """Fixed tiles where no autotuning should run, else None (autotune over :func:`autotune_configs`).

    Under the interpreter (or off CUDA): 16 x 16 (the interpreter's cost is per element, not per op)."""
    if device_type != "cuda" or interpreting():
        return CompensationTiles(16, 16, 4, 1)
    return None


def autotune_configs(head_dim: int) -> list[CompensationTiles]:
    """The pruned autotuning list on CUDA, keyed per (head dim, padded Ck).

    FlashAttention-forward-shaped tiles for Hopper: 128 query rows x 64 or 128 centroids with 8 warps (a 128 x
    64 fp32 score tile is 32 registers a thread, next to the 128 x D fp32 accumulator: 64 registers at D=128),
    2 or 3 pipeline stages; one 64-row tile with 4 warps for small grids. Head dims above 128 keep BLOCK_M 64
    (a 128 x 256 fp32 accumulator would be 128 registers a thread and spill)."""
    if head_dim > 128:
        return [CompensationTiles(64, 64, 4, 2), CompensationTiles(64, 64, 8, 2), CompensationTiles(64, 32, 4, 3)]
    warps = 8 if head_dim > 64 else 4
    return [CompensationTiles(128, 64, warps, 2), CompensationTiles(128, 64, warps, 3),
            CompensationTiles(128, 128, 8, 2), CompensationTiles(64, 64, 4, 3)]


# ------------------------------------------------------------------------------------------------ kernels

if HAS_TRITON:

    @triton.jit
    def _compensation_kernel(
        Q, KC, VM, SKIP, LOG2N, LAB, PERM, O_IN, L_IN, OUT, LSE,
        qk_scale,
        s_qb, s_qh, s_qs, s_qd,
        s_lb, s_lh, s_ls,
        s_pb, s_ph, s_ps,
        s_ob, s_oh, s_os, s_od,
        s_eb, s_eh, s_es,
        H, S, CQ, CK_PAD,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PERMUTED: tl.constexpr, MERGE: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        bh64 = bh.to(tl.int64)  # (B*H*Ck*D) and (B*H*S*D) offsets may pass 2^31
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs < S
        if PERMUTED:  # cluster order: the tile's rows are perm[offs] (token positions)
            rows = tl.load(PERM + b * s_pb + h * s_ph + offs * s_ps, mask=row_ok, other=0).to(tl.int64)
        else:
            rows = offs.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        # Rows past S read label 0: a valid skip row, so the gather in the loop needs no mask (never stored).
        lab = tl.load(LAB + b * s_lb + h * s_lh + rows * s_ls, mask=row_ok, other=0).to(tl.int64)
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + d[None, :] * s_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # Per head: centroids / value means (CK_PAD, BLOCK_D) and log2 n (CK_PAD,) contiguous, skip (CQ, CK_PAD)
        # bytes; all padded (host side) so the loop below loads whole tiles without masks.
        kc_base = KC + bh64 * CK_PAD * BLOCK_D
        vm_base = VM + bh64 * CK_PAD * BLOCK_D
        logn_base = LOG2N + bh64 * CK_PAD
        skip_rows = SKIP + bh64 * CQ * CK_PAD + lab[:, None] * CK_PAD  # (BLOCK_M, 1) row starts
        n_off = tl.arange(0, BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, CK_PAD, BLOCK_N):
            cols = n0 + n_off
            kc = tl.load(kc_base + cols[None, :] * BLOCK_D + d[:, None])  # (BLOCK_D, BLOCK_N): C^T
            if IEEE:
                s = tl.dot(q, kc, input_precision="ieee")
            else:
                s = tl.dot(q, kc)
            log2n = tl.load(logn_base + cols)
            skip = tl.load(skip_rows + cols[None, :])  # (BLOCK_M, BLOCK_N) bytes, gathered by label
            # Base-2 logits: q.c*scale*log2(e) + log2(n_j) where the row's cluster skips j, else -inf
            # (selected, empty and padding columns all weigh exactly 0).
            s = tl.where(skip != 0, s * qk_scale + log2n[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no -inf - -inf
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vm = tl.load(vm_base + cols[:, None] * BLOCK_D + d[None, :])  # (BLOCK_N, BLOCK_D)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vm.dtype), vm, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vm.dtype), vm)
            m_i = m_new

        st_ok = row_ok[:, None] & d_ok[None, :]
        if MERGE:
            lse_a = tl.load(L_IN + b * s_eb + h * s_eh + rows * s_es, mask=row_ok, other=float("-inf"))
            lse_a = lse_a * 1.4426950408889634
            out_a = tl.load(O_IN + b * s_ob + h * s_oh + rows[:, None] * s_os + d[None, :] * s_od, mask=st_ok,
                            other=0.0).to(tl.float32)
            # Reference point M = max(lse_a, m_i): then w_a, w_b <= 1 and, as l_i >= 1 wherever m_i is finite,
            # denom >= 1 for every row with any key (no overflow, no underflow to 0).
            mx = tl.maximum(lse_a, m_i)
            mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
            w_a = tl.exp2(lse_a - mx_safe)
            w_b = tl.exp2(m_i - mx_safe)
            denom = w_a + w_b * l_i
            # An empty sparse set (lse_a = -inf) weighs 0 whatever its output holds; both empty: out 0, lse -inf.
            num = tl.where(w_a[:, None] > 0, out_a * w_a[:, None], 0.0) + acc * w_b[:, None]
            den_safe = tl.where(denom > 0, denom, 1.0)
            out = num / den_safe[:, None]
            lse = tl.where(denom > 0, (mx_safe + tl.log2(den_safe)) * 0.6931471805599453, float("-inf"))
        else:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            out = acc / l_safe[:, None]
            lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(OUT + bh64 * S * HEAD_DIM + rows[:, None] * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=st_ok)
        tl.store(LSE + bh64 * S + rows, lse, mask=row_ok)

    @triton.jit
    def _segment_mean_kernel(
        X, OFF, OUT,
        s_xb, s_xh, s_xs, s_xd,
        H, C,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        c = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start = tl.load(OFF + bh.to(tl.int64) * (C + 1) + c)
        end = tl.load(OFF + bh.to(tl.int64) * (C + 1) + c + 1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        base = X + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for r0 in range(start, end, BLOCK_R):  # a cluster's rows are contiguous: coalesced (BLOCK_R, D) blocks
            r = r0 + tl.arange(0, BLOCK_R)
            x = tl.load(base + r.to(tl.int64)[:, None] * s_xs + d[None, :] * s_xd,
                        mask=(r < end)[:, None] & d_ok[None, :], other=0.0)
            acc += x.to(tl.float32)
        cnt = tl.maximum(end - start, 1).to(tl.float32)
        tl.store(OUT + (bh.to(tl.int64) * C + c) * HEAD_DIM + d, tl.sum(acc, 0) / cnt, mask=d_ok)

    @functools.cache
    def _tuned_kernel(head_dim: int):
        """The kernel autotuned over :func:`autotune_configs` (key: head dim and padded Ck). Safe to re-run
        while tuning: the kernel only writes its outputs, never accumulates into them."""
        configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                                 num_stages=t.num_stages) for t in autotune_configs(head_dim)]
        return triton.autotune(configs=configs, key=["HEAD_DIM", "CK_PAD"])(_compensation_kernel)


def last_tuned_config(head_dim: int) -> str | None:
    """The configuration the autotuner picked for ``head_dim`` (the last tuned key), for benchmark records."""
    if not HAS_TRITON or _tuned_kernel.cache_info().currsize == 0:
        return None
    cfg = getattr(_tuned_kernel(head_dim), "best_config", None)
    return None if cfg is None else str(cfg)


def _pad_rows(x: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dims of x up to (rows, cols) with ``value`` (a fresh contiguous tensor)."""
    return torch.nn.functional.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]), value=value).contiguous()


def _ck_pad(ck: int) -> int:
    """CK_PAD: the key-cluster count rounded up to a multiple of 128 (``_CK_ALIGN``)."""
    return -(-ck // _CK_ALIGN) * _CK_ALIGN


def _block_d(d: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two >= 16."""
    return max(16, 1 << (d - 1).bit_length())


def _padded_centroids(centroids: torch.Tensor, value_means: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids and value means (B, H, CK_PAD, BLOCK_D) in ``dtype``, zero padding (fresh, contiguous): the
    centroid tables of :func:`prepare_tables` and of the sorted kernel's ``bias="table"``."""
    ck, d = centroids.shape[-2:]
    ck_pad, bd = _ck_pad(ck), _block_d(d)
    return _pad_rows(centroids.to(dtype), ck_pad, bd), _pad_rows(value_means.to(dtype), ck_pad, bd)


def _launch(q, kc, vm, skip, log2n, q_labels, q_perm, out_in, lse_in, scale, tiles):
    """kc / vm (B, H, CK_PAD, BLOCK_D), skip (B, H, Cq, CK_PAD) uint8, log2n (B, H, CK_PAD): padded, contiguous."""
    b, h, s, d = q.shape
    cq, ck_pad = skip.shape[-2:]
    out = torch.empty((b, h, s, d), dtype=q.dtype if out_in is None else out_in.dtype, device=q.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    if s == 0 or b * h == 0:
        return out, lse
    merge = out_in is not None
    oi = out_in if merge else out  # placeholders: never read without MERGE / PERMUTED
    li = lse_in if merge else lse
    pm = q_perm if q_perm is not None else q_labels
    args = (
        q, kc, vm, skip, log2n, q_labels, pm, oi, li, out, lse,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        q_labels.stride(0), q_labels.stride(1), q_labels.stride(2),
        pm.stride(0), pm.stride(1), pm.stride(2),
        oi.stride(0), oi.stride(1), oi.stride(2), oi.stride(3),
        li.stride(0), li.stride(1), li.stride(2),
        h, s, cq, ck_pad,
    )
    flags = dict(HEAD_DIM=d, BLOCK_D=kc.shape[-1], PERMUTED=q_perm is not None, MERGE=merge,
                 IEEE=q.dtype == torch.float32)
    if tiles is None:
        _tuned_kernel(d)[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h)](*args, **flags)
    else:
        _compensation_kernel[(triton.cdiv(s, tiles.block_m), b * h)](
            *args, **flags, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)
    return out, lse


@torch.library.custom_op("svg2_kernels::compensation_attention", mutates_args=())
def _compensation_op(
    q: torch.Tensor,
    centroids: torch.Tensor,
    value_means: torch.Tensor,
    skip: torch.Tensor,
    log2n: torch.Tensor,
    q_labels: torch.Tensor,
    q_perm: torch.Tensor | None,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float,
    tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared (padded) tensors in (see :func:`compensation_attention`), ``(out, lse)`` out; ``tiles`` empty:
    autotuned."""
    return _launch(q, centroids, value_means, skip, log2n, q_labels, q_perm, out, lse, scale,
                   CompensationTiles(*tiles) if tiles else None)


@_compensation_op.register_fake
def _(q, centroids, value_means, skip, log2n, q_labels, q_perm, out, lse, scale, tiles):
    dtype = q.dtype if out is None else out.dtype
    return q.new_empty(q.shape, dtype=dtype), q.new_empty(tuple(q.shape[:3]), dtype=torch.float32)


def prepare_tables(centroids: torch.Tensor, value_means: torch.Tensor, sizes: torch.Tensor, skipped: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's padded per-head tables: centroids and value means (B, H, CK_PAD, BLOCK_D) in ``dtype``,
    skip (B, H, Cq, CK_PAD) uint8 and log2 n (B, H, CK_PAD) fp32 (-inf: empty or padding). CK_PAD is Ck rounded
    up to 128, BLOCK_D the head dim rounded up to a power of two >= 16. A few MB at Wan 14B: a copy each."""
    ck = centroids.shape[-2]
    ck_pad = _ck_pad(ck)
    kc, vm = _padded_centroids(centroids, value_means, dtype)
    log2n = torch.nn.functional.pad(torch.log2(sizes.float()), (0, ck_pad - ck), value=float("-inf")).contiguous()
    skip = torch.nn.functional.pad(skipped.view(torch.uint8), (0, ck_pad - ck)).contiguous()
    return kc, vm, skip, log2n


def check_compensation_args(q: torch.Tensor, centroids: torch.Tensor, value_means: torch.Tensor,
                            sizes: torch.Tensor, skipped: torch.Tensor, q_labels: torch.Tensor,
                            out: torch.Tensor | None, lse: torch.Tensor | None) -> None:
    """The shape contract every compensation kernel shares (see :func:`compensation_attention`)."""
    if (out is None) != (lse is None):
        raise ValueError("pass both the sparse out and its lse (to merge) or neither")
    b, h, sq, d = q.shape
    ck = sizes.shape[-1]
    if (tuple(centroids.shape) != (b, h, ck, d) or tuple(value_means.shape) != (b, h, ck, d)
            or skipped.dim() != 4 or tuple(skipped.shape[:2]) != (b, h) or skipped.shape[-1] != ck
            or tuple(q_labels.shape) != (b, h, sq)):
        raise ValueError(f"centroids {tuple(centroids.shape)} / value means {tuple(value_means.shape)} / skipped "
                         f"{tuple(skipped.shape)} / q_labels {tuple(q_labels.shape)} do not match q "
                         f"{tuple(q.shape)} and sizes {tuple(sizes.shape)}")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != (b, h, sq)):
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} must match q {tuple(q.shape)}")


def compensation_attention(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid attention over the skipped key clusters, merged with a sparse result when one is given.

    Args:
        q: (B, H, Sq, D) queries in token order (any strides), fp16 / bf16 / fp32.
        centroids, value_means: (B, H, Ck, D) key-cluster centroids and mean values (any float dtype; cast to
            q's dtype for ``tl.dot``: Ck x D per head, negligible).
        sizes: (B, H, Ck) int keys per cluster (0: empty, weighs nothing).
        skipped: (B, H, Cq, Ck) bool: query cluster i does not compute key cluster j exactly.
        q_labels: (B, H, Sq) int: query cluster of every row.
        scale: softmax scale.
        out, lse: the sparse attention's (B, H, Sq, D) output and (B, H, Sq) fp32 natural-log LSE (-inf: no
            key) in the same row order as q; given, the result is the merge (the compensated attention).
        q_perm: (B, H, Sq) optional row order of the walk (cluster order, ``layout.q_perm``); results are
            always written in token order. Same numbers either way.
        tiles: launch parameters; None: :func:`default_compensation_tiles` (autotuned on CUDA).
    Returns:
        out (B, H, Sq, D) in ``out``'s dtype (q's without it) and lse (B, H, Sq) fp32, natural log. Without
        ``out``: rows that skip nothing get out 0 and lse -inf. With it: rows that skip nothing get ``out``
        (exactly, up to the cast) and rows with neither set get 0 and -inf.
    """
    check_compensation_args(q, centroids, value_means, sizes, skipped, q_labels, out, lse)
    d = q.shape[-1]
    tiles = tiles or default_compensation_tiles(d, q.device.type)
    kc, vm, skip, log2n = prepare_tables(centroids, value_means, sizes, skipped, q.dtype)
    tile_list = [] if tiles is None else [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages]
    return _compensation_op(q, kc, vm, skip, log2n, q_labels, q_perm, out,
                            None if lse is None else lse.float(), float(scale), tile_list)


def segment_means_triton(x_sorted: torch.Tensor, sizes: torch.Tensor, block_r: int | None = None) -> torch.Tensor:
    """Mean of every contiguous cluster of rows (svg2.compensation.segment_means), one program per
    (batch x head, cluster): each reads its rows as coalesced (BLOCK_R, D) blocks, sums in fp32, no atomics.

    Args:
        x_sorted: (B, H, S, D) rows in cluster order (any strides); rows past the last cluster are ignored.
        sizes: (B, H, C) int rows per cluster.
    Returns:
        (B, H, C, D) float32; empty clusters get zeros.
    """
    b, h, s, d = x_sorted.shape
    c = sizes.shape[-1]
    out = torch.empty((b, h, c, d), dtype=torch.float32, device=x_sorted.device)
    if b * h * c == 0:
        return out
    offsets = torch.nn.functional.pad(torch.cumsum(sizes.reshape(b * h, c), -1), (1, 0)).to(torch.int32)
    block_r = block_r or (16 if interpreting() else 32)
    _segment_mean_kernel[(c, b * h)](
        x_sorted, offsets, out,
        x_sorted.stride(0), x_sorted.stride(1), x_sorted.stride(2), x_sorted.stride(3),
        h, c,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=block_r, num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------- registry


class TritonCompensation(CompensationVariant):
    """The fused kernel above: centroid attention and the LSE merge in one launch."""

    name = "triton"
    priority = 100
    # CPU only under Triton's interpreter (tests); on the CPU otherwise the torch backend is the right one.
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    fuses_merge = True

    def not_supported_reasons(self, inputs: CompensationInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if not HAS_TRITON:
            reasons.append(TRITON_MISSING)
        if inputs.head_dim > 256:
            reasons.append(f"head dim {inputs.head_dim} > 256 (the (BLOCK_M, D) fp32 accumulator lives in registers)")
        if inputs.head_dim < 1:
            reasons.append("head dim must be >= 1")
        return reasons

    def run(self, q, centroids, value_means, sizes, skipped, q_labels, scale, out=None, lse=None, q_perm=None):
        return compensation_attention(q, centroids, value_means, sizes, skipped, q_labels, scale, out, lse,
                                      q_perm=q_perm)


register_compensation_variant(TritonCompensation())

# The cluster-order variant ``triton_sorted`` shares this module's tables and tiles; importing it here registers
# it wherever the registry loads this module.
from svg2_kernels import compensation_sorted as _compensation_sorted  # noqa: E402,F401
