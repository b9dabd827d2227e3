"""FlexAttention given the SVG2 token mask: the strongest off-the-shelf baseline (GPU only).

The ``BlockMask`` is built from the cluster layout without materialising the token mask: a 128x128 tile is
*partial* if any query cluster overlapping its rows selects any key cluster overlapping its columns, and
*full* if every such pair is selected (then ``mask_mod`` is skipped there). Both come from two small
matrix products per head: ``Aq (tiles x Cq) @ block_map (Cq x Ck) @ Ak (Ck x tiles)``. Inside partial tiles
``mask_mod`` looks the pair up in the block map through per-token cluster ids.
"""

from __future__ import annotations

import functools
import math

import torch

from svg2_kernels.plan import AttentionPlan
from svg2_kernels.registry import AttentionInputs, AttentionVariant, register_attention_variant

__all__ = ["flex_block_mask", "flex_varblock_attention", "FlexVarBlockAttention"]

_TILE = 128


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (eager flex_attention materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _segment_ids(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(N, C+1) offsets -> (N, length) cluster id per row; rows past offsets[-1] get C."""
    rows = torch.arange(length, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[:, 1:].contiguous(), rows.expand(offsets.shape[0], length).contiguous(),
                              right=True)


def _overlap(offsets: torch.Tensor, length: int, tile: int) -> torch.Tensor:
    """(N, C+1) offsets -> (N, tiles, C) float: 1 where cluster c has a row in the tile."""
    nt = -(-length // tile)
    t0 = torch.arange(nt, device=offsets.device) * tile
    start, end = offsets[:, None, :-1], offsets[:, None, 1:]
    return ((start < (t0 + tile)[None, :, None]) & (end > t0[None, :, None]) & (end > start)).float()


def flex_block_mask(q_offsets, k_offsets, block_map, seqlen_q: int, seqlen_k: int):
    """BlockMask (B, H, Sq, Sk) equal to the SVG2 token mask of the layout (see module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, cq, ck = block_map.shape
    n = b * h
    qo = q_offsets.reshape(n, cq + 1).long()
    ko = k_offsets.reshape(n, ck + 1).long()
    bm = block_map.reshape(n, cq, ck).float()
    aq = _overlap(qo, seqlen_q, _TILE)  # (n, tq, cq)
    ak = _overlap(ko, seqlen_k, _TILE)  # (n, tk, ck)
    any_sel = torch.bmm(torch.bmm(aq, bm), ak.transpose(1, 2)) > 0.5  # (n, tq, tk)
    any_unsel = torch.bmm(torch.bmm(aq, 1.0 - bm), ak.transpose(1, 2)) > 0.5
    # A tile is full only if every row and column belongs to some cluster (no tail rows / padded keys).
    q_cov = _overlap_count(qo, seqlen_q) == _tile_len(seqlen_q, qo.device)
    k_cov = _overlap_count(ko, seqlen_k) == _tile_len(seqlen_k, ko.device)
    full = any_sel & ~any_unsel & q_cov[:, :, None] & k_cov[:, None, :]
    partial = any_sel & ~full
    tq, tk = any_sel.shape[1:]

    def csr(m):
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt.reshape(b, h, tq), idx.reshape(b, h, tq, tk)

    kv_num, kv_idx = csr(partial)
    full_num, full_idx = csr(full)
    qid = _segment_ids(qo, seqlen_q)  # (n, sq) in [0, cq]
    kid = _segment_ids(ko, seqlen_k)
    bm_pad = torch.zeros(n, cq + 1, ck + 1, dtype=torch.bool, device=block_map.device)
    bm_pad[:, :cq, :ck] = block_map.reshape(n, cq, ck)
    qid = qid.reshape(b, h, seqlen_q)
    kid = kid.reshape(b, h, seqlen_k)
    bm_pad = bm_pad.reshape(b, h, cq + 1, ck + 1)

    def mask_mod(bi, hi, q_idx, kv_idx):
        return bm_pad[bi, hi, qid[bi, hi, q_idx], kid[bi, hi, kv_idx]]

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=_TILE, mask_mod=mask_mod, seq_lengths=(seqlen_q, seqlen_k)
    )


def _tile_len(length: int, device) -> torch.Tensor:
    nt = -(-length // _TILE)
    t0 = torch.arange(nt, device=device) * _TILE
    return (torch.clamp(t0 + _TILE, max=length) - t0)


def _overlap_count(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(N, tiles): rows of each tile that lie inside [offsets[0], offsets[-1])."""
    nt = -(-length // _TILE)
    t0 = torch.arange(nt, device=offsets.device) * _TILE
    t1 = torch.clamp(t0 + _TILE, max=length)
    lo = torch.maximum(t0[None, :], offsets[:, :1])
    hi = torch.minimum(t1[None, :], offsets[:, -1:])
    return (hi - lo).clamp_min(0)


def flex_varblock_attention(q, k, v, q_offsets, k_offsets, block_map, scale=None, block_mask=None,
                            return_lse: bool = False):
    """FlexAttention on the layout's token mask; shapes as ``varblock_attention_reference``.

    Rows that select no key come back as zeros (FlexAttention's convention for fully masked rows). With
    ``return_lse``: ``(out, lse)``, lse (B, H, Sq) float32, natural log.
    """
    if block_mask is None:
        block_mask = flex_block_mask(q_offsets, k_offsets, block_map, q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not return_lse:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older keyword
        out, lse = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    else:
        out, aux = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    return out, lse.float()


class FlexVarBlockAttention(AttentionVariant):
    name = "flex"
    priority = 50
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:  # pragma: no cover
            reasons.append("torch.nn.attention.flex_attention is unavailable (torch >= 2.5 needed)")
        if inputs.head_dim & (inputs.head_dim - 1) or inputs.head_dim < 16:
            reasons.append(f"head dim {inputs.head_dim} is not a power of two >= 16")
        return reasons

    def plan(self, q_offsets, k_offsets, block_map, inputs, tiles, skipped=()):
        mask = flex_block_mask(q_offsets, k_offsets, block_map, inputs.seqlen_q, inputs.seqlen_k)
        return AttentionPlan(self, inputs, q_offsets, k_offsets, block_map, None, mask, skipped)

    def run(self, q, k, v, plan, scale, q_perm, return_lse):
        res = flex_varblock_attention(q, k, v, None, None, None, scale, block_mask=plan.data, return_lse=return_lse)
        return res if return_lse else (res, None)


register_attention_variant(FlexVarBlockAttention())
