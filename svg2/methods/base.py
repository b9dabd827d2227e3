"""One interface for every attention method: ``method(q, k, v, ctx) -> out``."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from svg2.attention import ClusterState
from svg2.clustering import HeadSlice
from svg2.config import SVG2Config
from svg2.timing import ComponentTimer

__all__ = ["AttentionContext", "AttentionMethod", "MethodState", "register_method", "build_method",
           "available_methods", "method_class", "compensation_record", "check_target_density"]


class MethodState:
    """Everything one pipeline's attention methods keep between calls. Owned by the caller (e.g. the handle
    that ``enable_svg2`` returns): per-call-site cluster states and the per-call records for stats."""

    def __init__(self, timer: ComponentTimer | None = None) -> None:
        self._clusters: dict[tuple[Any, ...], ClusterState] = {}
        self._cache: dict[tuple[Any, ...], Any] = {}
        self.records: list[dict[str, Any]] = []
        self.timer = timer
        # CUDA graphs of the sparse calls (SVG2Config.cuda_graph): created at the first call that asks, kept
        # across reset() (they are keyed on shapes, and every replay first copies the site's current centroids
        # in), dropped by drop_graphs() (handle.remove()). ``graph_backend``: None = torch.cuda; tests inject one.
        self.graphs: Any = None
        self.graph_backend: Any = None

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

    def graph_cache(self) -> Any:
        """This pipeline's ``svg2.cuda_graph.GraphCache`` (created on first use)."""
        if self.graphs is None:
            from svg2.cuda_graph import GraphCache

            self.graphs = GraphCache(self.graph_backend)
        return self.graphs

    def drop_graphs(self) -> None:
        """Release the captured graphs and their static buffers."""
        self.graphs = None

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
    """Base class. Subclasses set ``name`` and implement ``__call__``.

    What a method takes is a property of its class, so configs name the class and its parameters only:
    :meth:`parameters` (derived from the constructor), :meth:`shared_parameters` (the SVG2Config knobs it shares
    with SVG2, which a harness fills from the model preset) and ``stock``.
    """

    name: str = "base"
    # The pipeline's own attention, untouched (the true dense baseline): there is nothing to install.
    stock: ClassVar[bool] = False
    # SVG2Config fields this method shares with SVG2 (dense warm-up schedule, kernel, target_density, ...): their
    # values default from the model preset's SVG2 settings, so every method of a comparison runs the same schedule.
    # Only those the constructor takes count. A method taking ``cfg: SVG2Config`` shares every field.
    shared_knobs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def takes_config(cls) -> bool:
        """Whether the constructor takes the whole SVG2Config as ``cfg``."""
        return "cfg" in _init_parameters(cls)[0]

    @classmethod
    def parameters(cls) -> frozenset[str]:
        """The keyword arguments the constructor takes (for a method taking ``cfg``: its other arguments and
        every SVG2Config field, which it applies to ``cfg``). A subclass narrows this where its constructor
        accepts a knob at one value only (e.g. ``compensate`` for a method that always compensates)."""
        names, open_kwargs = _init_parameters(cls)
        if "cfg" in names:
            return frozenset(names - {"cfg"}) | frozenset(SVG2Config.field_names())
        if open_kwargs:
            raise TypeError(f"{cls.__qualname__}.__init__ takes **kwargs that reach no named parameter: override "
                            "parameters() to say which keywords it takes")
        return frozenset(names)

    @classmethod
    def shared_parameters(cls) -> frozenset[str]:
        """The SVG2Config fields this method takes from the shared SVG2 settings (see ``shared_knobs``)."""
        if cls.takes_config():
            return frozenset(SVG2Config.field_names())
        return frozenset(cls.shared_knobs) & cls.parameters()

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


def check_target_density(target_density: float | None) -> float | None:
    """The matched-density knob the methods share (a matched-density sweep sets it on each): a share of the token
    pairs in (0, 1], or None (the method's own rule). Returned unchanged; a value outside the range is refused."""
    if target_density is not None and not 0.0 < target_density <= 1.0:
        raise ValueError(f"target_density={target_density} must be in (0, 1] or None")
    return target_density


def dense_schedule(dense_steps_frac: float, dense_layers: int, ctx: AttentionContext) -> bool:
    """The shared warm-up rule: the first floor(frac * num_steps) steps and first ``dense_layers`` blocks."""
    return ctx.step_index < math.floor(dense_steps_frac * ctx.num_steps) or ctx.layer_index < dense_layers


def _init_parameters(cls: type) -> tuple[set[str], bool]:
    """Named keyword parameters of ``cls.__init__``, following ``**kwargs`` up the MRO to the base constructors
    that receive them; and whether a ``**kwargs`` is still open at the top (goes nowhere named)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return names, False
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params) or "cfg" in names:  # cfg methods apply **kw to cfg
            return names, False
    return names, True


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


def method_class(ref: str) -> type[AttentionMethod]:
    """The class of a registered method name (``"svg2"``) or of an import path (``"pkg.module:Class"``)."""
    if ":" not in ref:
        if ref not in _METHODS:
            raise KeyError(f"unknown attention method {ref!r}; available: {available_methods()} "
                           "(or an import path 'pkg.module:Class')")
        return _METHODS[ref]  # type: ignore[return-value]
    module, _, attr = ref.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"attention method {ref!r} cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, AttentionMethod)):
        raise TypeError(f"{ref!r} is not an AttentionMethod subclass")
    return cls


def build_method(name: str, **kwargs: Any) -> AttentionMethod:
    """Build a registered method (or ``"pkg.module:Class"``) with its constructor arguments."""
    return method_class(name)(**kwargs)
