"""svg2_kernels: kernels for Sparse VideoGen2. (The folder was ``kernels/`` until transformers started to pull
in the Hub's ``kernels`` package, which a top-level ``kernels/`` shadows when Python runs from the repository root.)

Every kernel has a float32 torch reference in :mod:`svg2_kernels.reference`. Kernels are registered in
:mod:`svg2_kernels.registry`, each declaring what it supports and why it refuses an input. A sparse layout
becomes a kernel's input through :func:`svg2_kernels.plan.build_plan` (an :class:`AttentionPlan`, with the
public :class:`TileConfig`). The fused compensation kernel (centroid attention over skipped key clusters,
merged with the sparse result) is :mod:`svg2_kernels.compensation`.
"""

from svg2_kernels.plan import AttentionPlan, TileConfig, build_plan
from svg2_kernels.registry import (
    AttentionInputs,
    CompensationInputs,
    KMeansInputs,
    available_attention_variants,
    available_compensation_variants,
    available_kmeans_variants,
    get_attention_variant,
    get_compensation_variant,
    get_kmeans_variant,
    select_attention_variant,
    select_compensation_variant,
    select_kmeans_variant,
)

__all__ = [
    "AttentionPlan",
    "TileConfig",
    "build_plan",
    "AttentionInputs",
    "KMeansInputs",
    "CompensationInputs",
    "available_attention_variants",
    "available_kmeans_variants",
    "available_compensation_variants",
    "get_attention_variant",
    "get_kmeans_variant",
    "get_compensation_variant",
    "select_attention_variant",
    "select_kmeans_variant",
    "select_compensation_variant",
]
