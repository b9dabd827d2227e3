"""Torch reference implementations of every svg2 kernel (CPU and GPU, any float dtype).

These define the semantics the fast variants must match:

* ``varblock_attention_reference``: attention over cluster-sorted Q/K/V where query cluster ``i`` (rows
  ``q_offsets[i]:q_offsets[i+1]``) attends to the union of key clusters ``j`` with ``block_map[i, j]``
  (rows ``k_offsets[j]:k_offsets[j+1]``). Key rows past ``k_offsets[-1]`` are never attended.
* ``kmeans_assign_reference``: nearest centroid (squared Euclidean) per point.
* ``kmeans_update_reference``: per-cluster sums and counts; empty clusters keep their old centroid.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "varblock_attention_reference",
    "varblock_attention_fp8_reference",
    "kmeans_assign_reference",
    "kmeans_update_reference",
]

# Elements of the (rows x keys) score matrix materialised at once by the chunked reference paths.
_CHUNK_ELEMS = 1 << 26


def _segment_ids(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """Cluster id of every row given exclusive offsets [N, C+1]; rows past offsets[-1] get id C (none)."""
    rows = torch.arange(length, device=offsets.device)
    # searchsorted(right) - 1 maps a row to the last cluster whose start is <= row.
    ids = torch.searchsorted(offsets[:, 1:].contiguous(), rows.expand(offsets.shape[0], length).contiguous(),
                             right=True)
    return ids  # values in [0, C]; C means "past the last cluster"


def varblock_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Variable-block sparse attention over cluster-sorted inputs (masked dense, chunked over queries).

    Args:
        q: (batch, heads, seqlen_q, headdim), rows sorted by query cluster.
        k, v: (batch, heads, seqlen_k, headdim), rows sorted by key cluster.
        q_offsets: (batch, heads, num_q_clusters + 1) int, exclusive prefix sums of query cluster sizes.
        k_offsets: (batch, heads, num_k_clusters + 1) int, exclusive prefix sums of key cluster sizes.
        block_map: (batch, heads, num_q_clusters, num_k_clusters) bool.
        scale: softmax scale, default 1/sqrt(headdim).
        compute_dtype: dtype of the arithmetic (float32 for the reference; None keeps the input dtype,
            which gives the "same-precision torch path" of the FlashAttention error rule).
    Returns:
        (batch, heads, seqlen_q, headdim) in q's dtype, sorted order. Query rows that select no key row
        (and rows past q_offsets[-1]) are zero.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    n = b * h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = q.dtype if compute_dtype is None else compute_dtype
    qf = q.reshape(n, sq, d).to(dt)
    kf = k.reshape(n, sk, d).to(dt)
    vf = v.reshape(n, sk, d).to(dt)
    out = _masked_attention(qf, kf, vf, q_offsets, k_offsets, block_map, scale)
    return out.reshape(b, h, sq, d).to(q.dtype)


def _masked_attention(qf, kf, vf, q_offsets, k_offsets, block_map, scale: float, quantize_p=None):
    """Masked dense attention of (n, s, d) tensors in their dtype, chunked over queries. quantize_p: applied
    to the softmax numerators before P @ V (the denominators use the unquantized ones, as the FP8 kernel)."""
    n, sq, d = qf.shape
    sk = kf.shape[1]
    cq, ck = block_map.shape[-2], block_map.shape[-1]
    qid = _segment_ids(q_offsets.reshape(n, cq + 1).long(), sq)  # [n, sq]
    kid = _segment_ids(k_offsets.reshape(n, ck + 1).long(), sk)  # [n, sk]
    # Pad the block map with a "none" row/column so out-of-range ids select nothing.
    bm = torch.zeros(n, cq + 1, ck + 1, dtype=torch.bool, device=qf.device)
    bm[:, :cq, :ck] = block_map.reshape(n, cq, ck)
    out = torch.zeros(n, sq, d, dtype=qf.dtype, device=qf.device)
    rows = max(1, _CHUNK_ELEMS // max(1, sk * max(1, n)))
    for s0 in range(0, sq, rows):
        s1 = min(sq, s0 + rows)
        qi = qid[:, s0:s1]  # [n, r]
        mask = torch.gather(bm, 1, qi.unsqueeze(-1).expand(n, s1 - s0, ck + 1))  # [n, r, ck+1]
        mask = torch.gather(mask, 2, kid.unsqueeze(1).expand(n, s1 - s0, sk))  # [n, r, sk]
        scores = torch.matmul(qf[:, s0:s1], kf.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        if quantize_p is not None:
            p = quantize_p(p)
        o = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, s0:s1] = o
    return out


def _round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest e4m3 value (saturating at +-448), as fp32."""
    return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def _round_int8(x: torch.Tensor) -> torch.Tensor:
    """x rounded half away from zero and saturated to +-127 (the kernel's int8 conversion), as fp32."""
    x = x.float().clamp(-127.0, 127.0)
    return torch.trunc(x + 0.5 * torch.sign(x))


