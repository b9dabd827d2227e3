"""Shared machinery of the baselines that express their mask as a ClusterLayout (svg1, positional, radial,
sliding_tile, oracle).

Every baseline builds a ``ClusterLayout`` (labels = block id per video token, a block map) and runs it through
``svg2_attention(..., layout=layout)``, i.e. through the same variable-block kernel and the same dense warm-up
schedule as SVG2, so comparisons are fair. Fixed-size blocks are a special case of variable-size ones;
blocks need not be contiguous in token order (the layout's permutation makes them contiguous).

Video geometry comes from ``ctx.extra["video_shape"] = (frames, height, width)`` in tokens (after
patchify), filled by the diffusers integration. Video tokens are in raster order (frame-major, then rows,
then columns), followed by ``ctx.num_text_tokens`` joint text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from svg2.attention import ClusterState, dense_attention, svg2_attention
from svg2.config import SVG2Config
from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, AttentionMethod, compensation_record, dense_schedule

__all__ = ["VIDEO_SHAPE_KEY", "LayoutMethod", "video_shape", "block_sizes", "static_layout", "layout_mask_rows",
           "static_density", "on_device", "refuse_single_token_compensation"]

VIDEO_SHAPE_KEY = "video_shape"


def video_shape(ctx: AttentionContext, num_video_tokens: int, method: str) -> tuple[int, int, int]:
    """(frames, height, width) in tokens from ``ctx.extra["video_shape"]``, checked against the sequence."""
    shape = ctx.extra.get(VIDEO_SHAPE_KEY)
    if shape is None:
        raise KeyError(
            f"attention method {method!r} needs the video geometry: set ctx.extra[{VIDEO_SHAPE_KEY!r}] = "
            "(frames, height, width) in tokens after patchify (the diffusers integration fills it; when "
            "calling a method directly use AttentionContext(extra={'video_shape': (T, H, W)}))")
    try:
        t, h, w = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise ValueError(f"ctx.extra[{VIDEO_SHAPE_KEY!r}] must be a (frames, height, width) tuple of ints, "
                         f"got {shape!r}") from None
    if t * h * w != num_video_tokens:
        raise ValueError(f"ctx.extra[{VIDEO_SHAPE_KEY!r}] = {(t, h, w)} gives {t * h * w} video tokens but the "
                         f"sequence has {num_video_tokens} (= seqlen - num_text_tokens)")
    return t, h, w


def on_device(ctx: AttentionContext, fn: Callable[..., tuple[torch.Tensor, ...]], *args,
              device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """``fn(*args)`` (a pure function of hashable arguments returning CPU tensors, e.g. a static mask),
    computed once per pipeline (kept in ``ctx.state``, dropped by its ``reset()``) and kept on ``device``:
    later calls cost no host work and no host-to-device copy. The returned tensors are shared: never modify
    them in place."""
    return ctx.state.cached(("on_device", fn, tuple(args), str(device)),
                            lambda: tuple(t.to(device) for t in fn(*args)))


def block_sizes(labels: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Tokens per block (num_blocks,) int64 from per-token labels (S,)."""
    return torch.bincount(labels, minlength=num_blocks)


def static_density(sizes_q: torch.Tensor, sizes_k: torch.Tensor, block_map: torch.Tensor) -> float:
    """Token-pair density of a (Cq, Ck) block map with the given block sizes (float64, exact)."""
    pairs = sizes_q.double()[:, None] * sizes_k.double()[None, :]
    return float((pairs * block_map).sum() / (sizes_q.sum().double() * sizes_k.sum().double()))


def static_layout(
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    block_map: torch.Tensor,
    batch: int,
    heads: int,
    *,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
) -> ClusterLayout:
    """A ClusterLayout from labels (S,) or (B, H, S) and a block map (Cq, Ck) or (B, H, Cq, Ck),
    broadcast over batch and heads."""
    cq, ck = block_map.shape[-2:]

    def per_head(x: torch.Tensor, dims: int) -> torch.Tensor:
        if x.dim() == dims:
            x = x.expand(batch, heads, *x.shape)
        return x.contiguous()

    lq = per_head(q_labels.long(), 1)
    lk = per_head(k_labels.long(), 1)
    bm = per_head(block_map.bool(), 2)
    return ClusterLayout.from_labels(lq, lk, bm, num_text_tokens=num_text_tokens, text_mask=text_mask)


