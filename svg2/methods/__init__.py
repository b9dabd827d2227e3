"""Attention methods behind one interface. Importing this package registers the built-in methods."""

from svg2.methods import dense as _dense  # noqa: F401  (registers "dense")
from svg2.methods import svg2 as _svg2  # noqa: F401  (registers "svg2")
from svg2.methods.base import (
    AttentionContext,
    AttentionMethod,
    MethodState,
    available_methods,
    build_method,
    dense_schedule,
    register_method,
)

__all__ = ["AttentionContext", "AttentionMethod", "MethodState", "available_methods", "build_method",
           "dense_schedule", "register_method"]
