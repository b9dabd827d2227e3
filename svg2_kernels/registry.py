"""Kernel registry, in the manner of xformers' operator dispatch.

Every entry is one concrete kernel (attention: ``triton_tma``, ``triton_chunks``, ``flex``, ``torch``;
k-means: ``triton``, ``flash_kmeans``, ``torch``; compensation of skipped clusters: ``triton``, with the
``flex`` and ``torch`` backends living in ``svg2.compensation``). Each declares what it supports (devices,
dtypes, head dims, optional packages) and answers ``not_supported_reasons(inputs)``.
``select_*("auto", inputs)`` walks them in priority order (fastest first) and returns the first that accepts
the inputs; the ones it skipped come back with their reasons (``with_skipped=True``); when none accepts, the
error lists every kernel and why it refused. A named kernel that refuses is an error, never a silent
fallback. Callers record the name of the kernel that ran (``AttentionPlan.kernel``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from svg2_kernels import reference
from svg2_kernels._triton import interpreting
from svg2_kernels.plan import AttentionPlan, TileConfig

__all__ = [
    "AttentionInputs",
    "KMeansInputs",
    "CompensationInputs",
    "AttentionVariant",
    "KMeansVariant",
    "CompensationVariant",
    "register_attention_variant",
    "register_kmeans_variant",
    "register_compensation_variant",
    "get_attention_variant",
    "get_kmeans_variant",
    "get_compensation_variant",
    "select_attention_variant",
    "select_kmeans_variant",
    "select_compensation_variant",
    "available_attention_variants",
    "available_kmeans_variants",
    "available_compensation_variants",
    "missing_package_reasons",
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


@dataclass(frozen=True)
class CompensationInputs:
    """What a compensation kernel needs to know: the queries' device, dtype and head dim, the cluster counts."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    seqlen_q: int
    num_q_clusters: int
    num_k_clusters: int

    @classmethod
    def of(cls, q: torch.Tensor, skipped: torch.Tensor) -> CompensationInputs:
        """q (B, H, Sq, D), skipped (B, H, Cq, Ck)."""
        return cls(q.device.type, q.dtype, q.shape[-1], q.shape[-2], skipped.shape[-2], skipped.shape[-1])


class AttentionVariant:
    """Base class of an attention kernel: what it supports, how it prepares a plan, how it runs one."""

    name: str = "base"
    priority: int = 0  # higher is tried first by "auto"
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    head_dims: tuple[int, ...] | None = None  # None: any
    requires: tuple[str, ...] = ()  # importable packages this variant needs
    # Reads Q in token order through the query permutation and writes the outputs in token order (both
    # permutation passes fused into the kernel): ``run`` then accepts ``q_perm``.
    fuses_query_permutation: bool = False

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = _support_reasons(self, inputs)
        if self.head_dims is not None and inputs.head_dim not in self.head_dims:
            reasons.append(f"head dim {inputs.head_dim} not in {self.head_dims}")
        return reasons

    def plan(self, q_offsets: torch.Tensor, k_offsets: torch.Tensor, block_map: torch.Tensor,
             inputs: AttentionInputs, tiles: TileConfig, skipped: tuple[str, ...] = ()) -> AttentionPlan:
        """Prepare the layout for this kernel (default: nothing beyond the layout itself)."""
        return AttentionPlan(self, inputs, q_offsets, k_offsets, block_map, None, None, skipped)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float,
            q_perm: torch.Tensor | None, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (out (B, H, Sq, D), lse (B, H, Sq) float32 or None). ``q_perm`` only if fuses_query_permutation."""
        raise NotImplementedError  # pragma: no cover

    def gather_rows(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
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
        return _support_reasons(self, inputs)

    def run(self, x, centroids, iters):  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, priority={self.priority})"


class CompensationVariant:
    """Base class of a compensation kernel: centroid attention over the skipped key clusters, merged with the
    sparse result when ``out`` / ``lse`` are given.

    ``run(q, centroids, value_means, sizes, skipped, q_labels, scale, out=None, lse=None, q_perm=None)
    -> (out (B, H, Sq, D), lse (B, H, Sq) float32)`` with the semantics of
    :func:`svg2_kernels.compensation.compensation_attention` (``svg2.compensation`` documents the formula).
    """

    name: str = "base"
    priority: int = 0
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    requires: tuple[str, ...] = ()
    fuses_merge: bool = False  # merges with the sparse out / lse in its epilogue

    def not_supported_reasons(self, inputs: CompensationInputs) -> list[str]:
        return _support_reasons(self, inputs)

    def run(self, q, centroids, value_means, sizes, skipped, q_labels, scale, out=None, lse=None,
            q_perm=None):  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, priority={self.priority})"


def triton_interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``, the tests)."""
    return interpreting()


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing_package_reasons(variant: AttentionVariant | KMeansVariant | CompensationVariant) -> list[str]:
    """One line per package of ``variant.requires`` that is not installed (a refusal on any input)."""
    return [f"package '{p}' is not installed" for p in variant.requires if not _has_package(p)]


