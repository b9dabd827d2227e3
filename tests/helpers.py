"""Test helpers: structured synthetic Q/K/V (clustered, like real video attention)."""

from __future__ import annotations

import torch


def clustered_qkv(b=1, h=2, s=257, d=64, clusters=6, spread=0.3, seed=0, dtype=torch.float32):
    """Q and K drawn from a shared mixture of Gaussians per head (unequal masses), V random."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, clusters, d, generator=g) * 2.0
    weights = torch.rand(clusters, generator=g) + 0.2
    assign_q = torch.multinomial(weights, b * h * s, replacement=True, generator=g).view(b, h, s)
    assign_k = torch.multinomial(weights, b * h * s, replacement=True, generator=g).view(b, h, s)
    pick = lambda a: torch.gather(centers, 2, a.unsqueeze(-1).expand(b, h, s, d))
    q = pick(assign_q) + spread * torch.randn(b, h, s, d, generator=g)
    k = pick(assign_k) + spread * torch.randn(b, h, s, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def masked_reference(q, k, v, mask, scale=None):
    """float64 dense attention under a boolean token mask (B, H, Sq, Sk)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ vd


def assert_fa_rule(out, q, k, v, mask, scale=None, floor=1e-6):
    """FlashAttention's test rule: error vs a float64 reference at most 2x that of the same-precision torch
    path (SDPA with the same token mask in the inputs' dtype), plus a tiny floor for 0-vs-0 cases."""
    import torch.nn.functional as F

    ref = masked_reference(q, k, v, mask, scale)
    same = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    err = (out.double() - ref).abs().max().item()
    err_torch = (same.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + floor, f"error {err:.3g} > 2 x same-precision torch error {err_torch:.3g}"
    return err, err_torch
