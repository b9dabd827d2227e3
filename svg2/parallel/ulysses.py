"""Ulysses sequence parallelism for svg2's attention methods, inside diffusers' context parallelism.

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (diffusers >= 0.36)
every rank holds 1/N of the video tokens between attention calls. SVG2 clusters all keys of a head, so ring
attention does not fit; Ulysses does: one all-to-all trades the sequence shards of q, k, v for head shards
(each rank gets H/N heads over the full sequence), the method runs on those heads, and a second all-to-all
trades the output back. The all-to-all is diffusers' own helper on the Ulysses group of the parallel config
that ``enable_parallelism`` hands to the attention processors (``processor._parallel_config``).

Per rank, the method state (centroids per call site) holds only the local heads. Cold k-means starts draw
the same initial centroids as one process over all heads (the call carries its ``svg2.clustering.HeadSlice``),
so N ranks reproduce the single-GPU output head for head.

Usage::

    torch.distributed.init_process_group("nccl")        # under torchrun --nproc-per-node N
    handle = enable_svg2(pipe, cfg)                      # before or after enable_ulysses
    enable_ulysses(pipe.transformer, N)                  # checks, then diffusers' enable_parallelism
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from svg2.clustering import HeadSlice

__all__ = ["UlyssesGroup", "ulysses_group", "ulysses_attention", "seq_to_heads", "heads_to_seq",
           "check_ulysses_support", "enable_ulysses", "gather_rank_records", "global_stats", "GlobalStatsView",
           "per_rank_summary"]


@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses process group of a context-parallel config: ``size`` ranks, this one is ``rank``."""

    group: Any
    size: int
    rank: int


def ulysses_group(parallel_config: Any) -> UlyssesGroup | None:
    """The Ulysses group of diffusers' ``ParallelConfig`` (or ``ContextParallelConfig``); None when context
    parallelism is off (no config, or a single rank)."""
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None or getattr(cp, "_world_size", None) in (None, 1):
        return None
    if cp.ring_degree > 1:
        raise NotImplementedError(
            f"svg2 runs under Ulysses context parallelism only; got ring_degree={cp.ring_degree}. Ring attention "
            "shows each rank a slice of the keys at a time, but SVG2's k-means needs every key of a head. Use "
            "ContextParallelConfig(ulysses_degree=N) (ring_degree=1).")
    if cp.ulysses_degree == 1:
        return None
    if cp.ulysses_anything:
        raise NotImplementedError(
            "svg2's Ulysses exchange needs equal shards: ContextParallelConfig(ulysses_anything=True) is not "
            "supported. Use a head count and a video token count divisible by ulysses_degree.")
    mesh = cp._ulysses_mesh
    return UlyssesGroup(group=mesh.get_group(), size=cp.ulysses_degree, rank=mesh.get_local_rank())


def _dim_exchange() -> Callable[..., torch.Tensor]:
    try:  # diffusers' own Ulysses all-to-all (functional collectives, traceable by torch.compile)
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

        return _all_to_all_dim_exchange
    except ImportError:  # a diffusers that moved it: the same exchange on torch.distributed directly
        return _dim_exchange_fallback


