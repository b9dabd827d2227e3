"""SVG-EAR's error probe as one Triton kernel: ``log E_ij`` for every (query cluster, key cluster) pair.

``svg2.methods.svg_ear.ear_log_error`` is the torch reference (chunked fp32 matmuls over every query centroid x
every key, then segment max / segment sums through scatters: about 0.1 s at Wan 14B (300, 1000)). Here:

    E_ij = Σ_{y in K_j} || e^{a_y} v_y - e^{c_ij} v̄_j ||²,  a_y = cq_i . k_y * scale,  c_ij = cq_i . ck_j * scale
         = e^{2R} Σ_y (pc² |v_y - v̄_j|² + 2 pc (p_y - pc) <v_y - v̄_j, v_y> + (p_y - pc)² |v_y|²),
    p_y = e^{δ_y - m},  pc = e^{-m},  δ_y = a_y - c_ij = cq_i . (k_y - ck_j) * scale,  m = max(0, max_y δ_y),
    R = c_ij + m

  (each summand is ``||p_y v_y - pc v̄_j||²`` written so that nothing large cancels when the centroid fits,
  p ~ pc and v ~ v̄: the reference's expansion ``T1 - 2 pc T2 + n pc² |v̄|²`` leaves fp32 noise there, e.g. a
  one-key cluster, whose error is exactly 0). The logits enter only as δ_y, one dot with the centred keys
  ``k_y - ck_j``: a key equal to its centroid (a one-key cluster) has δ_y = 0 exactly in any dot precision, so its
  pair sits at the floor (a_y and c_ij computed apart, a tile dot and an FMA sum, differ by rounding that e^{2R}
  lifted to log E of -5 and more where the truth is the floor -18.4, already under the interpreter's fp32 dot).

* **Grid** ``(cdiv(Cq, BLOCK_Q), cdiv(Ck, GROUP), B * H)``: one program per tile of query centroids x GROUP
  consecutive key clusters of one head (the query tile is loaded once for them). A cluster's keys are
  contiguous in the cluster-sorted K / V (rows ``offsets[j]:offsets[j + 1]``); the program walks them in
  ``BLOCK_K`` rows with the running reference point R (the sum rescaled by the square of the running factor
  when R grows). The query-tile axis varies fastest, so the programs that read the same key clusters run
  together and their rows come from L2 after the first.
* **Precision**: ``δ_y`` is an fp32 dot of the fp32 query centroids with the centred keys: ``"tf32x3"`` on CUDA
  (three TF32 tensor-core products, both operands split into two TF32 halves, about 22 significant bits; sm_90a
  compile of the kernel before the centred keys, 64 x 32 tiles, 8 warps: 194 registers, no spills; 4 warps spill),
  ``"ieee"`` under the interpreter (the fp32 FMA dot: on sm_90a it compiles to 32 registers and kilobytes of
  spills, so it is no GPU default); everything else is fp32, exponents in base 2.
* ``log E`` is floored at ``log(1e-8)`` like the reference (an empty cluster, or a cancellation to <= 0).
"""

from __future__ import annotations

import math

import torch

from svg2_kernels._triton import HAS_TRITON, interpreting, tl, triton

__all__ = ["EAR_PROBE_PRECISIONS", "ear_log_error_triton"]

