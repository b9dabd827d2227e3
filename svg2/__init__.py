"""svg2: Sparse VideoGen2 attention for video diffusion transformers, and its research harness."""

from svg2.attention import ClusterState, build_layout, dense_attention, svg2_attention
from svg2.config import SVG2Config
from svg2.integrations import enable_svg2
from svg2.layout import ClusterLayout
from svg2.methods import AttentionContext, MethodState, available_methods, build_method
from svg2_kernels import AttentionPlan, TileConfig

__all__ = [
    "SVG2Config",
    "ClusterLayout",
    "AttentionPlan",
    "TileConfig",
    "ClusterState",
    "svg2_attention",
    "dense_attention",
    "build_layout",
    "AttentionContext",
    "MethodState",
    "available_methods",
    "build_method",
    "enable_svg2",
]

__version__ = "0.1.0"
