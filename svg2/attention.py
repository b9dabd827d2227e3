"""SVG2 attention: cluster, select, permute, variable-block attention, un-permute (the algorithm of the paper).

Public functions:
    svg2_attention(q, k, v, cfg, state=None, ...) -> (out, layout), or (out, lse, layout) with return_lse
    dense_attention(q, k, v, ...) -> out
    build_layout(q, k, cfg, state=None, ...) -> layout   (clustering + selection only)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from svg2.clustering import HeadSlice, kmeans
from svg2.compensation import KeySummary, compensate, summarize_key_clusters
from svg2.config import SVG2Config
from svg2.layout import ClusterLayout
from svg2.selection import centroid_scores, select_target_density, select_top_p
from svg2.timing import ComponentTimer
from svg2_kernels.plan import AttentionPlan

__all__ = ["ClusterState", "svg2_attention", "dense_attention", "build_layout", "validate_qkv"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_config(cfg: SVG2Config | Mapping | None) -> SVG2Config:
    """An SVG2Config from ``cfg``: itself, a mapping of its fields (as ``enable_svg2`` takes), or the defaults."""
    if cfg is None:
        return SVG2Config()
    if isinstance(cfg, SVG2Config):
        return cfg
    if isinstance(cfg, Mapping):
        return SVG2Config.from_dict(dict(cfg))
    raise TypeError(f"cfg must be an SVG2Config or a mapping of its fields, got {type(cfg).__name__}")


@dataclass
class ClusterState:
    """Warm-start state of one call site (one layer and CFG branch). The caller owns it.

    ``svg2_attention`` reads the cached centroids (warm start with ``kmeans_iters_step`` iterations) and
    writes the new ones. A cache whose shape no longer matches the input (other batch size, head count or
    sequence length) is ignored and replaced by a cold start.

    With ``layout_every > 1`` it also keeps the last layout and how many calls it has served; the layout is
    reused until it has served ``layout_every`` calls (one call per denoising step at a call site).
    """

    q_centroids: torch.Tensor | None = None
    k_centroids: torch.Tensor | None = None
    calls: int = 0
    last_kernels: dict[str, str] = field(default_factory=dict)
    layout: ClusterLayout | None = None
    layout_uses: int = 0
    last_layout_reused: bool = False
    plan: AttentionPlan | None = None  # the kernel plan of ``plan_layout`` (a kept layout), built once
    plan_layout: ClusterLayout | None = None

    def reset(self) -> None:
        self.q_centroids = None
        self.k_centroids = None
        self.calls = 0
        self.last_kernels = {}
        self.layout = None
        self.layout_uses = 0
        self.last_layout_reused = False
        self.plan = None
        self.plan_layout = None

    def reusable_layout(self, layout_every: int, q: torch.Tensor, num_text_tokens: int = 0,
                        text_mask: torch.Tensor | None = None) -> ClusterLayout | None:
        """The kept layout when it may serve this call (it has served fewer than ``layout_every`` calls and
        fits q's batch, heads, video tokens and device), with this call's text mask; else None."""
        lay = self.layout
        if layout_every <= 1 or lay is None or self.layout_uses >= layout_every:
            return None
        b, h, s, _ = q.shape
        if (tuple(lay.q_labels.shape) != (b, h, s - num_text_tokens) or lay.num_text_tokens != num_text_tokens
                or lay.block_map.device != q.device):
            return None
        self.layout_uses += 1
        return lay if lay.text_mask is text_mask else dataclasses.replace(lay, text_mask=text_mask)

    def layout_plan(self, layout: ClusterLayout, kernel: str, tiles, q: torch.Tensor) -> AttentionPlan:
        """The kernel plan of a kept layout, built at its first call and reused with it (a reused layout skips
        the kernel metadata too). Rebuilt when the layout object, q's dtype or head dim differ."""
        p = self.plan
        if p is None or self.plan_layout is not layout or p.inputs.dtype != q.dtype or p.inputs.head_dim != q.shape[-1]:
            p = layout.plan(kernel, head_dim=q.shape[-1], dtype=q.dtype, tiles=tiles)
            self.plan, self.plan_layout = p, layout
        return p

    def keep_layout(self, layout: ClusterLayout, layout_every: int) -> None:
        """Remember a freshly built layout (it has served one call) when layouts are reused."""
        if layout_every > 1:
            self.layout, self.layout_uses = layout, 1


def validate_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
    check_finite: bool = True,
) -> None:
    """Raise a clear error for inputs SVG2 cannot take. Shapes: (batch, heads, seqlen, headdim)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seqlen, headdim), got {tuple(t.shape)}; "
                             "diffusers uses (batch, seqlen, heads, headdim): transpose(1, 2) first")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape (self-attention), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"empty sequence or head dim: {tuple(q.shape)}")
    s = q.shape[2]
    if not (0 <= num_text_tokens < s):
        raise ValueError(f"num_text_tokens={num_text_tokens} must be in [0, seqlen - 1] = [0, {s - 1}] "
                         "(at least one video token is clustered)")
    if text_mask is not None:
        if num_text_tokens == 0:
            raise ValueError("text_mask given but num_text_tokens == 0")
        if tuple(text_mask.shape) != (q.shape[0], num_text_tokens) or text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be a bool tensor of shape (batch, num_text_tokens) = "
                             f"{(q.shape[0], num_text_tokens)}, got {text_mask.dtype} {tuple(text_mask.shape)}")
        if text_mask.device != q.device:
            raise ValueError(f"text_mask is on {text_mask.device} but q is on {q.device}")
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf; SVG2 clusters would be meaningless. Check the "
                                 "model's dtype (fp16 overflow?) or pass check_finite=False to skip this check")


def _key_padding_mask(b: int, s: int, num_text_tokens: int, text_mask: torch.Tensor | None, device):
    if text_mask is None:
        return None
    keep = torch.ones(b, s, dtype=torch.bool, device=device)
    keep[:, s - num_text_tokens:] = text_mask
    return keep[:, None, None, :]  # broadcast over heads and queries


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention (torch SDPA: cuDNN / flash on GPU). Shapes (batch, heads, seqlen, headdim).

    Padded text keys (``text_mask`` False) are masked, as the dense model masks them."""
    mask = _key_padding_mask(q.shape[0], k.shape[2], num_text_tokens, text_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _cold(state: ClusterState | None, n: int, cq: int, ck: int, d: int) -> bool:
    if state is None or state.q_centroids is None or state.k_centroids is None:
        return True
    return tuple(state.q_centroids.shape) != (n, cq, d) or tuple(state.k_centroids.shape) != (n, ck, d)


def _chain_ordered(rk):
    """The same clustering with key clusters renumbered along a nearest-neighbour chain of centroids."""
    from svg2_kernels.order import chain_order

    order = chain_order(rk.centroids)  # (n, ck): old index at each new position
    inv = torch.argsort(order, dim=-1)
    return dataclasses.replace(
        rk, labels=inv.gather(1, rk.labels), centroids=rk.centroids.gather(1, order[..., None].expand_as(rk.centroids)),
        sizes=rk.sizes.gather(1, order), perm=None, x_sorted=None,  # recomputed by ClusterLayout.from_labels
    )


def build_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: SVG2Config | Mapping,
    state: ClusterState | None = None,
    *,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    timer: ComponentTimer | None = None,
    heads: HeadSlice | None = None,
) -> ClusterLayout:
    """Cluster the video tokens of q and k, estimate centroid scores and select cluster pairs.

    Updates ``state`` (warm-start centroids) in place when given. Shapes (batch, heads, seqlen, headdim).
    ``heads``: which of the model's heads q and k hold when they hold only some (see ``svg2_attention``).
    """
    return _build_clusters(q, k, _as_config(cfg), state, num_text_tokens=num_text_tokens, text_mask=text_mask,
                           scale=scale, timer=timer, heads=heads).layout


