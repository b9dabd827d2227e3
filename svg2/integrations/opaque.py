"""The attention core as one opaque custom op, so that a compiled transformer block has no graph break.

Under ``torch.compile`` Dynamo cannot trace an SVG2 call: k-means with a data-dependent number of iterations
per warm or cold start, selection, layouts whose sizes depend on the data, Triton launches, a step counter that
changes every call and Python state (centroid caches, records, timers) written as a side effect. Instead of
running the method behind ``torch.compiler.disable`` (one graph break per attention call), a compiled graph
calls ``torch.ops.svg2.attention_site``: a ``torch.library.custom_op`` whose fake implementation says only
that the output has q's shape, dtype and device. Its real implementation runs the call site's
:class:`~svg2.integrations.handle.AttentionCore` eagerly, exactly as an uncompiled call does.

The call site travels as a CPU int64 scalar tensor (:func:`register_site`), not as a Python int: Dynamo
lifts a tensor attribute to a graph input and guards only on its metadata, so every block of a model shares
one compiled graph (regional compilation, ``compile_repeated_blocks``); an int would be burned into the graph
as a constant and make every block recompile.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch

__all__ = ["register_site", "site_of", "attention_site"]


class _Site(Protocol):
    def _run_impl(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text_tokens: int,
                  text_mask: torch.Tensor | None, heads: object) -> torch.Tensor: ...


_SITES: weakref.WeakValueDictionary[int, _Site] = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register_site(core: _Site) -> torch.Tensor:
    """A fresh id for ``core`` as a CPU int64 scalar tensor (what ``attention_site`` takes); the registry holds
    the core weakly, so a removed handle's cores go away with it."""
    site = next(_IDS)
    _SITES[site] = core
    return torch.tensor(site, dtype=torch.int64)


def site_of(site: torch.Tensor) -> _Site:
    """The attention core registered under ``site``."""
    key = int(site)
    try:
        return _SITES[key]
    except KeyError:
        raise RuntimeError(f"svg2 attention site {key} is gone (its handle was removed and collected): a "
                           "compiled graph outlived the enable_svg2 handle it was traced with; call "
                           "torch._dynamo.reset()") from None


@torch.library.custom_op("svg2::attention_site", mutates_args=())
def attention_site(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: torch.Tensor, num_text_tokens: int,
                   text_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention of call site ``site`` on (batch, seqlen, heads, headdim) inputs -> same shape, q's dtype,
    contiguous. Runs eagerly (warm starts, schedule, records and timing as in an uncompiled call)."""
    out = site_of(site)._run_impl(q, k, v, num_text_tokens, text_mask, None)
    return out.to(q.dtype).contiguous()


@attention_site.register_fake
def _attention_site_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: torch.Tensor, num_text_tokens: int,
                         text_mask: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty(q.shape)
