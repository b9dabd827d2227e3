"""Attention structure of any model's heads: concentration, locality, head type, and the top-k recall bound.

Model-agnostic measures on exact attention, shared by the recall analysis (``analysis.recall``) and the
testbed probe (``svg2.testbed.structure``, which re-exports them):
- ``head_stats``: per head, on sampled query rows, ``top_mass`` (the share of a row's softmax mass held by its
  top ``top_frac`` keys), ``outside_local`` (the share of that top mass outside a local window around the
  query: ``window`` = (frames, rows, cols) half-widths on the token grid; near 0 for positional heads, near 1
  for heads that look things up by content far away) and ``outside_temporal`` (the share outside the query's
  own spatial neighbourhood, ``column`` = (rows, cols), in every frame: near 0 for temporal heads, SVG1's kind);
- ``classify_heads``: every head is ``uniform``, ``local``, ``temporal`` or ``content`` (``HEAD_TYPES``);
- ``recall_bound``: the largest attention recall any mask keeping a given share of the token pairs reaches
  (the mass of the top-k exact weights; ``TopKMass`` sorts a head once so that many densities cost a lookup each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BOUND", "HEAD_TYPES", "HeadStats", "RecallBound", "TopKMass", "classify_heads", "head_stats",
           "recall_bound"]

HEAD_TYPES = ("uniform", "local", "temporal", "content")
BOUND = "bound"  # method label of the top-k recall bound rows


@dataclass
class HeadStats:
    """Per head (H,) float tensors, means over the sampled rows (and the batch)."""

    top_mass: torch.Tensor
    outside_local: torch.Tensor
    outside_temporal: torch.Tensor | None = None


@torch.no_grad()
def head_stats(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], *, top_frac: float = 0.15,
               window: tuple[int, int, int] = (1, 4, 4), column: tuple[int, int] = (1, 1), num_rows: int = 512,
               seed: int = 0, scale: float | None = None) -> HeadStats:
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
    same_place = ((pr[rows, None] - pr[None]).abs() <= column[0]) & ((pc[rows, None] - pc[None]).abs() <= column[1])
    top = max(1, math.ceil(top_frac * s))
    tm, ol = torch.zeros(b, h, device=q.device), torch.zeros(b, h, device=q.device)
    ot = torch.zeros(b, h, device=q.device)
    for bi in range(b):
        for hi in range(h):
            p = torch.softmax((q[bi, hi, rows].float() @ k[bi, hi].float().T) * scale, dim=-1)
            vals, idx = p.topk(top, dim=-1)
            mass = vals.sum(-1)
            outside = (vals * (~local.gather(1, idx)).float()).sum(-1)
            elsewhere = (vals * (~same_place.gather(1, idx)).float()).sum(-1)
            tm[bi, hi] = mass.mean()
            ol[bi, hi] = (outside / mass).mean()
            ot[bi, hi] = (elsewhere / mass).mean()
    return HeadStats(tm.mean(0).cpu(), ol.mean(0).cpu(), ot.mean(0).cpu())


def classify_heads(stats: HeadStats, *, uniform_below: float = 0.3, local_share: float = 0.5) -> list[str]:
    """One of ``HEAD_TYPES`` per head of ``stats``.

    ``uniform``: top mass below ``uniform_below`` (a head spreading its mass: chance is ``top_frac``, so its
    top keys hold little and any sparse mask drops much); else ``local`` when at least ``local_share`` of the
    top mass lies inside the local window (fixed windows serve them); else ``temporal`` when at least
    ``local_share`` of it lies at the query's own position in other frames (SVG1's temporal mask serves them;
    needs ``stats.outside_temporal``); else ``content`` (the top keys are elsewhere: only a content-aware
    selection finds them)."""
    if not 0.0 < uniform_below < 1.0 or not 0.0 < local_share < 1.0:
        raise ValueError(f"uniform_below={uniform_below} and local_share={local_share} must be in (0, 1)")
    n = stats.top_mass.numel()
    ot = stats.outside_temporal.tolist() if stats.outside_temporal is not None else [1.0] * n
    out = []
    for tm, ol, tl in zip(stats.top_mass.tolist(), stats.outside_local.tolist(), ot, strict=True):
        if tm < uniform_below:
            out.append("uniform")
        elif 1.0 - ol >= local_share:
            out.append("local")
        elif 1.0 - tl >= local_share:
            out.append("temporal")
        else:
            out.append("content")
    return out


class TopKMass:
    """The exact attention of one head's query rows, sorted once: the top-k mass at any k is then a lookup.

    Args:
        p: (r, Sv) exact attention probabilities of r query rows over the video keys (float64 advised).
        text: (r,) the rows' mass on real text keys (always kept by every method, so part of every bound).
    Holds two cumulative sums of r * Sv entries (at Wan 14B 720p and 256 rows, 2 x 155 MB in float64)."""

    def __init__(self, p: torch.Tensor, text: torch.Tensor | None = None) -> None:
        self.rows, self.keys = p.shape
        self.text = torch.zeros(self.rows, dtype=p.dtype, device=p.device) if text is None else text
        srt = p.sort(dim=-1, descending=True).values
        # the pooled order sorts the row-sorted pairs again (any order would do; this one is already sorted runs)
        self._pooled = _cumsum0(srt.flatten().sort(descending=True).values)
        self._per_row = _cumsum0(srt)

    def pooled(self, pairs: float) -> float:
        """Mean recall over the rows of the best mask keeping ``pairs`` (row, video key) pairs in all, however it
        spreads them over the rows (a fractional last pair counts in proportion)."""
        return float((self.text.sum() + _take(self._pooled, pairs)) / self.rows)

    def per_row(self, keys: float) -> float:
        """Mean recall over the rows of the best mask keeping ``keys`` video keys on every row."""
        return float((self.text + _take(self._per_row, keys)).mean())


def _cumsum0(srt: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along the last dim with a leading 0: ``out[..., j]`` = sum of the j largest entries."""
    return torch.nn.functional.pad(srt.cumsum(-1), (1, 0))