class _Built(NamedTuple):
    """What one clustering + selection produced. ``k_sorted``: the video keys in ``k_perm`` order (B, H, Sv, D)
    when the k-means kernel wrote them on its last pass, else None. ``q_centroids`` / ``k_centroids``
    (B, H, C, D) float32: the means of exactly the returned clusters (None after a 0-iteration warm start,
    which only assigns). Only for this call's Q/K: a layout may be reused, these may not."""

    layout: ClusterLayout
    k_sorted: torch.Tensor | None
    q_centroids: torch.Tensor | None
    k_centroids: torch.Tensor | None


def _build_layout(q, k, cfg: SVG2Config, state, *, num_text_tokens, text_mask, scale, timer, sort_k=False,
                  heads: HeadSlice | None = None):
    """build_layout, plus (with ``sort_k``) the video keys in ``k_perm`` order (B, H, Sv, D) or None."""
    built = _build_clusters(q, k, cfg, state, num_text_tokens=num_text_tokens, text_mask=text_mask, scale=scale,
                            timer=timer, sort_k=sort_k, heads=heads)
    return built.layout, built.k_sorted


def _build_clusters(q, k, cfg: SVG2Config, state, *, num_text_tokens, text_mask, scale, timer,
                    sort_k=False, heads: HeadSlice | None = None) -> _Built:
    """build_layout, plus what a compensated or re-routed call needs from the clustering (see ``_Built``)."""
    b, h, s, d = q.shape
    sv = s - num_text_tokens
    n = b * h
    cq = min(cfg.num_q_centroids, sv)
    ck = min(cfg.num_k_centroids, sv)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sec = (lambda name: timer.section(name, q.device)) if timer is not None else (lambda name: nullcontext())
    qx = q[:, :, :sv].reshape(n, sv, d)
    kx = k[:, :, :sv].reshape(n, sv, d)
    # Cold starts draw per head, not per (batch, head) row: a video clustered in a batch starts as it does alone.
    heads = heads if heads is not None else HeadSlice(0, h, h)
    cold = _cold(state, n, cq, ck, d)
    iters = cfg.kmeans_iters_init if cold else cfg.kmeans_iters_step
    with sec("kmeans"):
        rq = kmeans(qx, cq, iters, None if cold else state.q_centroids, seed=cfg.seed, kernel=cfg.kmeans_kernel,
                    heads=heads)
        rk = kmeans(kx, ck, iters, None if cold else state.k_centroids, seed=cfg.seed + 1,
                    kernel=cfg.kmeans_kernel, sort_points=sort_k, heads=heads)
        if cold and cfg.order_key_clusters:
            rk = _chain_ordered(rk)
    if state is not None:
        state.q_centroids, state.k_centroids = rq.centroids, rk.centroids
        state.calls += 1
        state.last_kernels["kmeans"] = rq.kernel
    with sec("selection"):
        scores = centroid_scores(rq.centroids, rk.centroids, rk.sizes, scale)
        if cfg.target_density is not None:
            block_map = select_target_density(scores, rq.sizes, rk.sizes, cfg.target_density, cfg.min_kc_ratio)
        else:
            block_map = select_top_p(scores, cfg.top_p, cfg.min_kc_ratio)
    with sec("permutation"):
        layout = ClusterLayout.from_labels(
            rq.labels.view(b, h, sv), rk.labels.view(b, h, sv), block_map.view(b, h, cq, ck),
            q_sizes=rq.sizes.view(b, h, cq), k_sizes=rk.sizes.view(b, h, ck),
            num_text_tokens=num_text_tokens, text_mask=text_mask,
            q_perm=None if rq.perm is None else rq.perm.view(b, h, sv),
            k_perm=None if rk.perm is None else rk.perm.view(b, h, sv),
        )
    means = iters >= 1  # a 0-iteration warm start returns the old centroids, not the means of the new clusters
    return _Built(layout, None if rk.x_sorted is None else rk.x_sorted.view(b, h, sv, d),
                  rq.centroids.view(b, h, cq, d) if means else None, rk.centroids.view(b, h, ck, d) if means else None)


