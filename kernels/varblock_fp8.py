"""8-bit variable-block sparse attention (opt-in variants ``triton_int8_fp8`` and ``triton_fp8``) on Hopper.

Same contract and the same TMA-box key layout as :mod:`svg2_kernels.varblock_tma` (v5), but QK^T runs on
INT8 (``qk="int8"``, as SageAttention2) or FP8 e4m3 (``qk="fp8"``) tensor cores and PV on FP8 e4m3 ones, both
twice the bf16 rate on H100/H200, accumulating in int32 / fp32. INT8 keeps 7 bits of each Q and K element
against e4m3's 3 mantissa bits: in a torch emulation on the benchmark's synthetic heads (S=4096) the QK error
alone was 1.2% (relative L2 of the output) in INT8 and 5.6% in FP8. What is quantized and how:

* **K**, per head and channel (to 127 or 448), after subtracting the per-head mean key. Subtracting one
  vector from every key shifts each query's scores by a constant, which the softmax ignores, so the
  centring is exact; it removes the channel offsets that dominate K's range (SageAttention's observation).
  The channel scales ``s_d`` are folded into Q (``q.k = sum_d (q_d s_d)(k_d / s_d)``): free in the loop.
* **Q**, per row (to 127 or 448), inside the kernel: each query tile is scaled by the K channel scales, then
  every row by its own absolute maximum. The row scale multiplies the softmax scale (one FMA per score).
* **P**, the softmax numerators in [0, 1], times 256 (exact), so that values down to ~3e-5 stay normal e4m3.
* **V**, per head and channel, stored transposed, (B*H*D, Sk) with the keys contiguous: FP8 ``wgmma`` reads
  its B operand K-major only, so P @ V needs V's rows along the reduction. The channel scale multiplies the
  output once, in the epilogue.

The running max, sum and accumulator stay fp32; each key tile's P @ V is accumulated in place by the MMA.
The quantization of K and V is one torch reduction pass plus one Triton
pass each (:func:`quantize_kv_fp8`); the query side is free.

Measured (H200, Triton 3.6, Wan 1.3B heads at density 0.25; results/kernels/probe_8bit_r23..r26.md): **slower
than the bf16 kernel**, 0.39-0.49x with PV in e4m3 (13.0-13.4 ms against 5.2 ms) and 0.92-0.94x with QK^T alone in 8
bits (``pv="bf16"``), at every tile config tried. At 128x64 tiles with 4 warps the 8-bit loop needs 255 registers and
spills; 8 warps remove the spills and are no faster. V^T by TMA at unaligned key offsets faults (illegal instruction),
so V is read as rows by default. Relative L2 error against fp32 on head 0: 3.8% (INT8 QK^T, FP8 PV), 5.3% (FP8 both),
1.2% (INT8 QK^T, bf16 PV), against 0.2% for the bf16 kernel. The variants stay opt-in for quality studies and for
Triton versions that lower 8-bit attention better.

Accuracy is that of e4m3 (3 mantissa bits): tests compare against a torch path that quantizes the same
operands the same way (:func:`svg2_kernels.reference.varblock_attention_fp8_reference`) and against fp32.
Under Triton's interpreter, whose fp32 -> e4m3 conversion drops the carry when rounding crosses a power of two
(7.94 -> 4.0), values are first rounded to the e4m3 grid in fp32 so that the cast is exact.
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

try:
    import triton
    import triton.language as tl
    from svg2_kernels.varblock_common import online_softmax_init, query_tile, store_output

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False

try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    _HAS_TMA = True
except ImportError:  # pragma: no cover - Triton < 3.4
    _HAS_TMA = False

__all__ = [
    "E4M3_MAX",
    "Fp8KeysValues",
    "QK_FORMATS",
    "quantize_kv_fp8",
    "fp8_refusal",
    "varblock_attention_fp8",
    "varblock_attention_fp8_with_metadata",
    "TritonFp8VarBlockAttention",
]

E4M3_MAX = 448.0
P_SCALE = 256.0  # softmax numerators are stored as p * 256 (exact): small ones stay normal numbers
_FP8 = getattr(torch, "float8_e4m3fn", None)
QK_FORMATS = ("int8", "fp8")


@dataclass(frozen=True)
class Fp8KeysValues:
    """Cluster-sorted K and V quantized for :func:`varblock_attention_fp8_with_metadata`.

    k8: (B*H*Sk, D) int8 or e4m3 (``qk``), ``(k - mean) / k_scale``; k_scale: (B*H, D) fp32.
    v8: e4m3 ``v / v_scale``, (B*H*Sk, D) rows, or with ``v_transposed`` (B*H*D, Sk_pad) with the keys
    contiguous (Sk_pad = Sk rounded up to 16, TMA's 16-byte row strides; pad columns zero); v_scale: (B*H, D).
    """

    k8: torch.Tensor
    k_scale: torch.Tensor
    v8: torch.Tensor
    v_scale: torch.Tensor
    shape: tuple[int, int, int, int]  # (B, H, Sk, D) of the K/V they came from
    qk: str = "int8"  # the format of k8 (and of Q inside the kernel)
    v_transposed: bool = False
    pv: str = "fp8"  # "bf16": v8 is V itself (16-bit, unscaled) and P @ V runs in 16 bits


def _refusals(device_type: str, head_dim: int, device: torch.device | None = None) -> list[str]:
    """What this install, head dim and GPU lack for the 8-bit kernel (shared by the call and the variant)."""
    reasons = []
    if not (_HAS_TRITON and _HAS_TMA):
        reasons.append("this Triton has no tensor descriptors (triton.tools.tensor_descriptor, Triton >= 3.4)")
    if _FP8 is None or (_HAS_TRITON and not hasattr(tl, "float8e4nv")):
        reasons.append("this torch or Triton has no float8 e4m3 type")
    if head_dim % 16 or head_dim > 128:
        reasons.append(f"head dim {head_dim} must be a multiple of 16 and at most 128 (8-bit TMA rows of 16-byte "
                       f"multiples)")
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 9:
        reasons.append("the 8-bit kernel uses TMA and 8-bit wgmma: it needs sm_90 (Hopper) or newer")
    return reasons


def fp8_refusal(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the 8-bit kernel cannot run these inputs (None when it can)."""
    reasons = _refusals(q.device.type, q.shape[-1], q.device)
    if q.device.type != "cuda" and not triton_interpreting():
        reasons.append("the 8-bit kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1)")
    return "; ".join(reasons) or None


# ----------------------------------------------------------------------------------------- quantize

if _HAS_TRITON:

    @triton.jit
    def to_e4m3(x, EMULATE_RNE: tl.constexpr):
        """fp32 -> e4m3 (round to nearest even, saturating at 448)."""
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if EMULATE_RNE:  # the interpreter's cast mis-rounds across powers of two: make the cast exact
            c = x * 1048577.0  # 2^20 + 1: a Veltkamp split keeps 4 significant bits (3 mantissa + 1)
            hi = c - (c - x)
            sub = tl.floor(x * 512.0 + 0.5) * (1.0 / 512.0)  # below 2^-6 e4m3 steps are 2^-9
            x = tl.where(tl.abs(x) < 0.015625, sub, hi)
        return x.to(tl.float8e4nv)

    @triton.jit
    def to_int8(x):
        """fp32 -> int8, rounding half away from zero, saturating at +-127 (symmetric)."""
        x = tl.minimum(tl.maximum(x, -127.0), 127.0)
        return tl.where(x >= 0.0, x + 0.5, x - 0.5).to(tl.int8)

    @triton.jit
    def _quantize_kernel(
        X, SHIFT, SCALE, OUT, S, OUT_STRIDE,
        stride_xn, stride_xs,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr,
        INT8: tl.constexpr, EMULATE_RNE: tl.constexpr,
    ):
        """One (head, block of rows): out = (x - shift) / scale in int8 or e4m3, row-major (N*S, D) or
        transposed (N*D, OUT_STRIDE)."""
        n = tl.program_id(0)
        offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_s < S)[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + n.to(tl.int64) * stride_xn + offs_s[:, None] * stride_xs + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + n * D + offs_d, mask=offs_d < D, other=0.0)
        scale = tl.load(SCALE + n * D + offs_d, mask=offs_d < D, other=0.0)
        inv = tl.where(scale > 0.0, 1.0 / tl.maximum(scale, 1e-30), 0.0)
        y = (x - shift[None, :]) * inv[None, :]
        y = to_int8(y) if INT8 else to_e4m3(y, EMULATE_RNE)
        if TRANSPOSE:
            ptr = OUT + (n.to(tl.int64) * D + offs_d[None, :]) * OUT_STRIDE + offs_s[:, None]
        else:
            ptr = OUT + (n.to(tl.int64) * S + offs_s[:, None]) * D + offs_d[None, :]
        tl.store(ptr, y, mask=mask)