def _support_reasons(variant: AttentionVariant | KMeansVariant | CompensationVariant,
                    inputs: AttentionInputs | KMeansInputs | CompensationInputs) -> list[str]:
    """The checks every kernel variant shares: why ``variant`` refuses ``inputs`` on its declared ``requires``
    (missing packages), ``devices`` and ``dtypes``; empty when it accepts them. Each variant's
    ``not_supported_reasons`` starts from this list and appends its own limits (head dims, Triton, GPU)."""
    reasons = missing_package_reasons(variant)
    if inputs.device_type not in variant.devices:
        reasons.append(f"device '{inputs.device_type}' not in {variant.devices}")
    if inputs.dtype not in variant.dtypes:
        reasons.append(f"dtype {inputs.dtype} not in {variant.dtypes}")
    return reasons


# --------------------------------------------------------------------------------------------- torch


class TorchAttention(AttentionVariant):
    """Masked dense attention in float32, chunked over queries: exact, O(S^2) work, any device."""

    name = "torch"
    priority = 0

    def run(self, q, k, v, plan, scale, q_perm, return_lse):
        out, lse = reference.varblock_attention_reference(q, k, v, plan.q_offsets, plan.k_offsets, plan.block_map,
                                                          scale, return_lse=True)
        return out, (lse if return_lse else None)


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
_COMPENSATION: dict[str, CompensationVariant] = {}
_LAZY_MODULES = ("svg2_kernels.varblock_attention", "svg2_kernels.kmeans", "svg2_kernels.flex",
                 "svg2_kernels.compensation", "svg2_kernels.flashinfer_variant")
_lazy_loaded = False


def register_attention_variant(variant: AttentionVariant) -> AttentionVariant:
    _ATTENTION[variant.name] = variant
    return variant


def register_kmeans_variant(variant: KMeansVariant) -> KMeansVariant:
    _KMEANS[variant.name] = variant
    return variant


def register_compensation_variant(variant: CompensationVariant) -> CompensationVariant:
    _COMPENSATION[variant.name] = variant
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


def available_compensation_variants() -> list[str]:
    """The registered compensation kernels, fastest first (``svg2.compensation`` adds ``flex`` and ``torch``
    after them)."""
    _load_optional_variants()
    return sorted(_COMPENSATION, key=lambda n: -_COMPENSATION[n].priority)


def _get(table: dict, name: str, kind: str):
    _load_optional_variants()
    if name not in table:
        hint = (" ('triton' is now two kernels: 'triton_tma' (Hopper) and 'triton_chunks')"
                if name == "triton" and kind == "attention" else "")
        raise KeyError(f"unknown {kind} kernel {name!r}; known: {sorted(table)} (or 'auto'){hint}")
    return table[name]


def get_attention_variant(name: str) -> AttentionVariant:
    return _get(_ATTENTION, name, "attention")


def get_kmeans_variant(name: str) -> KMeansVariant:
    return _get(_KMEANS, name, "k-means")


def get_compensation_variant(name: str) -> CompensationVariant:
    return _get(_COMPENSATION, name, "compensation")


def _select(table: dict, name: str, inputs, kind: str, order: Callable[[], list[str]]):
    """-> (variant, skipped): ``skipped`` lists the faster kernels "auto" passed over, with their reasons."""
    if name != "auto":
        variant = _get(table, name, kind)
        reasons = variant.not_supported_reasons(inputs)
        if reasons:
            raise NotImplementedError(
                f"{kind} kernel {name!r} cannot run {inputs}: {'; '.join(reasons)}. "
                f"Name another kernel ({order()}) or use 'auto' to pick the fastest supported one."
            )
        return variant, []
    refusals = []
    for n in order():
        reasons = table[n].not_supported_reasons(inputs)
        if not reasons:
            return table[n], refusals
        refusals.append(f"{n}: {'; '.join(reasons)}")
    raise NotImplementedError(f"no {kind} kernel supports {inputs}:\n" + "\n".join("  " + r for r in refusals))


def select_attention_variant(name: str, inputs: AttentionInputs, *, with_skipped: bool = False):
    """The attention kernel ``name`` (or the fastest that accepts ``inputs`` for "auto"); with
    ``with_skipped`` also the list of ``"kernel: reason"`` for those "auto" passed over."""
    variant, skipped = _select(_ATTENTION, name, inputs, "attention", available_attention_variants)
    return (variant, skipped) if with_skipped else variant


def select_kmeans_variant(name: str, inputs: KMeansInputs, *, with_skipped: bool = False):
    """Like :func:`select_attention_variant`, for k-means."""
    variant, skipped = _select(_KMEANS, name, inputs, "k-means", available_kmeans_variants)
    return (variant, skipped) if with_skipped else variant


def select_compensation_variant(name: str, inputs: CompensationInputs, *, with_skipped: bool = False):
    """Like :func:`select_attention_variant`, for the compensation kernels registered here."""
    variant, skipped = _select(_COMPENSATION, name, inputs, "compensation", available_compensation_variants)
    return (variant, skipped) if with_skipped else variant