def layout_mask_rows(layout: ClusterLayout, rows: torch.Tensor) -> torch.Tensor:
    """Token mask of some video query rows: (B, H, r, Sk) bool with ``M[x, y] = block_map[lq[x], lk[y]]``
    over the clustered (video) keys, for ``rows`` (r,) int64 video token indices. O(r * S) memory."""
    b, h, cq, ck = layout.block_map.shape
    lq = layout.q_labels[:, :, rows]  # (B, H, r)
    bm = torch.gather(layout.block_map, 2, lq.unsqueeze(-1).expand(b, h, rows.numel(), ck))
    sk = layout.k_labels.shape[-1]
    return torch.gather(bm, 3, layout.k_labels.unsqueeze(2).expand(b, h, rows.numel(), sk))


class LayoutMethod(AttentionMethod):
    """Base class of the block-layout baselines: subclasses implement ``layout(q, k, v, ctx)``.

    ``__call__`` applies the shared dense warm-up schedule (``dense_steps_frac``, ``dense_layers``), runs
    the layout through ``svg2_attention`` on ``attention_kernel`` and records the density like SVG2 does.

    Issue-17 options shared by every block method: ``compensate`` (skipped key blocks contribute through their
    mean key and mean value, from the current K/V) and ``layout_every`` (a call site's layout serves that many
    sparse steps). A subclass whose mask depends only on the video geometry sets ``static_mask = True``: layout
    reuse has nothing to save there and is refused.
    """

    static_mask: bool = False
    shared_knobs = ("dense_steps_frac", "dense_layers", "attention_kernel", "attention_tiles", "target_density",
                    "compensate", "layout_every")

    @classmethod
    def parameters(cls) -> frozenset[str]:
        # A static mask takes layout_every only at 1 (refused otherwise): not a parameter, so a layout_every
        # sweep runs it once.
        names = super().parameters()
        return names - {"layout_every"} if cls.static_mask else names

    def __init__(self, *, dense_steps_frac: float = 0.2, dense_layers: int = 1,
                 attention_kernel: str = "auto", attention_tiles: Any = None, compensate: bool = False,
                 layout_every: int = 1) -> None:
        if not 0.0 <= dense_steps_frac <= 1.0:
            raise ValueError(f"dense_steps_frac={dense_steps_frac} must be in [0, 1]")
        if dense_layers < 0:
            raise ValueError(f"dense_layers={dense_layers} must be >= 0")
        if self.static_mask and layout_every != 1:
            raise ValueError(f"layout_every={layout_every} makes no sense for {self.name!r}: its mask depends only on "
                             "the video geometry, so it is already the same at every step and there is nothing to "
                             "reuse. Leave layout_every=1")
        self.dense_steps_frac = float(dense_steps_frac)
        self.dense_layers = int(dense_layers)
        self.attention_kernel = attention_kernel
        # Only the kernel choice and the issue-17 options of this config are used (the layout is precomputed);
        # it also validates them (compensate a bool, layout_every an int >= 1).
        self._kernel_cfg = SVG2Config(attention_kernel=attention_kernel, attention_tiles=attention_tiles,
                                      compensate=compensate, layout_every=layout_every)
        self.attention_tiles = self._kernel_cfg.attention_tiles
        self.compensate = self._kernel_cfg.compensate
        self.layout_every = self._kernel_cfg.layout_every

    # ------------------------------------------------------------------------------- to implement
    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        """The sparse layout of this call over the video tokens. Shapes (B, H, S, D)."""
        raise NotImplementedError

    def layout_and_info(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[ClusterLayout, dict[str, Any]]:
        """The layout plus method-specific values for this call's stats record (e.g. SVG1's share of
        temporal heads). Default: no extra values."""
        return self.layout(q, k, v, ctx), {}

    def static_key(self, q: torch.Tensor, ctx: AttentionContext) -> tuple[Any, ...] | None:
        """A key under which this call's layout and kernel plan are the same as every other call's with the
        same key (a static mask), or None (the layout depends on Q/K). Static layouts and their plans are
        built once per pipeline and kept in ``ctx.state``."""
        return None

    def _layout_and_plan(self, q, k, v, ctx: AttentionContext):
        """(layout, plan or None, info): a static layout with its plan from the pipeline's cache."""
        key = self.static_key(q, ctx)
        if key is None or ctx.text_mask is not None:  # a text mask changes per prompt: plan per call
            layout, info = self.layout_and_info(q, k, v, ctx)
            return layout, None, info

        def build():
            layout, info = self.layout_and_info(q, k, v, ctx)
            plan = layout.plan(self._kernel_cfg.attention_kernel, head_dim=q.shape[-1], dtype=q.dtype,
                               tiles=self._kernel_cfg.attention_tiles)
            return layout, plan, info

        full_key = ("static_plan", self.name, id(self), key, tuple(q.shape), q.dtype, str(q.device),
                    ctx.num_text_tokens)
        return ctx.state.cached(full_key, build)

    # ------------------------------------------------------------------------------------- shared
    def is_dense_call(self, ctx: AttentionContext) -> bool:
        return dense_schedule(self.dense_steps_frac, self.dense_layers, ctx)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        base = dict(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch)
        if self.is_dense_call(ctx):
            out = dense_attention(q, k, v, num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask,
                                  scale=ctx.scale)
            ctx.state.record(**base, density=1.0, dense=True)
            return out
        timer = ctx.state.timer
        # The site's layout cache (layout_every > 1) lives in the caller's MethodState, one per method and site.
        site = ctx.state.cluster_state("layout", self.name, *ctx.site()) if self.layout_every > 1 else None
        layout = None if site is None else site.reusable_layout(self.layout_every, q, ctx.num_text_tokens,
                                                                ctx.text_mask)
        reused, plan, info = layout is not None, None, {}
        if not reused:
            with (timer.section("selection", q.device) if timer is not None else nullcontext()):
                layout, plan, info = self._layout_and_plan(q, k, v, ctx)
            if site is not None:
                site.keep_layout(layout, self.layout_every)
        if site is not None and plan is None:  # a kept layout keeps its kernel plan too
            plan = site.layout_plan(layout, self._kernel_cfg.attention_kernel, self.attention_tiles, q)
        probe = ClusterState()  # learns which kernel ran (and which compensation backend)
        out, layout = svg2_attention(q, k, v, self._kernel_cfg, probe, num_text_tokens=ctx.num_text_tokens,
                                     text_mask=ctx.text_mask, scale=ctx.scale, layout=layout, plan=plan,
                                     check_finite=ctx.check_finite, timer=timer)
        probe.last_layout_reused = reused
        ctx.state.record(**base, density=layout.density_per_head().mean(), dense=False,
                         kernel=probe.last_kernels.get("attention"), **compensation_record(self._kernel_cfg, probe),
                         **info)
        return out

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "dense_steps_frac": self.dense_steps_frac,
                "dense_layers": self.dense_layers, "attention_kernel": self.attention_kernel,
                "compensate": self.compensate, "layout_every": self.layout_every}


def refuse_single_token_compensation(method: str, block_size: int, compensate: bool) -> None:
    """Compensating one-token blocks is dense attention at more than dense cost: refuse it with the reason."""
    if compensate and block_size == 1:
        raise ValueError(f"{method}: compensate=True with block_size=1 makes every skipped key an exact term (a "
                         "one-token block's mean key and value are the token's own), so the result is dense "
                         "attention at more than dense cost. Use method=dense, or a block_size > 1")


def softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
