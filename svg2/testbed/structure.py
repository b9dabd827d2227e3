"""Attention structure of a Wan-class transformer on clips: how concentrated, how local, per head.

For each self-attention call the probe records Q, K, V (after QK-norm and RoPE, as the attention kernel
sees them) and measures on sampled query rows of every head:
- ``top_mass``: the share of the row's exact softmax mass held by its top ``top_frac`` keys;
- ``outside_local``: the share of that top mass lying outside a local window around the query
  (``window`` = (frames, rows, cols) half-widths on the token grid): near 0 for positional heads, near 1
  for heads that look things up by content far away.
The raw Q/K/V of a call can be kept (``keep_qkv``) for the recall analysis of sparse methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

__all__ = ["HeadStats", "StructureProbe", "head_stats"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # the arithmetic of diffusers' WanAttnProcessor (interleaved pairs)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


@dataclass
class HeadStats:
    """Per head (H,) float tensors, means over the sampled rows."""

    top_mass: torch.Tensor
    outside_local: torch.Tensor


@torch.no_grad()
def head_stats(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], *, top_frac: float = 0.15,
               window: tuple[int, int, int] = (1, 4, 4), num_rows: int = 512, seed: int = 0,
               scale: float | None = None) -> HeadStats:
    """q, k: (B, H, S, D) video tokens in raster order over ``grid`` = (frames, rows, cols)."""
    b, h, s, d = q.shape
    f_, r_, c_ = grid
    if f_ * r_ * c_ != s:
        raise ValueError(f"grid {grid} has {f_ * r_ * c_} tokens but the sequence has {s}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(s, generator=g)[: min(num_rows, s)].to(q.device)
    pos = torch.arange(s, device=q.device)
    pf, pr, pc = pos // (r_ * c_), (pos // c_) % r_, pos % c_
    local = ((pf[rows, None] - pf[None]).abs() <= window[0]) & ((pr[rows, None] - pr[None]).abs() <= window[1]) \
        & ((pc[rows, None] - pc[None]).abs() <= window[2])  # (rows, S)
    top = max(1, math.ceil(top_frac * s))
    tm, ol = torch.zeros(b, h, device=q.device), torch.zeros(b, h, device=q.device)
    for bi in range(b):
        for hi in range(h):
            p = torch.softmax((q[bi, hi, rows].float() @ k[bi, hi].float().T) * scale, dim=-1)
            vals, idx = p.topk(top, dim=-1)
            mass = vals.sum(-1)
            outside = (vals * (~local.gather(1, idx)).float()).sum(-1)
            tm[bi, hi] = mass.mean()
            ol[bi, hi] = (outside / mass).mean()
    return HeadStats(tm.mean(0).cpu(), ol.mean(0).cpu())


class _Probe(WanAttnProcessor):
    def __init__(self, owner: StructureProbe, layer: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.owner.active:
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
            self.owner._record(self.layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@dataclass
class StructureProbe:
    """Installs probes on every block's ``attn1`` of ``transformer``; ``remove()`` restores the processors.

    Each recorded call appends ``{"layer", "tag", "stats": HeadStats}`` to ``rows``; with ``keep_qkv`` the
    call's q, k, v (B, H, S, D) go to ``qkv`` too (``tag`` is set by the caller before each forward)."""

    transformer: torch.nn.Module
    grid: tuple[int, int, int]
    top_frac: float = 0.15
    window: tuple[int, int, int] = (1, 4, 4)
    num_rows: int = 512
    keep_qkv: bool = False
    tag: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    qkv: list[dict] = field(default_factory=list)
    active: bool = True

    def __post_init__(self) -> None:
        self._saved = []
        for i, block in enumerate(self.transformer.blocks):
            self._saved.append((block.attn1, block.attn1.processor))
            block.attn1.set_processor(_Probe(self, i))

    def _record(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        stats = head_stats(q, k, self.grid, top_frac=self.top_frac, window=self.window, num_rows=self.num_rows,
                           seed=layer)
        self.rows.append({"layer": layer, **self.tag, "stats": stats})
        if self.keep_qkv:
            self.qkv.append({"layer": layer, **self.tag, "q": q.detach(), "k": k.detach(), "v": v.detach()})

    def remove(self) -> None:
        for attn, proc in self._saved:
            attn.set_processor(proc)
        self._saved = []