EAR_PROBE_PRECISIONS = ("ieee", "tf32x3")
_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _ear_probe_kernel(
        QC, KS, VS, KC, VM, OFF, OUT,
        qk_scale, log2_floor,
        s_kn, s_ks, s_kd,
        s_vn, s_vs, s_vd,
        CQ, CK,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        j0 = tl.program_id(1) * GROUP
        n = tl.program_id(2).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = rq < CQ
        # (BLOCK_Q, D) fp32 query centroids, loaded once for the GROUP key clusters of this program.
        qc = tl.load(QC + (n * CQ + rq)[:, None] * HEAD_DIM + d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                     other=0.0)
        k_base = KS + n * s_kn
        v_base = VS + n * s_vn
        for j in range(j0, tl.minimum(j0 + GROUP, CK)):
            # The cluster's centroid and mean value (D,) fp32, and its rows of the sorted K / V.
            kc = tl.load(KC + (n * CK + j) * HEAD_DIM + d, mask=d_ok, other=0.0)
            vbar = tl.load(VM + (n * CK + j) * HEAD_DIM + d, mask=d_ok, other=0.0)
            start = tl.load(OFF + n * (CK + 1) + j)
            end = tl.load(OFF + n * (CK + 1) + j + 1)
            # Base 2 throughout (qk_scale includes log2 e). Every logit is taken relative to the centroid's, c:
            # delta_y = a_y - c = cq . (k_y - kc) * scale from one dot with the centred keys, so a key equal to the
            # centroid (a one-key cluster, duplicated keys) has delta exactly 0 in any dot precision and
            # accumulation order, and p_y - pc below is exactly 0 (an exact fit stays at the floor). Computing a_y
            # and c apart (the tile dot against an FMA sum) left their rounding difference there, which e^{2R}
            # lifted far above the floor. Reference point R = c + m, m = max(0, max_y delta_y), running:
            # every term is relative to it, nothing overflows, and the sum is rescaled by alpha^2 when m grows.
            c = tl.sum(qc * kc[None, :], 1) * qk_scale  # the centroid's logit
            m = tl.zeros([BLOCK_Q], tl.float32)
            acc = tl.zeros([BLOCK_Q], tl.float32)
            for y0 in range(start, end, BLOCK_K):
                ry = y0 + tl.arange(0, BLOCK_K)
                y_ok = ry < end
                ry64 = ry.to(tl.int64)
                ok2 = y_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + ry64[:, None] * s_ks + d[None, :] * s_kd, mask=ok2, other=0.0).to(tl.float32)
                v = tl.load(v_base + ry64[:, None] * s_vs + d[None, :] * s_vd, mask=ok2, other=0.0).to(tl.float32)
                dk = tl.where(ok2, k - kc[None, :], 0.0)  # centred keys
                dv = tl.where(ok2, v - vbar[None, :], 0.0)
                dv2 = tl.sum(dv * dv, 1)  # |v_y - v̄|²
                w = tl.sum(dv * v, 1)  # <v_y - v̄, v_y>
                vn2 = tl.sum(v * v, 1)  # |v_y|²
                delta = tl.dot(qc, tl.trans(dk), input_precision=PRECISION) * qk_scale  # a_y - c
                delta = tl.where(y_ok[None, :], delta, float("-inf"))
                m_new = tl.maximum(m, tl.max(delta, 1))
                alpha = tl.exp2(m - m_new)
                pc = tl.exp2(-m_new)
                # ||p v - pc v̄||² = pc² |v - v̄|² + 2 pc (p - pc) <v - v̄, v> + (p - pc)² |v|²: nothing large cancels
                # when the centroid fits (p ~ pc, v ~ v̄), unlike T1 - 2 pc T2 + n pc² |v̄|². Padding rows add 0.
                diff = tl.exp2(delta - m_new[:, None]) - pc[:, None]
                diff = tl.where(y_ok[None, :], diff, 0.0)
                term = ((pc * pc)[:, None] * dv2[None, :]
                        + diff * ((2.0 * pc)[:, None] * w[None, :] + diff * vn2[None, :]))
                acc = acc * alpha * alpha + tl.sum(term, 1)
                m = m_new
            # log2 E = 2 R + log2(acc); acc <= 0 (an empty cluster, rounding of an exact fit) takes the floor.
            log2_err = tl.where(acc > 0, 2.0 * (c + m) + tl.log2(tl.where(acc > 0, acc, 1.0)), float("-inf"))
            log2_err = tl.maximum(log2_err, log2_floor)
            tl.store(OUT + (n * CQ + rq) * CK + j, log2_err * 0.6931471805599453, mask=q_ok)


