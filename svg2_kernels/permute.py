"""Row permutation of (N, S, D) tensors in Triton: ``out[n, r] = x[n, perm[n, r]]`` (gather) and its inverse.

``torch.index_select`` / ``gather`` on (S, D) rows ran at ~25% of copy bandwidth on an H200 (see
notes/kernels.md); this copies whole rows with 16-byte vector accesses. Attention can also skip the query
gather and the output scatter entirely (``varblock_attention_with_metadata(..., q_perm=...)``).
"""

from __future__ import annotations

import torch

from svg2_kernels._triton import HAS_TRITON, tl, triton

__all__ = ["permute_rows", "unpermute_rows"]

if HAS_TRITON:

    @triton.jit
    def _permute_kernel(X, PERM, OUT, S, stride_xn, stride_xs, stride_on, stride_os,
                        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, SCATTER: tl.constexpr):
        n = tl.program_id(1).to(tl.int64)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        r_mask = offs_r < S
        mask = r_mask[:, None] & (offs_d < DIM)[None, :]
        idx = tl.load(PERM + n * S + offs_r, mask=r_mask, other=0)
        if SCATTER:  # out[perm[r]] = x[r]
            x = tl.load(X + n * stride_xn + offs_r[:, None] * stride_xs + offs_d[None, :], mask=mask)
            tl.store(OUT + n * stride_on + idx[:, None] * stride_os + offs_d[None, :], x, mask=mask)
        else:  # out[r] = x[perm[r]]
            x = tl.load(X + n * stride_xn + idx[:, None] * stride_xs + offs_d[None, :], mask=mask)
            tl.store(OUT + n * stride_on + offs_r[:, None] * stride_os + offs_d[None, :], x, mask=mask)


def _launch(x: torch.Tensor, perm: torch.Tensor, scatter: bool, out: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    s, d = shape[-2], shape[-1]
    x3 = x.reshape(-1, s, d)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    # the kernel indexes PERM + n * S: an expanded (stride-0) permutation must be materialised
    p = perm.reshape(-1, s).contiguous()
    if out is None:
        out = torch.empty_like(x3)
    o3 = out.reshape(-1, s, d)
    block_r = 32
    _permute_kernel[(triton.cdiv(s, block_r), x3.shape[0])](
        x3, p, o3, s, x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1),
        DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=block_r, SCATTER=scatter, num_warps=4,
    )
    return o3.reshape(shape)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather: x (..., S, D), perm (..., S) int (sorted position -> token) -> x in sorted order."""
    if out is None:  # the functional form is a custom op, so torch.compile sees one opaque node
        return _permute_rows_op(x, perm)
    return _launch(x, perm, False, out)


@torch.library.custom_op("svg2_kernels::permute_rows", mutates_args=())
def _permute_rows_op(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return _launch(x, perm, False, None)


@_permute_rows_op.register_fake
def _(x, perm):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def unpermute_rows(x: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`permute_rows`: x in sorted order -> token order."""
    return _launch(x, perm, True, out)
