from __future__ import annotations

from typing import Any

import torch

from svg2.attention import build_layout, dense_attention, svg2_attention
from svg2.config import SVG2Config
from svg2.methods.base import AttentionContext, AttentionMethod, compensation_record, dense_schedule, register_method


@register_method("svg2")
class SVG2Method(AttentionMethod):
    """Sparse VideoGen2 with its dense warm-up schedule (steps and layers) and per-site warm starts.

    ``cfg.compensate`` adds the skipped clusters' centroid terms; ``cfg.layout_every`` reuses a site's layout
    for that many sparse steps (both handled by ``svg2_attention`` on the site's ClusterState)."""

    def __init__(self, cfg: SVG2Config | None = None, **overrides: Any) -> None:
        cfg = cfg or SVG2Config()
        self.cfg = cfg.replace(**overrides) if overrides else cfg

    def is_dense_call(self, ctx: AttentionContext) -> bool:
        return dense_schedule(self.cfg.dense_steps_frac, self.cfg.dense_layers, ctx)

    def _is_last_dense_step(self, ctx: AttentionContext) -> bool:
        import math

        n_dense = math.floor(self.cfg.dense_steps_frac * ctx.num_steps)
        return ctx.step_index == n_dense - 1 and ctx.layer_index >= self.cfg.dense_layers

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        state = ctx.state.cluster_state(*ctx.site())
        base = dict(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch)
        if self.is_dense_call(ctx):
            if self.cfg.seed_centroids_in_warmup and self._is_last_dense_step(ctx):
                # Seed the centroids so the first sparse step is already warm (result not used).
                build_layout(q, k, self.cfg, state, num_text_tokens=ctx.num_text_tokens,
                             text_mask=ctx.text_mask, scale=ctx.scale, heads=ctx.heads)
            out = dense_attention(q, k, v, num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask,
                                  scale=ctx.scale)
            ctx.state.record(**base, density=1.0, dense=True)
            return out
        if self.cfg.cuda_graph:  # opt-in: captured / replayed warm calls (None: this call runs eagerly below)
            res = ctx.state.graph_cache().call(self.cfg, state, ctx.site(), q, k, v, ctx)
            if res is not None:
                out, density = res
                ctx.state.record(**base, density=density, dense=False, kernel=state.last_kernels.get("attention"),
                                 kmeans_kernel=state.last_kernels.get("kmeans"), cuda_graph=True,
                                 **compensation_record(self.cfg, state))
                return out
        out, layout = svg2_attention(q, k, v, self.cfg, state, num_text_tokens=ctx.num_text_tokens,
                                     text_mask=ctx.text_mask, scale=ctx.scale, check_finite=ctx.check_finite,
                                     timer=ctx.state.timer, heads=ctx.heads)
        # Density stays a tensor here (no host sync); MethodState.resolved_records() turns it into a float.
        ctx.state.record(**base, density=layout.density_per_head().mean(), dense=False,
                         kernel=state.last_kernels.get("attention"), kmeans_kernel=state.last_kernels.get("kmeans"),
                         **compensation_record(self.cfg, state))
        return out

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **self.cfg.to_dict()}