def _take(cs: torch.Tensor, count: float) -> torch.Tensor:
    """Sum of the ``count`` largest entries from ``_cumsum0`` of a descending sort; a fractional last entry
    counts in proportion (the fractional-knapsack bound, exact at integer counts)."""
    n = cs.shape[-1] - 1
    count = min(max(float(count), 0.0), float(n))
    whole = min(int(math.floor(count)), n)
    total = cs[..., whole]
    if whole < n:  # the next entry is the difference of two cumulative sums
        total = total + (count - whole) * (cs[..., whole + 1] - cs[..., whole])
    return total


@dataclass(frozen=True)
class RecallBound:
    """Recall bounds on the sampled rows, float64, shaped like ``density`` (per (batch, head): (B, H)).

    ``pooled``: the mass of the top ``density * r * Sv`` (row, video key) pairs of the r rows by exact attention
    weight (a fractional last pair counts in proportion): no mask keeping that many pairs on these rows keeps
    more, whatever its shape or budget split across rows (the bound to compare every method's recall with).
    ``per_row``: each row's top ``density * Sv`` keys: the bound for masks giving every query row the same
    budget (never above ``pooled``: a method with one budget per head may give concentrated rows more, so
    SVG2's clusters or top-p selection can exceed it)."""

    density: float | torch.Tensor
    pooled: torch.Tensor
    per_row: torch.Tensor


@torch.no_grad()
def recall_bound(q: torch.Tensor, k: torch.Tensor, density: float | torch.Tensor, *,
                 rows: torch.Tensor | None = None, scale: float | None = None, num_text_tokens: int = 0,
                 text_mask: torch.Tensor | None = None) -> RecallBound:
    """The largest attention recall a mask of token-pair ``density`` (over the video x video block) reaches.

    Recall is measured as in ``analysis.recall.attention_recall`` (text keys always kept, padded text keys
    masked), on the video query ``rows`` (default: all). With all rows ``pooled`` is exact: the top-k pairs
    of the head by exact weight. With sampled rows it bounds a mask holding ``density`` of the pairs of those
    rows (exact when ``density`` is the mask's own kept share on them, as ``analysis.recall`` passes it); a mask
    of that density over all rows holds that share only on average over the draw of rows, so there it is an
    estimate of the bound.

    Args:
        q, k: (B, H, S, D), video tokens then ``num_text_tokens`` text tokens.
        density: in [0, 1]: one float for every head, or a tensor (..., B, H) of densities per head (every
            density of a head is read off one sort of its attention).
    """
    b, h, s, d = q.shape
    dens = torch.as_tensor(density, dtype=torch.float64).cpu()
    if dens.numel() == 0 or float(dens.min()) < 0.0 or float(dens.max()) > 1.0:
        raise ValueError(f"density={density} must be in [0, 1]")
    if dens.dim() == 0:
        dens = dens.expand(b, h)
    if tuple(dens.shape[-2:]) != (b, h):
        raise ValueError(f"density of shape {tuple(dens.shape)} must be a float or (..., B={b}, H={h})")
    flat = dens.reshape(-1, b, h)
    sv = s - num_text_tokens
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = torch.arange(sv, device=q.device) if rows is None else rows.to(q.device)
    r = rows.numel()
    real = torch.ones(b, s, dtype=torch.bool, device=q.device)
    if text_mask is not None:
        real[:, sv:] = text_mask.to(q.device)
    pooled = torch.zeros(flat.shape, dtype=torch.float64)
    per_row = torch.zeros_like(pooled)
    for bi in range(b):  # one head's (r, S) float64 attention at a time
        for hi in range(h):
            sc = (q[bi, hi, rows].double() @ k[bi, hi].double().T) * scale
            p = torch.softmax(sc.masked_fill(~real[bi], float("-inf")), dim=-1)
            top = TopKMass(p[:, :sv], p[:, sv:].sum(-1))
            for n, dn in enumerate(flat[:, bi, hi].tolist()):
                pooled[n, bi, hi] = top.pooled(dn * r * sv)
                per_row[n, bi, hi] = top.per_row(dn * sv)
    out_density = float(density) if isinstance(density, float | int) else dens
    return RecallBound(out_density, pooled.reshape(dens.shape).to(q.device),
                       per_row.reshape(dens.shape).to(q.device))