def varblock_attention_fp8_reference(q, k, v, q_offsets, k_offsets, block_map, scale: float | None = None,
                                     qk: str = "int8", pv: str = "fp8"):
    """The 8-bit kernel's arithmetic in fp32 torch (the "same-precision torch path" for its error rule).

    Quantizes exactly the operands the kernel quantizes, the same way: K centred on its per-head mean and
    scaled per channel, Q times K's channel scales and then per row (both to int8 or e4m3, ``qk``), V per
    channel and the softmax numerators (relative to the row max) as ``p * 256``, both e4m3. Everything else
    is fp32 (with ``pv="bf16"`` V and P are not quantized). Shapes as :func:`varblock_attention_reference`;
    returns q's dtype.
    """
    qmax, rnd = (127.0, _round_int8) if qk == "int8" else (448.0, _round_e4m3)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    n = b * h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf, vf = k.reshape(n, sk, d).float(), v.reshape(n, sk, d).float()
    k_mean = kf.mean(1, keepdim=True)
    k_amax = (kf - k_mean).abs().amax(1, keepdim=True)
    k_scale = k_amax / qmax  # 0 for a constant channel: it adds nothing to the scores
    k8 = rnd((kf - k_mean) / torch.where(k_scale > 0, k_scale, torch.ones_like(k_scale)))
    v_amax = vf.abs().amax(1, keepdim=True)
    v_scale = v_amax / 448.0
    v_deq = _round_e4m3(vf / torch.where(v_scale > 0, v_scale, torch.ones_like(v_scale))) * v_scale
    qf = q.reshape(n, sq, d).float() * k_scale
    q_amax = qf.abs().amax(-1, keepdim=True)
    q_scale = torch.where(q_amax > 0, q_amax / qmax, torch.ones_like(q_amax))
    q_deq = rnd(qf / q_scale) * q_scale
    if pv == "bf16":
        v_deq, quantize_p = vf, None
    else:
        def quantize_p(p):
            return _round_e4m3(p * 256.0) / 256.0
    out = _masked_attention(q_deq, k8, v_deq, q_offsets, k_offsets, block_map, scale, quantize_p=quantize_p)
    return out.reshape(b, h, sq, d).to(q.dtype)


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per point.

    Args:
        x: (batch, num_points, dim); centroids: (batch, num_clusters, dim). Any float dtype; float32 math.
    Returns:
        labels: (batch, num_points) int64.
    """
    xf = x.float()
    cf = centroids.float()
    n, s, _ = xf.shape
    c = cf.shape[1]
    c_norm = (cf * cf).sum(-1)  # [n, c]
    labels = torch.empty(n, s, dtype=torch.long, device=x.device)
    rows = max(1, _CHUNK_ELEMS // max(1, c * n))
    for s0 in range(0, s, rows):
        s1 = min(s, s0 + rows)
        # ||x||^2 is constant per row, so argmin(||c||^2 - 2 x.c) is the nearest centroid.
        dist = c_norm.unsqueeze(1) - 2.0 * torch.matmul(xf[:, s0:s1], cf.transpose(1, 2))
        labels[:, s0:s1] = dist.argmin(dim=-1)
    return labels


def kmeans_update_reference(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid update (mean of members); empty clusters keep their previous centroid.

    Args:
        x: (batch, num_points, dim); labels: (batch, num_points) int; centroids: (batch, num_clusters, dim).
    Returns:
        (new_centroids float32 (batch, num_clusters, dim), sizes int64 (batch, num_clusters)).
    """
    n, s, d = x.shape
    c = centroids.shape[1]
    idx = labels.long()
    sums = torch.zeros(n, c, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, idx.unsqueeze(-1).expand(n, s, d), x.float())
    sizes = torch.zeros(n, c, dtype=torch.long, device=x.device)
    sizes.scatter_add_(1, idx, torch.ones_like(idx))
    mean = sums / sizes.clamp_min(1).unsqueeze(-1).to(sums.dtype)
    new = torch.where((sizes > 0).unsqueeze(-1), mean, centroids.float())
    return new, sizes
