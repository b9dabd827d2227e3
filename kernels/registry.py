"""Kernel variant registry, in the manner of xformers' operator dispatch.

Each variant declares what it supports (devices, dtypes, head dims, whether an optional package is
installed) and answers ``not_supported_reasons(inputs)``. ``select_*("auto", inputs)`` walks the variants
in priority order (fastest first) and returns the first that supports the inputs; when none does, the error
lists every variant and why it refused. Callers record ``variant.name`` so a run says which kernel ran.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from svg2_kernels import reference

__all__ = [
    "AttentionInputs",
    "KMeansInputs",
    "AttentionVariant",
    "KMeansVariant",
    "register_attention_variant",
    "register_kmeans_variant",
    "get_attention_variant",
    "get_kmeans_variant",
    "select_attention_variant",
    "select_kmeans_variant",
    "available_attention_variants",
    "available_kmeans_variants",
]


@dataclass(frozen=True)
class AttentionInputs:
    """What a variant needs to know to accept or refuse a variable-block attention call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    seqlen_q: int
    seqlen_k: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> AttentionInputs:
        return cls(q.device.type, q.dtype, q.shape[-1], q.shape[-2], k.shape[-2])


@dataclass(frozen=True)
class KMeansInputs:
    device_type: str
    dtype: torch.dtype
    dim: int
    num_points: int
    num_clusters: int

    @classmethod
    def of(cls, x: torch.Tensor, num_clusters: int) -> KMeansInputs:
        return cls(x.device.type, x.dtype, x.shape[-1], x.shape[-2], num_clusters)


class AttentionVariant:
    """Base class. ``forward`` has the signature of ``reference.varblock_attention_reference``."""

    name: str = "base"
    priority: int = 0  # higher is tried first by "auto"
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    head_dims: tuple[int, ...] | None = None  # None: any
    requires: tuple[str, ...] = ()  # importable packages this variant needs
    # An opt-in variant changes the numerics (e.g. FP8): "auto" never picks it, naming it does.
    opt_in: bool = False

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = [f"package '{p}' is not installed" for p in self.requires if not _has_package(p)]
        if inputs.device_type not in self.devices:
            reasons.append(f"device '{inputs.device_type}' not in {self.devices}")
        if inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not in {self.dtypes}")
        if self.head_dims is not None and inputs.head_dim not in self.head_dims:
            reasons.append(f"head dim {inputs.head_dim} not in {self.head_dims}")
        return reasons

    # A variant that can read Q in token order through the query permutation and write O back in token
    # order (fusing both permutation passes into the kernel) sets this and implements forward_token_order.
    fuses_query_permutation: bool = False

    def forward(self, q, k, v, q_offsets, k_offsets, block_map, scale=None):  # pragma: no cover
        raise NotImplementedError

    def forward_token_order(self, q, k, v, q_perm, q_offsets, k_offsets, block_map, scale=None):
        """Like ``forward`` but q (B, H, Sq, D) and the output are in token order; ``q_perm`` (B, H, Sq)
        maps sorted position -> token index."""
        qs = self.gather_rows(q, q_perm)
        out_sorted = self.forward(qs, k, v, q_offsets, k_offsets, block_map, scale)
        out = torch.empty_like(out_sorted)
        return out.scatter_(2, q_perm.unsqueeze(-1).expand_as(out_sorted), out_sorted)

    def gather_rows(self, x, perm):
        """x (B, H, S, D), perm (B, H, S) -> rows of x in perm order (the permutation step)."""
        return torch.gather(x, 2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, priority={self.priority})"


class KMeansVariant:
    """Base class. ``run(x, centroids, iters) -> (labels int64, centroids float32, sizes int64)``.

    Semantics (every variant): ``iters`` Lloyd iterations of (assign, update); the returned labels are the
    last assignment and the returned centroids are the means of exactly those clusters (empty clusters keep
    their previous centroid). With ``iters == 0`` it only assigns to the given centroids. A variant whose
    update already orders the points by cluster may return ``(labels, centroids, sizes, offsets, perm)``
    with ``perm`` equal to ``argsort(labels, stable=True)``; the layout then skips its own sort. A variant
    with ``sorts_points`` also accepts ``run(..., sort_x=True)`` and then appends ``x_sorted`` (N, S, D) =
    ``x[n, perm[n]]`` to those five outputs (the permuted keys the attention needs).
    """

    name: str = "base"
    sorts_points: bool = False
    priority: int = 0
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    requires: tuple[str, ...] = ()

    def not_supported_reasons(self, inputs: KMeansInputs) -> list[str]:
        reasons = [f"package '{p}' is not installed" for p in self.requires if not _has_package(p)]
        if inputs.device_type not in self.devices:
            reasons.append(f"device '{inputs.device_type}' not in {self.devices}")
        if inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not in {self.dtypes}")
        return reasons

    def run(self, x, centroids, iters):  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, priority={self.priority})"


