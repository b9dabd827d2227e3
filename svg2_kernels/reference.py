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
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        return_lse: also return the log-sum-exp of every row's scaled scores.
    Returns:
        (batch, heads, seqlen_q, headdim) in q's dtype, sorted order. Query rows that select no key row
        (and rows past q_offsets[-1]) are zero. With ``return_lse``: ``(out, lse)``, lse (batch, heads,
        seqlen_q) float32, natural log, -inf for rows that select no key.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    n = b * h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = q.dtype if compute_dtype is None else compute_dtype
    qf = q.reshape(n, sq, d).to(dt)
    kf = k.reshape(n, sk, d).to(dt)
    vf = v.reshape(n, sk, d).to(dt)
    out, lse = _masked_attention(qf, kf, vf, q_offsets, k_offsets, block_map, scale)
    out = out.reshape(b, h, sq, d).to(q.dtype)
    return (out, lse.reshape(b, h, sq).float()) if return_lse else out


def _masked_attention(qf, kf, vf, q_offsets, k_offsets, block_map, scale: float):
    """Masked dense attention of (n, s, d) tensors in their dtype, chunked over queries.

    Returns (out (n, sq, d), lse (n, sq) in the compute dtype, -inf for rows without keys)."""
    n, sq, d = qf.shape
    sk = kf.shape[1]
    cq, ck = block_map.shape[-2], block_map.shape[-1]
    qid = _segment_ids(q_offsets.reshape(n, cq + 1).long(), sq)  # [n, sq]
    kid = _segment_ids(k_offsets.reshape(n, ck + 1).long(), sk)  # [n, sk]
    # Pad the block map with a "none" row/column so out-of-range ids select nothing.
    bm = torch.zeros(n, cq + 1, ck + 1, dtype=torch.bool, device=qf.device)
    bm[:, :cq, :ck] = block_map.reshape(n, cq, ck)
    out = torch.zeros(n, sq, d, dtype=qf.dtype, device=qf.device)
    lse = torch.full((n, sq), float("-inf"), dtype=qf.dtype, device=qf.device)
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
        o = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, s0:s1] = o
        lse[:, s0:s1] = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf: rows without keys
    return out, lse


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
