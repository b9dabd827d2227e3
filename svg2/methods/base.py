"""One interface for every attention method: ``method(q, k, v, ctx) -> out`` (DESIGN.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from svg2.attention import ClusterState
from svg2.clustering import HeadSlice
from svg2.timing import ComponentTimer

__all__ = ["AttentionContext", "AttentionMethod", "MethodState", "register_method", "build_method",
           "available_methods", "compensation_record"]


class MethodState:
    """Everything one pipeline's attention methods keep between calls. Owned by the caller (e.g. the handle
    that ``enable_svg2`` returns): per-call-site cluster states and the per-call records for stats."""

    def __init__(self, timer: ComponentTimer | None = None) -> None:
        self._clusters: dict[tuple[Any, ...], ClusterState] = {}
        self._cache: dict[tuple[Any, ...], Any] = {}
        self.records: list[dict[str, Any]] = []
        self.timer = timer

    def cluster_state(self, *key: Any) -> ClusterState:
        if key not in self._clusters:
            self._clusters[key] = ClusterState()
        return self._clusters[key]

    def cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for this pipeline (static masks on the device, their kernel plans);
        kept until ``reset()``. The value is shared: never modify it in place."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def record(self, **row: Any) -> None:
        self.records.append(row)

    def reset(self) -> None:
        """Forget centroids and records (call between videos)."""
        self._clusters.clear()
        self._cache.clear()
        self.records.clear()
        if self.timer is not None:
            self.timer.reset()

    def resolved_records(self) -> list[dict[str, Any]]:
        """Records with tensor values turned into Python floats (one sync)."""
        out = []
        for r in self.records:
            out.append({k: (float(v.float().mean()) if isinstance(v, torch.Tensor) else v) for k, v in r.items()})
        return out


@dataclass
class AttentionContext:
    """Where an attention call happens. ``state`` is owned by the caller and shared across calls."""

    layer_index: int = 0
    step_index: int = 0
    num_steps: int = 1
    branch: str = "cond"
    num_text_tokens: int = 0
    text_mask: torch.Tensor | None = None
    scale: float | None = None
    state: MethodState = field(default_factory=MethodState)
    check_finite: bool = True
    # Which of the model's heads q, k, v hold when they hold only some (a Ulysses rank's share): cold k-means
    # starts draw per head, so the split does not change the result. None: all heads.
    heads: HeadSlice | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def site(self) -> tuple[Any, ...]:
        return (self.layer_index, self.branch)


class AttentionMethod:
    """Base class. Subclasses set ``name`` and implement ``__call__``."""

    name: str = "base"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def is_dense_call(self, ctx: AttentionContext) -> bool:
        """Whether this call runs dense under the method's warm-up schedule (default: always)."""
        return True

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


def compensation_record(cfg: Any, state: ClusterState) -> dict[str, Any]:
    """The per-call record fields of the issue-17 options: where the sparse LSE came from and which
    compensation backend ran (when compensating), and whether the layout was reused (when reusing)."""
    row: dict[str, Any] = {}
    if getattr(cfg, "compensate", False):
        row["lse"] = state.last_kernels.get("lse")
        row["compensation"] = state.last_kernels.get("compensation")
    if getattr(cfg, "layout_every", 1) > 1:
        row["layout_reused"] = state.last_layout_reused
    return row


def dense_schedule(dense_steps_frac: float, dense_layers: int, ctx: AttentionContext) -> bool:
    """The shared warm-up rule: the first floor(frac * num_steps) steps and first ``dense_layers`` blocks."""
    return ctx.step_index < math.floor(dense_steps_frac * ctx.num_steps) or ctx.layer_index < dense_layers


_METHODS: dict[str, Callable[..., AttentionMethod]] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("svg2")``."""

    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def build_method(name: str, **kwargs: Any) -> AttentionMethod:
    if name not in _METHODS:
        raise KeyError(f"unknown attention method {name!r}; available: {available_methods()}")
    return _METHODS[name](**kwargs)
