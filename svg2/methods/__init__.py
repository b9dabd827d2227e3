"""Attention methods behind one interface. Importing this package registers the built-in methods."""

from svg2.methods import dense as _dense  # noqa: F401  (registers "dense")
from svg2.methods import oracle as _oracle  # noqa: F401  (registers "oracle_raster", "oracle_kmeans", deprecated "oracle")
from svg2.methods import positional as _positional  # noqa: F401  (registers "positional")
from svg2.methods import radial as _radial  # noqa: F401  (registers "radial")
from svg2.methods import sliding_tile as _sliding_tile  # noqa: F401  (registers "sliding_tile")
from svg2.methods import sol_attn as _sol_attn  # noqa: F401  (registers "sol_attn")
from svg2.methods import svg1 as _svg1  # noqa: F401  (registers "svg1")
from svg2.methods import svg2 as _svg2  # noqa: F401  (registers "svg2")
from svg2.methods import svg_ear as _svg_ear  # noqa: F401  (registers "svg_ear")
from svg2.methods.base import (
    AttentionContext,
    AttentionMethod,
    MethodState,
    available_methods,
    build_method,
    dense_schedule,
    method_class,
    register_method,
)

__all__ = ["AttentionContext", "AttentionMethod", "MethodState", "available_methods", "build_method",
           "dense_schedule", "method_class", "register_method"]