def svg2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: SVG2Config | Mapping | None = None,
    state: ClusterState | None = None,
    *,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    layout: ClusterLayout | None = None,
    plan: AttentionPlan | None = None,
    check_finite: bool = True,
    timer: ComponentTimer | None = None,
    return_lse: bool = False,
    key_summary: KeySummary | None = None,
    heads: HeadSlice | None = None,
    compensation_backend: str = "auto",
) -> tuple[torch.Tensor, ClusterLayout] | tuple[torch.Tensor, torch.Tensor, ClusterLayout]:
    """Sparse VideoGen2 attention.

    Args:
        q, k, v: (batch, heads, seqlen, headdim), fp32/fp16/bf16, after QK-norm and RoPE. With joint text,
            the last ``num_text_tokens`` positions are text tokens (HunyuanVideo layout).
        cfg: SVG2Config, or a mapping of its fields (``{"top_p": 0.8}``); defaults if None.
        state: ClusterState of this call site for warm-started k-means across calls (optional).
        num_text_tokens: trailing text tokens: not clustered; text queries attend densely to all real keys
            and every video query attends to all real text keys.
        text_mask: (batch, num_text_tokens) bool, False for padded text keys (masked as the dense model does).
        scale: softmax scale, default 1/sqrt(headdim).
        layout: reuse a precomputed layout (skips clustering and selection).
        plan: reuse the kernel plan of ``layout`` (``layout.plan(...)``; needs ``layout``): skips the metadata.
        check_finite: raise on NaN/Inf inputs (one host sync; disable for CUDA-graph capture).
        timer: optional ComponentTimer for the kmeans/selection/permutation/metadata/attention/compensation
            breakdown.
        return_lse: also return the log-sum-exp of every query's kept scaled scores (with ``cfg.compensate``:
            of the compensated softmax, the skipped clusters' centroid terms included).
        key_summary: with ``cfg.compensate``, the key clusters' centroids and mean values of *these* K and V
            when the caller already has them; None computes them (k-means' last update for the centroids of a
            fresh layout, segment means over the permuted clusters otherwise).
        heads: when q, k, v hold only some of the model's heads (a sequence-parallel rank's share), which ones:
            cold k-means starts then draw what an all-heads call draws for them (None: all heads).
        compensation_backend: with ``cfg.compensate``, the compensation kernel (``svg2.compensation``:
            "auto", "triton", "triton_sorted", "flex", "torch"); recorded as ``state.last_kernels["compensation"]``.
    With ``cfg.compensate`` every skipped video key cluster contributes through its centroid and mean value,
    merged with the kernel's output through the kernel's LSE (``svg2.compensation``); text stays exact. With
    ``cfg.layout_every > 1`` and a ``state``, the layout (and its kernel plan) built at one call serves the next
    ``layout_every - 1`` calls too (``state.last_layout_reused`` says which kind this call was).
    Returns:
        out: (batch, heads, seqlen, headdim) in q's dtype and token order.
        lse: only with ``return_lse``: (batch, heads, seqlen) float32, natural log, token order like ``out``
            (-inf for a query that keeps no key).
        layout: the ClusterLayout used (density, block map, permutations).
        The kernel that ran is ``state.last_kernels["attention"]`` (with a state).
    """
    cfg = _as_config(cfg)
    validate_qkv(q, k, v, num_text_tokens, text_mask, check_finite)
    if plan is not None and layout is None:
        raise ValueError("plan= needs the layout it was built from: pass layout= too")
    b, h, s, d = q.shape
    t = num_text_tokens
    sv = s - t
    k_sorted = k_centroids = None
    reused = False
    if layout is None and state is not None:
        layout = state.reusable_layout(cfg.layout_every, q, t, text_mask)
        reused = layout is not None
    if layout is None:
        built = _build_clusters(q, k, cfg, state, num_text_tokens=t, text_mask=text_mask, scale=scale, timer=timer,
                                sort_k=True, heads=heads)
        layout, k_sorted, k_centroids = built.layout, built.k_sorted, built.k_centroids
        if state is not None:
            state.keep_layout(layout, cfg.layout_every)
    if state is not None:
        state.last_layout_reused = reused
    sec = (lambda name: timer.section(name, q.device)) if timer is not None else (lambda name: nullcontext())
    if plan is None:
        with sec("metadata"):
            if state is not None and cfg.layout_every > 1 and (reused or layout is state.layout):
                plan = state.layout_plan(layout, cfg.attention_kernel, cfg.attention_tiles, q)  # kept with it
            else:
                plan = layout.plan(cfg.attention_kernel, head_dim=d, dtype=q.dtype, tiles=cfg.attention_tiles)
    if state is not None:
        state.last_kernels["attention"] = plan.kernel
    gather = plan.variant.gather_rows

    with sec("permutation"):
        # K in cluster order comes from k-means' last update when its kernel wrote it (one read of K saved)
        ks = k_sorted if k_sorted is not None else gather(k[:, :, :sv], layout.k_perm)
        vs = gather(v[:, :, :sv], layout.k_perm)
        if t > 0:
            # Text keys follow the video keys, real ones first (the plan's last key cluster ends at the last
            # real one, so padded text keys are never attended).
            kt, vt = k[:, :, sv:], v[:, :, sv:]
            if text_mask is not None:
                tperm = torch.sort((~text_mask).to(torch.int8), dim=-1, stable=True).indices
                tperm = tperm[:, None, :].expand(b, h, t)
                kt, vt = gather(kt, tperm), gather(vt, tperm)
            ks = torch.cat([ks, kt], dim=2)
            vs = torch.cat([vs, vt], dim=2)
    want_lse = return_lse or cfg.compensate  # compensation merges through the kernel's LSE
    if plan.variant.fuses_query_permutation:
        # The kernel reads Q through q_perm and writes O in token order (permutation fused into it).
        with sec("attention"):
            res = plan.run(q[:, :, :sv], ks, vs, scale=scale, q_perm=layout.q_perm, return_lse=want_lse)
    else:
        with sec("permutation"):
            qs = gather(q[:, :, :sv], layout.q_perm)
        with sec("attention"):
            res_s = plan.run(qs, ks, vs, scale=scale, return_lse=want_lse)
        with sec("permutation"):
            out_s, lse_s = res_s if want_lse else (res_s, None)
            out_v = torch.empty_like(out_s).scatter_(2, layout.q_perm.unsqueeze(-1).expand(b, h, sv, d), out_s)
            lse_v = None if lse_s is None else torch.empty_like(lse_s).scatter_(2, layout.q_perm, lse_s)
            res = (out_v, lse_v) if want_lse else out_v
    out_video, lse_video = res if want_lse else (res, None)
    if cfg.compensate:
        with sec("compensation"):
            if key_summary is None:
                key_summary = summarize_key_clusters(ks[:, :, :sv], vs[:, :, :sv], layout.k_sizes, k_centroids)
            # Text keys (the plan's extra key cluster) are always computed: only skipped video clusters add terms.
            out_video, lse_video, comp_backend = compensate(
                out_video, lse_video, q[:, :, :sv], key_summary, ~layout.block_map, layout.q_labels,
                1.0 / math.sqrt(d) if scale is None else scale, backend=compensation_backend,
                cluster_order=layout.q_perm)
        if state is not None:
            state.last_kernels["lse"] = plan.kernel
            state.last_kernels["compensation"] = comp_backend
    if t == 0:
        return (out_video, lse_video, layout) if return_lse else (out_video, layout)
    with sec("attention"):
        out_text = dense_attention(q[:, :, sv:], k, v, num_text_tokens=t, text_mask=text_mask, scale=scale)
    out = torch.cat([out_video, out_text], dim=2)
    if not return_lse:
        return out, layout
    lse = torch.cat([lse_video, _dense_lse(q[:, :, sv:], k, t, text_mask, scale)], dim=2)
    return out, lse, layout


def _dense_lse(q: torch.Tensor, k: torch.Tensor, num_text_tokens: int, text_mask: torch.Tensor | None,
               scale: float | None) -> torch.Tensor:
    """Log-sum-exp of dense scaled scores (B, H, Sq) float32 of a few query rows (the text queries) over every
    real key. Materialises (B, H, Sq, S) float32 scores: Sq is the text length (hundreds)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    mask = _key_padding_mask(q.shape[0], k.shape[2], num_text_tokens, text_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)
