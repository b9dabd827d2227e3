"""Configuration dataclasses. Frozen, validated on construction, and usable as Hydra structured configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from svg2_kernels.plan import TileConfig

__all__ = ["SVG2Config", "KERNEL_FIELDS"]

# Set by the harness's `kernel` config group only (one place per knob).
KERNEL_FIELDS = ("attention_kernel", "kmeans_kernel", "attention_tiles")


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"SVG2Config.{name}={value!r} is out of range; allowed: {bracket}{lo}, {hi}]")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SVG2Config.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < lo:
        raise ValueError(f"SVG2Config.{name}={value} is out of range; allowed: integers >= {lo}")


def _check_kernel_names(attention: str, kmeans: str) -> None:
    """A kernel name must be registered (or "auto"): a typo fails here, when the config is built, not at the
    first sparse step after minutes of dense warm-up. Whether the kernel runs on these inputs is decided later."""
    from svg2_kernels.registry import get_attention_variant, get_kmeans_variant

    for field_name, value, get in (("attention_kernel", attention, get_attention_variant),
                                   ("kmeans_kernel", kmeans, get_kmeans_variant)):
        if value != "auto":
            try:
                get(value)
            except KeyError as e:
                raise KeyError(f"SVG2Config.{field_name}: {e.args[0]}") from None


@dataclass(frozen=True)
class SVG2Config:
    """Every knob of Sparse VideoGen2 (the model presets in conf/model/ carry the authors' settings).

    Clustering:
        num_q_centroids / num_k_centroids: query / key clusters per (batch, head). Capped at the sequence
            length when a sequence is shorter (documented behaviour, not an error).
        kmeans_iters_init: Lloyd iterations of the first (cold) call per (layer, CFG branch).
        kmeans_iters_step: Lloyd iterations of later calls, warm-started from the cached centroids.
        order_key_clusters: at each cold start, reorder the key clusters along a nearest-neighbour chain of
            their centroids so that co-selected clusters are adjacent (longer key runs, fewer partial
            kernel tiles; warm starts keep the order). Changes only the tiling, not the result.
    Selection:
        top_p: keep, per query cluster, the shortest prefix of key clusters (sorted by estimated attention
            mass) whose mass reaches top_p.
        min_kc_ratio: never keep fewer than ceil(min_kc_ratio * Ck) key clusters per query cluster.
        target_density: if set, replaces top_p: keep the highest-scoring cluster pairs (by estimated mass
            per token pair) until the token-pair density reaches this fraction, per (batch, head).
    Schedule:
        dense_steps_frac: the first floor(dense_steps_frac * num_steps) denoising steps run dense.
        dense_layers: the first dense_layers transformer blocks always run dense.
        seed_centroids_in_warmup: run k-means in the last dense step so the first sparse step is warm.
    Beyond dropping (issue 17):
        compensate: skipped key clusters still contribute through their centroid and mean value
            (``n_j * exp(q . c_j * scale)`` in the softmax denominator, times ``mean(v_j)`` in the numerator),
            merged with the sparse result through its log-sum-exp (see ``svg2.compensation``).
        layout_every: cluster and select at every N-th sparse call of a call site (layer x CFG branch, one
            call per denoising step) and reuse that layout in between; values, keys and the compensation
            terms still come from the current call. 1 = a fresh layout at every step.
    Kernels:
        attention_kernel / kmeans_kernel: kernel name (``svg2_kernels.available_attention_variants()``:
            triton_tma, triton_chunks, flex, torch; k-means: triton, flash_kmeans, torch) or "auto" (the
            fastest that accepts the inputs; the kernel that ran is recorded).
        attention_tiles: tile overrides of the Triton attention kernels (``svg2_kernels.TileConfig`` or a
            mapping of its fields); None or unset fields: the kernel's measured defaults.
    Execution (never changes results):
        cuda_graph: opt-in CUDA-graph replay of the warm sparse call per call site and input signature (the
            cold call and the first warm call run eagerly; see ``svg2.cuda_graph`` and
            notes/cuda_graph_replay.md). Configurations or inputs that cannot be captured safely run eagerly
            (the reason is logged once). Left out of ``to_dict()`` while False, so results keyed on the config
            before this knob existed keep their keys.
    seed: seeds k-means initialisation (deterministic under a seed).
    """

    num_q_centroids: int = 100
    num_k_centroids: int = 500
    top_p: float = 0.9
    min_kc_ratio: float = 0.10
    target_density: float | None = None
    kmeans_iters_init: int = 50
    kmeans_iters_step: int = 2
    order_key_clusters: bool = True
    dense_steps_frac: float = 0.2
    dense_layers: int = 1
    seed_centroids_in_warmup: bool = False
    compensate: bool = False
    layout_every: int = 1
    attention_kernel: str = "auto"
    kmeans_kernel: str = "auto"
    attention_tiles: TileConfig | None = None
    seed: int = 0
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.attention_tiles is not None and not isinstance(self.attention_tiles, TileConfig):
            try:  # a mapping (Hydra node, to_dict() output): coerce; the dataclass stays frozen and hashable
                object.__setattr__(self, "attention_tiles", TileConfig.coerce(self.attention_tiles))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise TypeError(f"SVG2Config.attention_tiles must be a TileConfig or a mapping of its fields: {e}") \
                    from e
        _check_int("num_q_centroids", self.num_q_centroids, 1)
        _check_int("num_k_centroids", self.num_k_centroids, 1)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("min_kc_ratio", self.min_kc_ratio, 0.0, 1.0)
        if self.target_density is not None:
            _check_range("target_density", self.target_density, 0.0, 1.0, lo_open=True)
        _check_int("kmeans_iters_init", self.kmeans_iters_init, 1)
        _check_int("kmeans_iters_step", self.kmeans_iters_step, 0)
        _check_range("dense_steps_frac", self.dense_steps_frac, 0.0, 1.0)
        _check_int("dense_layers", self.dense_layers, 0)
        _check_int("seed", self.seed, 0)
        if isinstance(self.layout_every, int) and not isinstance(self.layout_every, bool) and self.layout_every < 1:
            raise ValueError(f"SVG2Config.layout_every={self.layout_every} must be >= 1: it is the number of denoising "
                             "steps one layout serves (1 = recompute the layout at every step)")
        _check_int("layout_every", self.layout_every, 1)
        for name in ("seed_centroids_in_warmup", "order_key_clusters", "compensate", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SVG2Config.{name} must be a bool")
        for name in ("attention_kernel", "kmeans_kernel"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"SVG2Config.{name} must be a non-empty string such as 'auto' or 'torch'")
        _check_kernel_names(self.attention_kernel, self.kmeans_kernel)

    def replace(self, **changes: Any) -> SVG2Config:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown SVG2Config field(s) {sorted(unknown)}; known: {self.field_names()}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SVG2Config:
        """Build from a plain mapping (e.g. a Hydra node); unknown keys are an error naming the known ones."""
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise KeyError(f"unknown SVG2Config key(s) {sorted(unknown)}; known keys: {cls.field_names()}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict; ``cuda_graph`` only when True (an execution option added later: configs
        without it keep the dict, and the result keys built from it, they had)."""
        d = dataclasses.asdict(self)
        if not self.cuda_graph:
            del d["cuda_graph"]
        return d
