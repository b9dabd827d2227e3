"""Attention structure of a Wan-class transformer on clips: how concentrated, how local, per head.

``StructureProbe`` installs processors on every block's self-attention that record Q, K, V (after QK-norm and
RoPE, as the attention kernel sees them) and measure every head with ``head_stats`` (top mass, share outside
the local window, share outside the query's own position through time). The raw Q/K/V of a call can be kept
(``keep_qkv``) for the recall analysis of sparse methods. The measures themselves are model-agnostic and live
in ``svg2.attention_structure`` (``head_stats``, ``classify_heads``, ``recall_bound``; re-exported here);
this module adds what joins them to recall rows:
- ``bound_rows`` / ``tag_head_types``: the ``bound`` rows next to the recall rows of ``analysis.recall`` and
  each row's head type from the probe's stats (``experiments/testbed_structure.py`` joins them); ``summarize_by``
  / ``head_type_markdown`` turn them into per-method and per-head-type tables at one density.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

# The model-agnostic measures live in svg2.attention_structure (analysis.recall uses them too); re-exported here
# for the callers that name this module.
from svg2.attention_structure import (
    BOUND,
    HEAD_TYPES,
    HeadStats,
    RecallBound,
    classify_heads,
    head_stats,
    recall_bound,
)
from svg2.mini.structure import wan_rope

__all__ = ["HEAD_TYPES", "BOUND", "HeadStats", "RecallBound", "StructureProbe", "bound_rows", "classify_heads",
           "head_stats", "head_type_markdown", "recall_bound", "summarize_by", "tag_head_types"]


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
                q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
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
