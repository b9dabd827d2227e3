"""Attention-structure measurement: how concentrated is the exact self-attention of a Wan-class model?

For every self-attention (``attn1``) call, the share of each query's exact softmax mass that its top
``top_frac`` key tokens capture, averaged over (a sample of) queries and over heads. A model with
near-uniform attention scores about ``top_frac``; sparse attention can only be accurate when it is high.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

__all__ = ["TopMassRecorder", "measure_top_mass", "wan_rope"]


class _Probe(WanAttnProcessor):
    """The stock processor plus a measurement of the exact attention probabilities."""

    def __init__(self, recorder: TopMassRecorder, layer: int) -> None:
        super().__init__()
        self.recorder, self.layer = recorder, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
        self.recorder._record(self.layer, q, k)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of q or k (B, S, H, D), with the arithmetic of diffusers' WanAttnProcessor
    (interleaved pairs); ``cos``, ``sin`` are the ``rotary_emb`` the processor receives."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


class TopMassRecorder:
    """Installs probes on every block's ``attn1``; ``remove()`` restores the previous processors.

    ``per_layer()`` -> {layer: mean top-mass share over all recorded calls}.
    """

    def __init__(self, transformer, top_frac: float = 0.15, max_queries: int = 1024, seed: int = 0) -> None:
        self.top_frac, self.max_queries = top_frac, max_queries
        self.gen = torch.Generator().manual_seed(seed)
        self.values: dict[int, list[float]] = defaultdict(list)
        self._saved = []
        for i, block in enumerate(transformer.blocks):
            self._saved.append((block.attn1, block.attn1.processor))
            block.attn1.set_processor(_Probe(self, i))

    @torch.no_grad()
    def _record(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        B, S, H, D = q.shape
        n_q = min(S, self.max_queries)
        idx = torch.randperm(S, generator=self.gen)[:n_q].to(q.device)
        qs = q[:, idx].float().transpose(1, 2)  # (B, H, n_q, D)
        kt = k.float().transpose(1, 2)  # (B, H, S, D)
        top = max(1, math.ceil(self.top_frac * S))
        shares = []
        for h in range(H):  # one head at a time keeps the (n_q, S) matrix small at 8k tokens
            p = torch.softmax(qs[:, h] @ kt[:, h].transpose(-1, -2) / math.sqrt(D), dim=-1)
            shares.append(p.topk(top, dim=-1).values.sum(-1).mean())
        self.values[layer].append(float(torch.stack(shares).mean()))

    def per_layer(self) -> dict[int, float]:
        return {layer: sum(v) / len(v) for layer, v in sorted(self.values.items())}

    def remove(self) -> None:
        for attn, proc in self._saved:
            attn.set_processor(proc)
        self._saved = []


def measure_top_mass(pipe, prompts: list[str], top_frac: float = 0.15, seed: int = 0, **call_kwargs) -> dict:
    """Run the pipeline on ``prompts`` with probes installed; returns per-layer top-mass shares and their
    mean (all denoising steps and both CFG branches, averaged)."""
    rec = TopMassRecorder(pipe.transformer, top_frac=top_frac, seed=seed)
    try:
        for i, p in enumerate(prompts):
            pipe(p, generator=torch.Generator().manual_seed(seed + i), **call_kwargs)
    finally:
        rec.remove()
    layers = rec.per_layer()
    return {"top_frac": top_frac, "per_layer": layers, "mean": sum(layers.values()) / max(len(layers), 1)}
