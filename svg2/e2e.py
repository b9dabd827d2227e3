"""The arithmetic of the end-to-end benchmark (``experiments/bench_e2e.py``): the 50-step projection, the limit a
perfect sparse kernel would reach, and attention efficiency per layer from a run's per-layer timings."""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

__all__ = ["NUM_STEPS", "projection", "limit_ms", "layer_efficiency", "per_layer"]

NUM_STEPS = 50


def projection(t_dense: float, t_warmup_step: float, t_cold: float, t_sparse: float, frac: float,
               calls_per_step: int = 2, num_steps: int = NUM_STEPS) -> dict[str, Any]:
    """Transformer time of a ``num_steps`` generation, in seconds (times in ms per transformer call): dense
    baseline every step; with SVG2 the first floor(frac * num_steps) steps at ``t_warmup_step`` (our processor,
    dense), the first sparse step cold, the rest at ``t_sparse``. ``calls_per_step``: 2 with CFG, 1 without."""
    n_dense = math.floor(frac * num_steps)
    c = calls_per_step
    dense_total = num_steps * c * t_dense
    svg2_total = n_dense * c * t_warmup_step + c * t_cold + (num_steps - n_dense - 1) * c * t_sparse
    return {"dense_s": dense_total / 1e3, "svg2_s": svg2_total / 1e3, "speedup": dense_total / svg2_total,
            "dense_steps": n_dense, "calls_per_step": c}


def limit_ms(t_dense: float, attention_ms_per_forward: float, density: float) -> float:
    """One forward with a perfect sparse kernel and no overhead: the self-attention time scales with the density
    (``density * t_attention``), nothing else changes."""
    return t_dense - (1.0 - density) * attention_ms_per_forward


def layer_efficiency(dense_ms: Mapping[Hashable, float], sparse_attention_ms: Mapping[Hashable, float],
                     density: float, measured_density: Mapping[Hashable, float] | None = None,
                     call_ms: Mapping[Hashable, float] | None = None) -> dict[str, Any]:
    """Attention efficiency of every sparse layer: ``density * dense attention ms / sparse attention ms`` of that
    layer (1.0 = the sparse kernel is as fast per kept token pair as dense attention), and the mean over layers.

    ``dense_ms``: per layer, the dense attention of a warm-up step; ``sparse_attention_ms``: per sparse layer,
    the attention kernel of a sparse step (its ``attention`` sections); ``measured_density``: per layer, the
    density that ran (adds ``efficiency_measured``, the same with it); ``call_ms``: per layer, the whole sparse
    call (k-means ... attention; adds ``call_efficiency``)."""
    rows: list[dict[str, Any]] = []
    for layer in sorted(sparse_attention_ms, key=lambda x: (str(type(x)), x)):
        attn = sparse_attention_ms[layer]
        if layer not in dense_ms or attn <= 0:
            continue
        row: dict[str, Any] = {"layer": layer, "dense_ms": dense_ms[layer], "attention_ms": attn,
                               "efficiency": density * dense_ms[layer] / attn}
        if measured_density is not None and layer in measured_density:
            row["density"] = measured_density[layer]
            row["efficiency_measured"] = measured_density[layer] * dense_ms[layer] / attn
        if call_ms is not None and layer in call_ms and call_ms[layer] > 0:
            row["call_ms"] = call_ms[layer]
            row["call_efficiency"] = density * dense_ms[layer] / call_ms[layer]
        rows.append(row)

    def mean(key: str) -> float | None:
        xs = [r[key] for r in rows if key in r]
        return statistics.mean(xs) if xs else None

    return {"layers": rows, "mean": mean("efficiency"), "mean_measured": mean("efficiency_measured"),
            "min": min((r["efficiency"] for r in rows), default=None),
            "max": max((r["efficiency"] for r in rows), default=None), "call_mean": mean("call_efficiency")}


def per_layer(summary_by_tag: Mapping[Hashable, Mapping[str, Mapping[str, float]]], section: str,
              calls: int, layers: Sequence[Hashable] | None = None) -> dict[Hashable, float]:
    """Milliseconds per call of ``section`` per layer, from ``ComponentTimer.summary_by_tag()`` over ``calls``
    forwards (a section entered more than once per call, e.g. HunyuanVideo's text queries, is summed)."""
    keep = None if layers is None else set(layers)
    return {tag: s[section]["total_ms"] / calls for tag, s in summary_by_tag.items()
            if section in s and (keep is None or tag in keep)}