def channel_scales(x: torch.Tensor, center: bool, qmax: float = E4M3_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, channel) shift and scale of x (N, S, D): the mean (or 0) and max |x - shift| / qmax (448 for
    e4m3, 127 for int8). Two reductions over x, no full-size temporaries."""
    lo, hi = torch.aminmax(x, dim=1)
    lo, hi = lo.float(), hi.float()
    shift = x.mean(dim=1, dtype=torch.float32) if center else torch.zeros_like(lo)
    amax = torch.maximum(hi - shift, shift - lo)
    # A constant channel has amax 0 and gets scale 0 (quantized to 0): K's scales are folded into Q, where
    # any larger one would take over each row's range and cost the other channels their precision.
    return shift, amax / qmax


def quantize_kv_fp8(k: torch.Tensor, v: torch.Tensor, qk: str = "int8", v_transposed: bool = False,
                    pv: str = "fp8") -> Fp8KeysValues:
    """Quantize cluster-sorted k, v (B, H, Sk, D) for the 8-bit kernel (see :class:`Fp8KeysValues`); qk: the
    format of K ("int8" or "fp8"); pv: "fp8" (V in e4m3, stored transposed if ``v_transposed``) or "bf16"
    (V as it is: only QK^T in 8 bits, SageAttention1's split)."""
    if pv not in ("fp8", "bf16"):
        raise ValueError(f"pv must be 'fp8' or 'bf16', got {pv!r}")
    if qk not in QK_FORMATS:
        raise ValueError(f"qk must be one of {QK_FORMATS}, got {qk!r}")
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must both be (B, H, Sk, D); got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (_HAS_TRITON and _FP8 is not None):
        raise RuntimeError("quantize_kv_fp8 needs Triton and a torch with float8_e4m3fn")
    b, h, s, d = k.shape
    n = b * h
    k3, v3 = k.reshape(n, s, d), v.reshape(n, s, d)
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    if v3.stride(-1) != 1:
        v3 = v3.contiguous()
    k_shift, k_scale = channel_scales(k3, center=True, qmax=127.0 if qk == "int8" else E4M3_MAX)
    if pv == "bf16":
        v_scale = torch.ones(n, d, device=k.device, dtype=torch.float32)
    else:
        v_shift, v_scale = channel_scales(v3, center=False)
    s_pad = -(-s // 16) * 16
    k8 = torch.empty(n * s, d, device=k.device, dtype=torch.int8 if qk == "int8" else _FP8)
    if pv == "bf16":
        v8 = v3.contiguous().view(n * s, d)
    elif v_transposed:
        v8 = torch.empty(n * d, s_pad, device=k.device, dtype=_FP8)
        if s_pad > s:
            v8[:, s:].zero_()  # pad columns: read by boxes past the last key, multiplied by p = 0
    else:
        v8 = torch.empty(n * s, d, device=k.device, dtype=_FP8)
    block_s, block_d = 64, triton.next_power_of_2(d)
    grid = (n, triton.cdiv(s, block_s))
    emulate = triton_interpreting()
    jobs = [(k3, k_shift, k_scale, k8, False, qk == "int8")]
    if pv == "fp8":
        jobs.append((v3, v_shift, v_scale, v8, v_transposed, False))
    for x, shift, scale, out, transpose, int8 in jobs:
        _quantize_kernel[grid](x, shift, scale, out, s, out.stride(0), x.stride(0), x.stride(1), D=d,
                               BLOCK_S=block_s, BLOCK_D=block_d, TRANSPOSE=transpose, INT8=int8,
                               EMULATE_RNE=emulate, num_warps=4)
    return Fp8KeysValues(k8, k_scale, v8, v_scale, (b, h, s, d), qk, v_transposed and pv == "fp8", pv)


# ------------------------------------------------------------------------------------------- kernel

if _HAS_TRITON:

    @triton.jit
    def _fp8_softmax_step(qk, n_mask, v, row_scale, m_i, l_i, acc, V_T: tl.constexpr, PV_FP8: tl.constexpr,
                          EMULATE_RNE: tl.constexpr):
        """online_softmax_step with a per-row score scale (Q's quantization scale times the softmax scale,
        exp2 domain), P in e4m3 and V in e4m3, (N, D) or transposed (D, N) when V_T."""
        qk = qk + tl.where(n_mask, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * row_scale)
        p = tl.math.exp2(qk * row_scale[:, None] - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p8 = to_e4m3(p * 256.0, EMULATE_RNE) if PV_FP8 else (p * 256.0).to(v.dtype)
        # Accumulate in place, as the bf16 kernel: a separate (M, D) fp32 product doubles the accumulator's
        # registers (128 per thread at 128x128 with 4 warps) and spilled, 2.5x slower than bf16 (run r23).
        acc = acc * alpha[:, None]
        acc = tl.dot(p8, tl.trans(v), acc) if V_T else tl.dot(p8, v, acc)
        return m_new, l_i, acc

    @triton.jit
    def _tma_fp8_kernel(
        Q, Out, QIDX, desc_k, desc_v, VT, stride_vt, VT_ROWS, KSCALE, VSCALE,
        work_ptr, num_work_ptr, q_bounds_ptr, count_ptr, table_ptr,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_ob, stride_oh, stride_os,
        H, Cq1, T_ROW, SEQ_Q, SEQ_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATHER_Q: tl.constexpr, QK_INT8: tl.constexpr,
        V_MODE: tl.constexpr, PV_FP8: tl.constexpr, EMULATE_RNE: tl.constexpr,
    ):
        # V_MODE 0: V (B*H*Sk, D) rows by TMA (Triton transposes each tile in shared memory for the K-major
        # wgmma operand); 1: V^T (B*H*D, Sk_pad) by TMA; 2: V^T by pointer loads.
        pid = tl.program_id(0)
        if pid >= tl.load(num_work_ptr):
            return
        q, n, b, h, row_id, q_rows, m_mask, offs_d, d_mask = query_tile(
            pid, Q, QIDX, work_ptr, q_bounds_ptr, stride_qb, stride_qh, stride_qs, H, Cq1, SEQ_Q,
            HEAD_DIM, BLOCK_D, BLOCK_M, GATHER_Q,
        )
        # Q times K's channel scales, then each row over its own max: q8 * sq[row] = q * k_scale.
        k_scale = tl.load(KSCALE + n * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        qf = q.to(tl.float32) * k_scale[None, :]
        amax = tl.max(tl.abs(qf), axis=1)
        if QK_INT8:
            sq = tl.where(amax > 0.0, amax * (1.0 / 127.0), 1.0)
            q8 = to_int8(qf * (1.0 / sq)[:, None])
        else:
            sq = tl.where(amax > 0.0, amax * (1.0 / 448.0), 1.0)
            q8 = to_e4m3(qf * (1.0 / sq)[:, None], EMULATE_RNE)
        row_scale = sq * qk_scale
        head_row = (b * H + h).to(tl.int32) * SEQ_K
        vt_row = (b * H + h).to(tl.int32) * HEAD_DIM
        tiles = table_ptr + row_id.to(tl.int64) * T_ROW
        m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
        n_tiles = tl.load(count_ptr + row_id)
        offs_n = tl.arange(0, BLOCK_N)
        for t in range(0, n_tiles):
            packed = tl.load(tiles + t)
            start = packed >> 8
            k = desc_k.load([head_row + start, 0])
            if V_MODE == 0:
                v = desc_v.load([head_row + start, 0])
            elif V_MODE == 1:
                v = desc_v.load([vt_row, start])
            else:
                offs_r = vt_row + offs_d
                v = tl.load(VT + offs_r[:, None].to(tl.int64) * stride_vt + (start + offs_n)[None, :],
                            mask=(offs_r < VT_ROWS)[:, None] & ((start + offs_n) < stride_vt)[None, :], other=0.0)
            if QK_INT8:
                qk = tl.dot(q8, tl.trans(k)).to(tl.float32)  # exact int32 sums
            else:
                qk = tl.dot(q8, tl.trans(k))
            m_i, l_i, acc = _fp8_softmax_step(qk, offs_n < (packed & 255), v, row_scale, m_i, l_i, acc,
                                              V_MODE != 0, PV_FP8, EMULATE_RNE)
        v_scale = tl.load(VSCALE + n * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        acc = acc * (v_scale * (1.0 / 256.0))[None, :]
        store_output(Out, acc, l_i, b, h, q_rows, m_mask, offs_d, d_mask, stride_ob, stride_oh, stride_os)


def varblock_attention_fp8_with_metadata(q: torch.Tensor, kv: Fp8KeysValues, meta, scale: float | None = None,
                                         out: torch.Tensor | None = None, q_perm: torch.Tensor | None = None,
                                         compile_info: list | None = None, vt_pointers: bool = False) -> torch.Tensor:
    """The FP8 kernel with prebuilt metadata (``key_layout="tma"``) and pre-quantized K/V.

    q: (B, H, Sq, D) bf16/fp16/fp32, cluster-sorted, or in token order with ``q_perm`` (B, H, Sq) sorted
    position -> token (the kernel then gathers Q and writes O in token order). Returns O in q's dtype.
    vt_pointers: read a transposed V with pointer loads instead of TMA (always so under the interpreter, which
    asserts 16-byte aligned inner box offsets).
    """
    from svg2_kernels.varblock_attention import _compile_summary

    cfg = meta.config
    if cfg.key_layout != "tma":
        raise ValueError(f"the FP8 kernel reads the TMA tile table: build the metadata with "
                         f"VarBlockConfig(key_layout='tma'), not {cfg.key_layout!r}")
    bsz, h, sq, d = q.shape
    if kv.shape[0] != bsz or kv.shape[1] != h or kv.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} does not match the quantized K/V of shape {kv.shape}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    qidx = q_perm.reshape(bsz * h, sq).to(torch.int32) if q_perm is not None else meta.num_work
    block_d = triton.next_power_of_2(d)
    desc_k = TensorDescriptor.from_tensor(kv.k8, [cfg.block_n, block_d])
    if kv.v_transposed:
        desc_v = TensorDescriptor.from_tensor(kv.v8, [block_d, cfg.block_n])
        v_mode = 2 if vt_pointers or triton_interpreting() else 1
    else:
        desc_v = TensorDescriptor.from_tensor(kv.v8, [cfg.block_n, block_d])
        v_mode = 0
    tiers = [(meta.work, meta.num_work, cfg.block_m, cfg.num_warps)]
    if cfg.block_m_small > 0:
        tiers.append((meta.work_small, meta.num_work_small, cfg.block_m_small, cfg.num_warps_small))
    for work, num_work, block_m, warps in tiers:
        if work.shape[0] == 0:
            continue
        compiled = _tma_fp8_kernel[(work.shape[0],)](
            q, out, qidx, desc_k, desc_v, kv.v8, kv.v8.stride(0), kv.v8.shape[0], kv.k_scale, kv.v_scale,
            work, num_work, meta.q_bounds, meta.chunk_count, meta.chunk_table,
            scale * 1.4426950408889634,
            q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            h, meta.chunk_count.shape[1], meta.chunk_table.shape[-1], sq, kv.shape[2],
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg.block_n, GATHER_Q=q_perm is not None,
            QK_INT8=kv.qk == "int8", V_MODE=v_mode, PV_FP8=kv.pv == "fp8", EMULATE_RNE=triton_interpreting(),
            num_warps=warps,
            num_stages=cfg.num_stages,
        )
        if compile_info is not None:
            compile_info.append(_compile_summary(compiled, block_m))
    return out


def fp8_config(q: torch.Tensor, seqlen_k: int):
    """The TMA config the FP8 kernel runs with: the bf16 default on Hopper, small tiles under the interpreter."""
    from svg2_kernels.varblock_attention import VarBlockConfig, default_config

    if q.device.type != "cuda":
        return VarBlockConfig(block_m=16, block_n=16, win=8, num_warps=4, num_stages=1, block_m_small=0,
                              key_layout="tma")
    return default_config("cuda", q.shape[-1], torch.cuda.get_device_capability(q.device), seqlen_k)


def _forward_fp8(q, k, v, q_offsets, k_offsets, block_map, scale, q_perm=None, qk="int8", config=None,
                 v_transposed=False):
    from svg2_kernels.varblock_attention import build_varblock_metadata

    reason = fp8_refusal(q, k)
    if reason is not None:
        raise NotImplementedError(f"8-bit variable-block attention cannot run: {reason}. Use the 'triton' "
                                  f"(bf16) variant instead.")
    cfg = config or fp8_config(q, k.shape[2])
    meta = build_varblock_metadata(q_offsets, k_offsets, block_map, q.shape[2], k.shape[2], cfg)
    kv = quantize_kv_fp8(k, v, qk, v_transposed)
    return varblock_attention_fp8_with_metadata(q, kv, meta, scale, q_perm=q_perm)


@torch.library.custom_op("svg2_kernels::varblock_attention_fp8", mutates_args=())
def _varblock_attention_fp8_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_perm: torch.Tensor | None,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float,
    qk: str,
) -> torch.Tensor:
    return _forward_fp8(q, k, v, q_offsets, k_offsets, block_map, scale, q_perm=q_perm, qk=qk)


@_varblock_attention_fp8_op.register_fake
def _(q, k, v, q_perm, q_offsets, k_offsets, block_map, scale, qk):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def varblock_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float | None = None,
    q_perm: torch.Tensor | None = None,
    qk: str = "int8",
) -> torch.Tensor:
    """Variable-block sparse attention with 8-bit QK^T (INT8 or FP8) and FP8 PV; contract of
    ``varblock_attention``.

    Args:
        q: (batch, heads, seqlen_q, headdim) bf16/fp16/fp32; cluster-sorted, or token order with q_perm.
        k, v: (batch, heads, seqlen_k, headdim), cluster-sorted; quantized here (one pass each).
        q_offsets, k_offsets, block_map: as for ``varblock_attention``.
        scale: softmax scale, default ``1/sqrt(headdim)``.
        q_perm: optional (batch, heads, seqlen_q) sorted position -> token; then q and the output are in
            token order.
        qk: "int8" (7-bit Q and K, the more accurate) or "fp8" (e4m3).
    Returns:
        (batch, heads, seqlen_q, headdim) in q's dtype; rows that select no key are zero.
    """
    from svg2_kernels.varblock_attention import _check

    _check(q, k, v, q_offsets, k_offsets, block_map)
    if qk not in QK_FORMATS:
        raise ValueError(f"qk must be one of {QK_FORMATS}, got {qk!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _varblock_attention_fp8_op(q, k, v, q_perm, q_offsets, k_offsets, block_map, scale, qk)


class TritonFp8VarBlockAttention(AttentionVariant):
    """QK^T in 8 bits (INT8 here, e4m3 in ``triton_fp8``) and PV in e4m3, fp32 softmax state. Less precise than
    ``triton`` and, measured on an H200 with Triton 3.6, slower (0.39-0.49x, module docstring): opt-in, never
    chosen by ``auto``."""

    name = "triton_int8_fp8"
    qk = "int8"
    priority = 90
    opt_in = True  # changes the numerics: only when named (SVG2Config(attention_kernel="triton_int8_fp8"))
    devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    requires = ("triton",)
    fuses_query_permutation = True

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        return super().not_supported_reasons(inputs) + _refusals(inputs.device_type, inputs.head_dim)

    def forward(self, q, k, v, q_offsets, k_offsets, block_map, scale=None):
        return varblock_attention_fp8(q, k, v, q_offsets, k_offsets, block_map, scale, qk=self.qk)

    def forward_token_order(self, q, k, v, q_perm, q_offsets, k_offsets, block_map, scale=None):
        return varblock_attention_fp8(q, k, v, q_offsets, k_offsets, block_map, scale, q_perm=q_perm, qk=self.qk)

    def gather_rows(self, x, perm):
        from svg2_kernels.permute import permute_rows

        return permute_rows(x, perm)


class TritonFp8QKVarBlockAttention(TritonFp8VarBlockAttention):
    """Both matmuls in e4m3: as fast as ``triton_int8_fp8`` on the H200 (runs r23-r25), QK^T less precise."""

    name = "triton_fp8"
    qk = "fp8"
    priority = 89


register_attention_variant(TritonFp8VarBlockAttention())
register_attention_variant(TritonFp8QKVarBlockAttention())
