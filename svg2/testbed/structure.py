"""Attention structure of a Wan-class transformer on clips: how concentrated, how local, per head.

For each self-attention call the probe records Q, K, V (after QK-norm and RoPE, as the attention kernel
sees them) and measures on sampled query rows of every head:
- ``top_mass``: the share of the row's exact softmax mass held by its top ``top_frac`` keys;
- ``outside_local``: the share of that top mass lying outside a local window around the query
  (``window`` = (frames, rows, cols) half-widths on the token grid): near 0 for positional heads, near 1
  for heads that look things up by content far away;
- ``outside_temporal``: the share of the top mass lying outside the query's own spatial neighbourhood
  (``column`` = (rows, cols) half-widths) in every frame: near 0 for temporal heads (SVG1's kind), which
  follow one position through time beyond the local window.
The raw Q/K/V of a call can be kept (``keep_qkv``) for the recall analysis of sparse methods:
- ``classify_heads``: every head of a call is ``uniform`` (top mass below a threshold: pooling heads),
  ``local`` (most of its top mass inside the local window), ``temporal`` (most of it at the query's position
  in other frames) or ``content`` (most of it elsewhere);
- ``recall_bound``: the largest attention recall any mask of a given density can reach (top-k exact weights);
- ``bound_rows`` / ``tag_head_types``: the ``bound`` rows next to the recall rows of ``analysis.recall`` and
  each row's head type (``experiments/testbed_structure.py`` joins them); ``summarize_by`` /
  ``head_type_markdown`` turn them into per-method and per-head-type tables.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

__all__ = ["HEAD_TYPES", "BOUND", "HeadStats", "RecallBound", "StructureProbe", "bound_rows", "classify_heads",
           "head_stats", "head_type_markdown", "recall_bound", "summarize_by", "tag_head_types"]

HEAD_TYPES = ("uniform", "local", "temporal", "content")
BOUND = "bound"  # method label of the top-k recall bound rows


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


@dataclass(frozen=True)
class RecallBound:
    """Per (batch, head) float64 recall bounds on the sampled rows at one density.

    ``pooled``: the mass of the top ``density * r * Sv`` (row, video key) pairs of the r rows by exact attention
    weight (a fractional last pair counts in proportion): no mask keeping that many pairs on these rows keeps
    more, whatever its shape or budget split across rows (the bound to compare every method's recall with).
    ``per_row``: each row's top ``density * Sv`` keys: the bound for masks giving every query row the same
    budget (never above ``pooled``: a method with one budget per head may give concentrated rows more)."""

    density: float
    pooled: torch.Tensor
    per_row: torch.Tensor


@torch.no_grad()
def recall_bound(q: torch.Tensor, k: torch.Tensor, density: float, *, rows: torch.Tensor | None = None,
                 scale: float | None = None, num_text_tokens: int = 0,
                 text_mask: torch.Tensor | None = None) -> RecallBound:
    """The largest attention recall a mask of token-pair ``density`` (over the video x video block) reaches.

    Recall is measured as in ``analysis.recall.attention_recall`` (text keys always kept, padded text keys
    masked), on the video query ``rows`` (default: all). With all rows ``pooled`` is exact: the top-k pairs
    of the head by exact weight. With sampled rows it bounds a mask holding ``density`` of the pairs of those
    rows; a mask of that density over all rows holds that share only on average over the draw of rows, so
    there it is an estimate of the bound (exact in expectation only up to the draw's spread).

    Args:
        q, k: (B, H, S, D), video tokens then ``num_text_tokens`` text tokens.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]")
    b, h, s, d = q.shape
    sv = s - num_text_tokens
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = torch.arange(sv, device=q.device) if rows is None else rows.to(q.device)
    r = rows.numel()
    real = torch.ones(b, s, dtype=torch.bool, device=q.device)
    if text_mask is not None:
        real[:, sv:] = text_mask.to(q.device)
    pooled = torch.zeros(b, h, dtype=torch.float64, device=q.device)
    per_row = torch.zeros_like(pooled)
    for bi in range(b):  # one (r, S) float64 matrix at a time: 16 MB at 256 rows x 8k tokens
        for hi in range(h):
            sc = (q[bi, hi, rows].double() @ k[bi, hi].double().T) * scale
            p = torch.softmax(sc.masked_fill(~real[bi], float("-inf")), dim=-1)
            text = p[:, sv:].sum(-1)  # (r,)
            pv = p[:, :sv]
            per_row[bi, hi] = (text + _top_mass(pv, density * sv)).mean()
            pooled[bi, hi] = (text.sum() + _top_mass(pv.reshape(-1), density * r * sv)) / r
    return RecallBound(float(density), pooled, per_row)


def _top_mass(values: torch.Tensor, count: float) -> torch.Tensor:
    """Sum of the ``count`` largest entries along the last dim; a fractional last entry counts in proportion
    (the fractional-knapsack bound: exact at integer counts). A selection (kthvalue), not a sort."""
    n = values.shape[-1]
    whole = min(int(math.floor(count)), n)
    if whole >= n:
        return values.sum(-1)
    nxt = -torch.kthvalue(-values, whole + 1, dim=-1).values  # the (whole + 1)-th largest
    above = values > nxt.unsqueeze(-1)
    # entries above it, then ties with it up to ``whole`` entries, then the fractional part of the next one
    total = (values * above).sum(-1) + (whole - above.sum(-1)).to(values.dtype) * nxt
    return total + (count - whole) * nxt


def bound_rows(records: Sequence[dict[str, Any]], density: float, rows: Sequence[torch.Tensor | None], *,
               device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """One ``BOUND`` row per (record, batch, head), shaped like the rows of ``analysis.recall.recall_sweep``:
    recall = ``recall_bound(...).pooled`` at ``density`` on ``rows[i]`` (record i's sampled video query rows,
    the ones its methods were measured on; None: all), ``per_row`` as ``recall_row``, no output error."""
    if len(rows) != len(records):
        raise ValueError(f"{len(records)} records but {len(rows)} row sets: pass one (or None) per record")
    out = []
    for ri, (rec, sampled) in enumerate(zip(records, rows, strict=True)):
        q, k = (rec[name].to(device=device, dtype=torch.float32) for name in ("q", "k"))
        heads = rec.get("heads") or list(range(q.shape[1]))
        bound = recall_bound(q, k, density, rows=sampled, scale=rec.get("scale"),
                             num_text_tokens=int(rec.get("num_text_tokens", 0)), text_mask=rec.get("text_mask"))
        for bi in range(q.shape[0]):
            for hi, head in enumerate(heads):
                out.append(dict(record=ri, layer=int(rec.get("layer", 0)), step=int(rec.get("step", 0)),
                                branch=str(rec.get("branch", "cond")), batch=bi, head=int(head), method=BOUND,
                                kwargs="{}", density=density, recall=float(bound.pooled[bi, hi]),
                                recall_row=float(bound.per_row[bi, hi]), rel_error=None))
    return out


def tag_head_types(rows: list[dict[str, Any]], records: Sequence[dict[str, Any]], *, uniform_below: float = 0.3,
                   local_share: float = 0.5) -> list[dict[str, Any]]:
    """Sets ``row["head_type"]`` (``classify_heads`` of ``records[row["record"]]["stats"]``, as
    ``StructureProbe`` keeps them) on every row whose record has stats; returns ``rows``."""
    types = {}
    for ri, rec in enumerate(records):
        if rec.get("stats") is not None:
            types[ri] = classify_heads(rec["stats"], uniform_below=uniform_below, local_share=local_share)
    for row in rows:
        if row["record"] in types:
            row["head_type"] = types[row["record"]][row["head"]]
    return rows


def summarize_by(rows: Iterable[dict[str, Any]], key: str | None = None
                 ) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Mean ``recall``, ``rel_error`` (None when no row has one, as for ``BOUND``) and ``density`` per method,
    grouped by ``row[key]`` (one group ``"all"`` when ``key`` is None): ``{group: {method: {...,"n"}}}``."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        group = "all" if key is None else str(row.get(key, "unknown"))
        for name in ("recall", "rel_error", "density"):
            if row.get(name) is not None:
                acc[group][row["method"]][name].append(float(row[name]))
        acc[group][row["method"]]["n"].append(1.0)
    return {g: {m: {"recall": _mean(v["recall"]), "rel_error": _mean(v["rel_error"]), "density": _mean(v["density"]),
                    "n": len(v["n"])} for m, v in per.items()} for g, per in acc.items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def head_type_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A markdown table: one line per head type, one column per method with mean recall / output error @
    measured density (the ``BOUND`` column: recall at its density only), and the head-call count of every type.
    A method whose measured density is above the bound's may exceed it."""
    table = summarize_by(rows, "head_type")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in methods if m != BOUND] + ([BOUND] if BOUND in methods else [])
    head = [f"{m}: recall / error @ density" if m != BOUND else f"{m}: recall" for m in methods]
    lines = ["| head type | head calls | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(methods)]
    for t in [t for t in (*HEAD_TYPES, "unknown") if t in table]:
        per = table[t]
        n = max(v["n"] for v in per.values())  # every method has one row per head call
        cells = []
        for m in methods:
            v = per.get(m)
            if v is None:
                cells.append("-")
            elif v["rel_error"] is None:
                cells.append(f"{v['recall']:.3f}")
            else:
                cells.append(f"{v['recall']:.3f} / {v['rel_error']:.3f} @ {v['density']:.2f}")
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    return lines


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
    call's q, k, v (B, H, S, D), its ``stats`` and ``video_shape`` (= grid) go to ``qkv`` too, ready for
    ``head_type_recall`` (``tag`` is set by the caller before each forward)."""

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
        if self.keep_qkv:  # with the call's head stats (head types) and geometry (SVG1 and friends need it)
            self.qkv.append({"layer": layer, **self.tag, "q": q.detach(), "k": k.detach(), "v": v.detach(),
                             "stats": stats, "video_shape": self.grid})

    def remove(self) -> None:
        for attn, proc in self._saved:
            attn.set_processor(proc)
        self._saved = []