def ear_log_error_triton(
    q_centroids: torch.Tensor,
    k_sorted: torch.Tensor,
    v_sorted: torch.Tensor,
    k_centroids: torch.Tensor,
    v_means: torch.Tensor,
    k_sizes: torch.Tensor,
    scale: float,
    *,
    precision: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    group: int | None = None,
) -> torch.Tensor:
    """``svg2.methods.svg_ear.ear_log_error`` in one launch (same arguments and result; fp32 rounding differs,
    and where the centroid fits a block exactly this form keeps the error near 0 rather than fp32 noise).

    Args:
        q_centroids: (N, Cq, D); k_centroids, v_means: (N, Ck, D) (any float dtype; used in fp32).
        k_sorted, v_sorted: (N, S, D) keys and values in cluster order (any strides; clusters contiguous with
            sizes ``k_sizes`` (N, Ck); rows past the last cluster are ignored).
        scale: softmax scale.
        precision: ``"tf32x3"`` (tensor cores, about fp32's accuracy) or ``"ieee"`` (fp32 FMA dots); None:
            tf32x3 on CUDA, ieee elsewhere (the interpreter).
        block_q, block_k, group: query centroids and keys per tile (powers of two >= 16) and key clusters per
            program; None: 64 x 32 and 16 on CUDA, 16 x 16 and 4 under the interpreter.
    Returns:
        (N, Cq, Ck) float32 natural-log errors, floored at log(1e-8).
    """
    if not HAS_TRITON:
        raise RuntimeError("ear_log_error_triton needs Triton; use svg2.methods.svg_ear.ear_log_error")
    small = interpreting() or q_centroids.device.type != "cuda"
    precision = precision or ("ieee" if small else "tf32x3")
    if precision not in EAR_PROBE_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {EAR_PROBE_PRECISIONS}")
    n, cq, d = q_centroids.shape
    ck = k_sizes.shape[-1]
    if (k_sorted.dim() != 3 or k_sorted.shape[0] != n or k_sorted.shape[2] != d or v_sorted.shape != k_sorted.shape
            or tuple(k_centroids.shape) != (n, ck, d) or tuple(v_means.shape) != (n, ck, d)):
        raise ValueError(f"shapes do not match: q_centroids {tuple(q_centroids.shape)}, k_sorted "
                         f"{tuple(k_sorted.shape)}, v_sorted {tuple(v_sorted.shape)}, k_centroids "
                         f"{tuple(k_centroids.shape)}, v_means {tuple(v_means.shape)}, k_sizes {tuple(k_sizes.shape)}")
    block_q = block_q or (16 if small else 64)
    block_k = block_k or (16 if small else 32)
    group = group or (4 if small else 16)
    if group < 1:
        raise ValueError(f"group must be >= 1 key cluster per program, got {group}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {blk}")
    out = torch.empty(n, cq, ck, dtype=torch.float32, device=q_centroids.device)
    if n * cq * ck == 0:
        return out
    offsets = torch.nn.functional.pad(torch.cumsum(k_sizes.reshape(n, ck), -1), (1, 0)).to(torch.int32).contiguous()
    qc = q_centroids.float().contiguous()
    kc = k_centroids.float().contiguous()
    vm = v_means.float().contiguous()
    _ear_probe_kernel[(triton.cdiv(cq, block_q), triton.cdiv(ck, group), n)](
        qc, k_sorted, v_sorted, kc, vm, offsets, out,
        float(scale) * _LOG2E, math.log2(1e-8),
        k_sorted.stride(0), k_sorted.stride(1), k_sorted.stride(2),
        v_sorted.stride(0), v_sorted.stride(1), v_sorted.stride(2),
        cq, ck,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_Q=block_q, BLOCK_K=block_k, GROUP=group,
        PRECISION=precision, num_warps=4 if small else 8, num_stages=2,
    )
    return out