def triton_interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``, the tests)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------------------------- torch


class TorchAttention(AttentionVariant):
    """Masked dense attention in float32, chunked over queries: exact, O(S^2) work, any device."""

    name = "torch"
    priority = 0

    def forward(self, q, k, v, q_offsets, k_offsets, block_map, scale=None):
        return reference.varblock_attention_reference(q, k, v, q_offsets, k_offsets, block_map, scale)


class TorchKMeans(KMeansVariant):
    name = "torch"
    priority = 0

    def run(self, x, centroids, iters):
        c = centroids.float()
        if iters == 0:
            labels = reference.kmeans_assign_reference(x, c)
            sizes = torch.zeros(c.shape[:2], dtype=torch.long, device=x.device)
            sizes.scatter_add_(1, labels, torch.ones_like(labels))
            return labels, c, sizes
        for _ in range(iters):
            labels = reference.kmeans_assign_reference(x, c)
            c, sizes = reference.kmeans_update_reference(x, labels, c)
        return labels, c, sizes


# ------------------------------------------------------------------------------------------ registry

_ATTENTION: dict[str, AttentionVariant] = {}
_KMEANS: dict[str, KMeansVariant] = {}
_LAZY_MODULES = ("svg2_kernels.varblock_attention", "svg2_kernels.varblock_fp8", "svg2_kernels.kmeans",
                 "svg2_kernels.flex")
_lazy_loaded = False


def register_attention_variant(variant: AttentionVariant) -> AttentionVariant:
    _ATTENTION[variant.name] = variant
    return variant


def register_kmeans_variant(variant: KMeansVariant) -> KMeansVariant:
    _KMEANS[variant.name] = variant
    return variant


register_attention_variant(TorchAttention())
register_kmeans_variant(TorchKMeans())


def _load_optional_variants() -> None:
    """Import kernel modules that register more variants (each guards its own optional imports)."""
    global _lazy_loaded
    if _lazy_loaded:
        return
    _lazy_loaded = True
    for mod in _LAZY_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def available_attention_variants() -> list[str]:
    _load_optional_variants()
    return sorted(_ATTENTION, key=lambda n: -_ATTENTION[n].priority)


def available_kmeans_variants() -> list[str]:
    _load_optional_variants()
    return sorted(_KMEANS, key=lambda n: -_KMEANS[n].priority)


def _get(table: dict, name: str, kind: str):
    _load_optional_variants()
    if name not in table:
        raise KeyError(f"unknown {kind} kernel variant {name!r}; known: {sorted(table)} (or 'auto')")
    return table[name]


def get_attention_variant(name: str) -> AttentionVariant:
    return _get(_ATTENTION, name, "attention")


def get_kmeans_variant(name: str) -> KMeansVariant:
    return _get(_KMEANS, name, "k-means")


def _select(table: dict, name: str, inputs, kind: str, order: Callable[[], list[str]]):
    if name != "auto":
        variant = _get(table, name, kind)
        reasons = variant.not_supported_reasons(inputs)
        if reasons:
            raise NotImplementedError(
                f"{kind} kernel variant {name!r} cannot run {inputs}: {'; '.join(reasons)}. "
                f"Use kernel 'auto' to pick a supported one."
            )
        return variant
    refusals = []
    for n in order():
        if getattr(table[n], "opt_in", False):
            refusals.append(f"  {n}: opt-in (changes the numerics): name it to use it")
            continue
        reasons = table[n].not_supported_reasons(inputs)
        if not reasons:
            return table[n]
        refusals.append(f"  {n}: {'; '.join(reasons)}")
    raise NotImplementedError(f"no {kind} kernel variant supports {inputs}:\n" + "\n".join(refusals))


def select_attention_variant(name: str, inputs: AttentionInputs) -> AttentionVariant:
    return _select(_ATTENTION, name, inputs, "attention", available_attention_variants)


def select_kmeans_variant(name: str, inputs: KMeansInputs) -> KMeansVariant:
    return _select(_KMEANS, name, inputs, "k-means", available_kmeans_variants)