def _dim_exchange_fallback(x: torch.Tensor, scatter_idx: int, gather_idx: int, group: Any) -> torch.Tensor:
    n = dist.get_world_size(group)
    if scatter_idx == 2:  # (B, S/n, H, D) -> (B, S, H/n, D)
        b, s, h, d = x.shape
        send = x.reshape(b, s, n, h // n, d).permute(2, 1, 0, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv.reshape(n * s, b, h // n, d).permute(1, 0, 2, 3).contiguous()
    b, s, h, d = x.shape  # (B, S, H/n, D) -> (B, S/n, H, D)
    send = x.reshape(b, n, s // n, h, d).permute(1, 3, 2, 0, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(n * h, s // n, b, d).permute(2, 1, 0, 3).contiguous()


def seq_to_heads(x: torch.Tensor, g: UlyssesGroup) -> torch.Tensor:
    """(batch, seqlen/N, heads, headdim) -> (batch, seqlen, heads/N, headdim); rank r gets heads
    r*H/N .. (r+1)*H/N - 1, tokens in global order."""
    return _dim_exchange()(x, 2, 1, g.group)


def heads_to_seq(x: torch.Tensor, g: UlyssesGroup) -> torch.Tensor:
    """(batch, seqlen, heads/N, headdim) -> (batch, seqlen/N, heads, headdim); the inverse of seq_to_heads."""
    return _dim_exchange()(x, 1, 2, g.group)


def ulysses_attention(
    run: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: UlyssesGroup,
    *,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``run(q, k, v, num_text_tokens, text_mask, heads)`` on this rank's heads over the full sequence.

    Args:
        run: the attention on full-sequence tensors (batch, seqlen, heads/N, headdim) -> same shape
            (``AttentionCore``'s method call); ``heads`` (a ``HeadSlice``) says which heads of the model they are.
        q, k, v: this rank's sequence shard, (batch, seqlen/N, heads, headdim), after QK-norm and RoPE.
        g: the Ulysses group (``ulysses_group(parallel_config)``).
    Returns:
        (batch, seqlen/N, heads, headdim): this rank's sequence shard of the attention output.
    """
    if num_text_tokens or text_mask is not None:
        raise NotImplementedError(
            "svg2's Ulysses exchange handles self-attention over sharded video tokens (Wan). Joint video+text "
            "attention (HunyuanVideo) needs a context-parallel plan that shards the text stream too; diffusers "
            "gives HunyuanVideoTransformer3DModel no _cp_plan, and svg2 does not ship one.")
    b, s_local, h, d = q.shape
    if h % g.size:
        raise ValueError(
            f"Ulysses sequence parallelism splits attention heads across ranks: {h} heads do not divide by "
            f"ulysses_degree={g.size}. Use a degree that divides {h} (e.g. "
            f"{', '.join(str(n) for n in range(2, h + 1) if h % n == 0 and n <= 8) or 'none <= 8'}).")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"Ulysses self-attention expects q, k, v of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    # One collective for q, k and v: stacked along the batch dimension.
    qkv = seq_to_heads(torch.cat([q, k, v], dim=0), g)
    ql, kl, vl = qkv.split(b, dim=0)
    local = h // g.size
    out = run(ql, kl, vl, 0, None, HeadSlice(g.rank * local, local, h))
    return heads_to_seq(out.contiguous(), g)


# -- setup --------------------------------------------------------------------------------------------------

def check_ulysses_support(transformer: torch.nn.Module, degree: int) -> None:
    """Raise a clear error when ``transformer`` cannot run svg2 under ``ulysses_degree=degree``."""
    name = type(getattr(transformer, "_orig_mod", transformer)).__name__
    model = getattr(transformer, "_orig_mod", transformer)
    if degree < 1:
        raise ValueError(f"ulysses degree must be >= 1, got {degree}")
    if getattr(model, "_cp_plan", None) is None:
        import diffusers

        raise NotImplementedError(
            f"{name} has no context-parallel plan (_cp_plan) in diffusers {diffusers.__version__}, so its sequence "
            "cannot be sharded across GPUs. svg2's Ulysses mode supports WanTransformer3DModel (Wan 2.1 / 2.2). "
            "Run one video per GPU instead (prompt sharding: svg2.parallel.sharding).")
    heads = getattr(model.config, "num_attention_heads", None)
    if heads is not None and heads % degree:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0 and n <= 16]
        raise ValueError(f"{name} has {heads} attention heads, which do not divide by ulysses_degree={degree}; "
                         f"Ulysses gives every rank heads/N heads. Degrees that work: {divisors}.")


@contextlib.contextmanager
def _cpu_device_count():
    # diffusers builds the device as `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only host
    # (gloo): count the CPU as one device while the mesh is built.
    if torch.accelerator.device_count() == 0:
        with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
            yield
    else:
        yield


def enable_ulysses(transformer: torch.nn.Module, degree: int | None = None, **cp_kwargs: Any) -> Any:
    """Shard ``transformer``'s sequence across ``degree`` ranks (default: the world size) with diffusers'
    ``ContextParallelConfig(ulysses_degree=degree)``. Call after ``init_process_group`` on every rank, before
    or after ``enable_svg2``. Returns the ``ParallelConfig`` diffusers attached."""
    from diffusers import ContextParallelConfig

    if not dist.is_initialized():
        raise RuntimeError("enable_ulysses needs torch.distributed: launch with torchrun and call "
                           "torch.distributed.init_process_group first (svg2.parallel.init_distributed)")
    degree = degree or dist.get_world_size()
    check_ulysses_support(transformer, degree)
    model = getattr(transformer, "_orig_mod", transformer)
    with _cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, **cp_kwargs))
    return model._parallel_config


# -- reporting ----------------------------------------------------------------------------------------------

def gather_rank_records(handle: Any, group: Any = None) -> list[dict[str, Any]]:
    """Every rank's attention-call records (``handle.records()`` plus ``rank``), on every rank. Under Ulysses
    each rank records its own heads: the density of the whole layer is the mean over ranks."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [{**r, "rank": 0} for r in handle.records()]
    mine = [{**r, "rank": dist.get_rank(group)} for r in handle.records()]
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return [r for p in parts for r in p]


class _MergedRecords:
    """A handle whose records are the mean over ranks (for ``SVG2Handle.stats``)."""

    def __init__(self, handle: Any, rows: list[dict[str, Any]]) -> None:
        self._handle, self._rows = handle, rows

    def records(self) -> list[dict[str, Any]]:
        return self._rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def global_stats(handle: Any, group: Any = None) -> dict[str, Any]:
    """``handle.stats()`` over all heads: each call's density is the mean of the ranks' densities (every rank
    holds heads/N heads). A collective: every rank must call it. Timings stay this rank's."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return handle.stats()
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, handle.records(), group=group)
    if len({len(p) for p in parts}) != 1:
        raise RuntimeError(f"ranks recorded different numbers of attention calls: {[len(p) for p in parts]}")
    merged = [{**calls[0], "density": sum(c["density"] for c in calls) / len(calls)} for calls in zip(*parts)]
    return type(handle).stats(_MergedRecords(handle, merged))


class GlobalStatsView:
    """Wraps a handle so that ``stats()`` is :func:`global_stats` (everything else is the handle's)."""

    def __init__(self, handle: Any, group: Any = None) -> None:
        self._handle, self._group = handle, group

    def stats(self) -> dict[str, Any]:
        return global_stats(self._handle, self._group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def per_rank_summary(handle: Any, group: Any = None) -> list[dict[str, Any]]:
    """One row per rank: mean sparse density of its heads and, with ``enable_svg2(..., timing=True)``, its
    time per component (attention, kmeans, ...): the head load balance across ranks."""
    records = [r for r in handle.records() if not r.get("dense", False)]
    mine = {
        "rank": dist.get_rank(group) if dist.is_initialized() else 0,
        "mean_sparse_density": (sum(r["density"] for r in records) / len(records)) if records else None,
        "timing_ms": handle.timer.summary() if handle.timer is not None else {},
    }
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [mine]
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return parts
