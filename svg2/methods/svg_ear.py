"""SVG-EAR (Zhou et al. 2026, "Parameter-Free Linear Compensation for Sparse Video Generation via Error-aware
Routing", arXiv 2603.08982) on svg2's clustering and kernels.

SVG2's k-means clusters; every skipped key cluster is compensated through its centroid and mean value
(``svg2.compensation``); and the cluster pairs computed exactly are chosen by *error-aware routing*: the pairs
with the highest estimated compensation error per token pair, within the token-pair budget that SVG2's own top-p
selection would spend.

Per (batch, head), for query cluster i (centroid cq_i, |Q_i| queries) and key cluster j (|K_j| keys, centroid
ck_j, mean value v̄_j), with a_y = cq_i . k_y * scale and c_ij = cq_i . ck_j * scale:

1. Probe (``ear_log_error``): the error of standing the centroid in for the block's keys,
   ``E_ij = Σ_{y in K_j} || e^{a_y} v_y - e^{c_ij} v̄_j ||²`` (expanded into three segment sums over the
   permuted keys, computed in log space), floored at 1e-8.
2. Value per unit cost: ``log E_ij - gamma * log(|Q_i| |K_j|)`` (gamma = 1).
3. Budget of query cluster i: the token pairs of the key clusters SVG2's selection keeps (by size-weighted centroid
   score, the prefix whose mass before it is <= top_p, and at least ceil(min_kc_ratio * Ck) clusters).
4. The ceil(guaranteed_ratio * Ck) best clusters by centroid score are always computed.
5. The rest of the budget goes to the other clusters by decreasing value while the pairs ranked before a cluster
   stay below it (``ear_select``). Everything not computed is compensated.

What this follows: svg-project/Sparse-VideoGen PR #80 ("Add SVG-EAR attention support", merged 2026-07, `--pattern
EAR`) and its scripts ``scripts/wan/wan_t2v_720p_ear.sh`` and ``scripts/hyvideo/hyvideo_t2v_720p_ear.sh`` (read
there: the same k-means settings, top-p and warm-up as SAP: Wan 2.1 T2V 14B (Cq, Ck) = (300, 1000), top_p 0.9,
min_kc_ratio 0.10, 50 / 2 k-means iterations, 20% dense steps, first layers dense; HunyuanVideo (400, 1000), 10%
dense steps, k-means seeded during the warm-up). The merged PR's Python files are not in the stored snapshot of that
repository; the implementation read is the branch its maintainers pointed to in issues #77 and #78,
github.com/dyxg/SVG-EAR (commit 0fa88b2): ``svg/kmeans_utils.py`` (``identify_dynamic_map_estimated``,
``error_estimation_triton``, ``scatter_mean_fused``, ``_fused_qc_kernel_opt``,
``dynamic_block_sparse_prune_fwd_flashinfer``), ``svg/models/wan/attention.py`` and
``svg/models/hyvideo/attention.py`` (``WanAttn_EARAttn_Processor``, ``Hunyuan_EARAttn_Processor``). Their EAR
processors hard-code min_kc_ratio 0.05 for the guaranteed clusters and twice that (0.10) as the budget's floor: here
``guaranteed_ratio`` (0.05) and the config's ``min_kc_ratio`` (0.10 in every preset), equal at the defaults.

Deliberate differences (none changes the method at the defaults beyond what is said):
  * Empty key clusters: theirs weigh 1e-6 in compensation (``log(n + 1e-6)``) and get value 0 in routing; here they
    weigh 0 and are never routed (they hold no key).
  * Joint text (HunyuanVideo): theirs append the prompt and its padding as two extra key clusters with zero
    centroids, so the padding cluster adds (padding length) x e^0 with a zero value to every video query's softmax
    denominator; here text stays exact (every video query attends all real text keys, padding never contributes).
  * ``target_density`` (our extension, for matched-density sweeps): the budget is that share of the video token pairs
    per (batch, head), given after the guaranteed clusters greedily by value over all pairs.
  * Counts use ceil (``min_key_clusters``) where theirs truncate; equal whenever ratio x Ck is an integer.
  * The probe runs as one Triton kernel (``probe="triton"``, auto's choice on CUDA: ``svg2_kernels.ear_probe``,
    fp32 sums, the dot as three TF32 products) or as chunked fp32 torch ops (``probe="torch"``, auto's choice
    elsewhere); the compensation runs through ``svg2.compensation``. experiments/bench_compensation.py measures
    both: on an H200 at (Cq, Ck) = (300, 1000), 75,600 tokens, 40 heads x 128, the fused probe takes 19.2 ms
    against 93.4 ms, its log error within 4.4e-6 of a float64 evaluation (torch: 6.8e-6), and the whole SVG-EAR
    call 111 ms against 186 ms (results/compensation/bench_ear_probe.md).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Any

import torch

from svg2.attention import _build_clusters, build_layout, dense_attention, svg2_attention, validate_qkv
from svg2.compensation import KeySummary, segment_ids, segment_means, summarize_key_clusters
from svg2.config import SVG2Config
from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, AttentionMethod, compensation_record, dense_schedule, register_method
from svg2.selection import centroid_scores, min_key_clusters
from svg2_kernels import AttentionInputs, select_attention_variant
from svg2_kernels.ear_probe import ear_log_error_triton

__all__ = ["SVGEARMethod", "ear_log_error", "ear_select"]

_EPS = 1e-8  # floor of the estimated error, as the authors'
EAR_PROBES = ("auto", "triton", "torch")
_CHUNK_ELEMS = 1 << 26


def ear_log_error(
    q_centroids: torch.Tensor,
    k_sorted: torch.Tensor,
    v_sorted: torch.Tensor,
    k_centroids: torch.Tensor,
    v_means: torch.Tensor,
    k_sizes: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """log of the compensation error ``E_ij = Σ_{y in K_j} || e^{a_y} v_y - e^{c_ij} v̄_j ||²`` of every
    (query cluster, key cluster) pair, floored at log(1e-8).

    Args:
        q_centroids: (N, Cq, D); k_centroids, v_means: (N, Ck, D) (N = batch x heads).
        k_sorted, v_sorted: (N, S, D) keys and values in cluster order (contiguous clusters, sizes ``k_sizes``
            (N, Ck); rows past the last cluster are ignored).
        scale: softmax scale.
    Returns:
        (N, Cq, Ck) float32. Expanded as Σ e^{2a}|v|² - 2 e^{c} Σ e^{a} <v, v̄> + n e^{2c} |v̄|² with every
        exponent taken relative to M = max(c, max_y a_y) per pair (the authors' running maximum), in fp32.
    """
    n, cq, d = q_centroids.shape
    s = k_sorted.shape[1]
    ck = k_sizes.shape[-1]
    offsets = torch.nn.functional.pad(torch.cumsum(k_sizes.long(), -1), (1, 0))
    seg = segment_ids(offsets, s)  # (N, S) in [0, Ck]; Ck = past the last cluster
    qc = q_centroids.float()
    vm = v_means.float()
    vm_pad = torch.nn.functional.pad(vm, (0, 0, 0, 1))
    vbar2 = (vm * vm).sum(-1)  # (N, Ck)
    sizes = k_sizes.float()
    cen = torch.matmul(qc, k_centroids.float().transpose(1, 2)) * scale  # (N, Cq, Ck)
    out = torch.empty(n, cq, ck, dtype=torch.float32, device=qc.device)
    heads = max(1, _CHUNK_ELEMS // max(1, s * d))  # fp32 copies of K and V, a few heads at a time
    for i0 in range(0, n, heads):
        i1 = min(n, i0 + heads)
        kf, vf, sg = k_sorted[i0:i1].float(), v_sorted[i0:i1].float(), seg[i0:i1]
        vnorm2 = (vf * vf).sum(-1)  # (h, S): |v_y|²
        vdot = (vf * torch.gather(vm_pad[i0:i1], 1, sg[..., None].expand(-1, -1, d))).sum(-1)  # <v_y, v̄_j(y)>
        rows = max(1, _CHUNK_ELEMS // max(1, (i1 - i0) * s))
        for r0 in range(0, cq, rows):
            r1 = min(cq, r0 + rows)
            a = torch.matmul(qc[i0:i1, r0:r1], kf.transpose(1, 2)).mul_(scale)  # (h, r, S)
            idx = sg[:, None, :].expand_as(a)
            shape = (i1 - i0, r1 - r0, ck + 1)
            seg_max = torch.full(shape, float("-inf"), device=a.device).scatter_reduce_(2, idx, a, "amax")
            c = cen[i0:i1, r0:r1]
            m = torch.maximum(seg_max[..., :ck], c)  # finite: c is
            e = torch.exp(a - torch.gather(torch.nn.functional.pad(m, (0, 1)), 2, idx))  # <= 1
            t1 = torch.zeros(shape, device=a.device).scatter_add_(2, idx, e * e * vnorm2[:, None, :])[..., :ck]
            t2 = torch.zeros(shape, device=a.device).scatter_add_(2, idx, e * vdot[:, None, :])[..., :ck]
            pc = torch.exp(c - m)
            err = t1 - 2.0 * pc * t2 + sizes[i0:i1, None, :] * pc * pc * vbar2[i0:i1, None, :]
            log_err = 2.0 * m + torch.log(err.clamp_min(0.0))  # cancellation below 0 is an exact fit: -inf
            out[i0:i1, r0:r1] = log_err.clamp_min(math.log(_EPS))
    return out


def ear_select(
    log_err: torch.Tensor,
    scores: torch.Tensor,
    q_sizes: torch.Tensor,
    k_sizes: torch.Tensor,
    *,
    top_p: float,
    min_kc_ratio: float,
    guaranteed_ratio: float = 0.05,
    gamma: float = 1.0,
    target_density: float | None = None,
) -> torch.Tensor:
    """Error-aware routing: which cluster pairs are computed exactly (see the module docstring, steps 2-5).

    Args:
        log_err: (N, Cq, Ck) from ``ear_log_error``; scores: (N, Cq, Ck) size-weighted centroid scores
            (``svg2.selection.centroid_scores``), rows sum to 1; q_sizes (N, Cq), k_sizes (N, Ck) int.
        top_p, min_kc_ratio: SVG2's selection, which sets each query cluster's budget of token pairs.
        guaranteed_ratio: share of key clusters (best by score) every query cluster always computes.
        gamma: weight of the cost in the value ``log E - gamma * log(pairs)``.
        target_density: instead of per-query-cluster budgets, one budget of this share of the token pairs per
            batch entry (matched-density sweeps).
    Returns:
        block_map (N, Cq, Ck) bool.
    """
    n, cq, ck = scores.shape
    if top_p >= 1.0 and target_density is None:
        return torch.ones_like(scores, dtype=torch.bool)
    area = q_sizes.double()[:, :, None] * k_sizes.double()[:, None, :]  # token pairs per block (exact)
    value = log_err - gamma * torch.log(area.float())
    value = value.masked_fill((area == 0) | ~torch.isfinite(value), float("-inf"))  # empty blocks: never routed
    sorted_p, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(ck, device=scores.device)
    g = min_key_clusters(guaranteed_ratio, ck) if guaranteed_ratio > 0 else 0
    guaranteed = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, (rank < g).expand(n, cq, ck))
    guaranteed_cost = (area * guaranteed).sum(-1)  # (N, Cq)
    candidates = value.masked_fill(guaranteed, float("-inf"))
    if target_density is None:
        before = torch.cumsum(sorted_p, -1) - sorted_p
        in_budget = (before <= top_p) | (rank < min_key_clusters(min_kc_ratio, ck))  # the authors' `<=`
        budget = (torch.gather(area, -1, order) * in_budget).sum(-1)
        remaining = (budget - guaranteed_cost).clamp_min(0.0)[..., None]  # (N, Cq, 1)
        flat_value, flat_area = candidates, area
    else:
        total = q_sizes.double().sum(-1) * k_sizes.double().sum(-1)
        remaining = (target_density * total - guaranteed_cost.sum(-1)).clamp_min(0.0)[:, None]  # (N, 1)
        flat_value, flat_area = candidates.reshape(n, cq * ck), area.reshape(n, cq * ck)
    v_sorted, v_order = flat_value.sort(dim=-1, descending=True)
    cost = torch.gather(flat_area, -1, v_order)
    keep = ((torch.cumsum(cost, -1) - cost) < remaining) & torch.isfinite(v_sorted)
    routed = torch.zeros_like(keep).scatter_(-1, v_order, keep).reshape(n, cq, ck)
    return guaranteed | routed


@register_method("svg_ear")
class SVGEARMethod(AttentionMethod):
    """SVG-EAR: SVG2 clusters, error-aware routing, compensation of every skipped cluster (always on).

    Takes an SVG2Config (clustering, top_p / min_kc_ratio for the budget, schedule, kernels, ``layout_every``);
    ``cfg.compensate`` must be True (the default config here sets it). Own knobs: ``gamma``, ``guaranteed_ratio``,
    ``probe`` ("auto": the fused Triton kernel on CUDA, torch elsewhere; "triton": the fused kernel, CUDA or
    Triton's interpreter; "torch": chunked torch ops; the one that ran is ``last_kernels["probe"]`` of the call site's
    ClusterState).
    """

    def __init__(self, cfg: SVG2Config | None = None, *, gamma: float = 1.0, guaranteed_ratio: float = 0.05,
                 probe: str = "auto", **overrides: Any) -> None:
        cfg = cfg or SVG2Config(compensate=True)
        cfg = cfg.replace(**overrides) if overrides else cfg
        if not cfg.compensate:
            raise ValueError("svg_ear always compensates the skipped clusters: its routing ranks clusters by the "
                             "error of that compensation, so dropping them instead makes no sense. Set "
                             "compensate=True (conf/method/svg_ear.yaml does), or use method=svg2 to drop them")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma={gamma} must be a finite number >= 0 (1 = error per token pair)")
        if not 0.0 <= guaranteed_ratio <= 1.0:
            raise ValueError(f"guaranteed_ratio={guaranteed_ratio} must be in [0, 1]")
        if probe not in EAR_PROBES:
            raise ValueError(f"probe={probe!r} is not one of {EAR_PROBES} (triton: the fused kernel, torch: chunked "
                             "torch ops, auto: triton on CUDA, torch elsewhere)")
        self.probe = probe
        self.cfg = cfg
        self.gamma = float(gamma)
        self.guaranteed_ratio = float(guaranteed_ratio)

    def is_dense_call(self, ctx: AttentionContext) -> bool:
        return dense_schedule(self.cfg.dense_steps_frac, self.cfg.dense_layers, ctx)

    def _probe_backend(self, q: torch.Tensor) -> str:
        """The probe that runs on q's device: the named one (triton: CUDA, or the CPU under Triton's interpreter),
        or for ``auto`` the fused probe on CUDA (5x faster there and as accurate, measured on an H200) and torch
        ops elsewhere (the interpreter is for tests, not speed)."""
        from svg2_kernels._triton import HAS_TRITON, TRITON_MISSING, interpreting

        runs_triton = HAS_TRITON and (q.device.type == "cuda" or interpreting())
        if self.probe == "triton" and not runs_triton:
            why = TRITON_MISSING if not HAS_TRITON else f"device '{q.device.type}' is not cuda"
            raise NotImplementedError(f"the triton probe cannot run here: {why}. Use probe='torch' or 'auto'")
        if self.probe == "auto":
            return "triton" if HAS_TRITON and q.device.type == "cuda" else "torch"
        return self.probe

    def route(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, state
              ) -> tuple[ClusterLayout, KeySummary]:
        """Cluster (warm-started on ``state``), probe and route one call. Shapes (B, H, S, D).
        Returns the layout and the key clusters' summary of these K and V."""
        cfg = self.cfg
        b, h, s, d = q.shape
        t = ctx.num_text_tokens
        sv = s - t
        scale = 1.0 / math.sqrt(d) if ctx.scale is None else ctx.scale
        timer = ctx.state.timer
        built = _build_clusters(q, k, cfg, state, num_text_tokens=t, text_mask=ctx.text_mask, scale=scale,
                                timer=timer, sort_k=True, heads=ctx.heads)
        lay = built.layout
        gather = select_attention_variant(cfg.attention_kernel, AttentionInputs.of(q, k)).gather_rows
        with (timer.section("selection", q.device) if timer is not None else nullcontext()):
            ks = built.k_sorted if built.k_sorted is not None else gather(k[:, :, :sv], lay.k_perm)
            vs = gather(v[:, :, :sv], lay.k_perm)
            summary = summarize_key_clusters(ks, vs, lay.k_sizes, built.k_centroids)
            qc = built.q_centroids
            if qc is None:  # a 0-iteration warm start only assigned: take the means of these clusters
                qc = segment_means(gather(q[:, :, :sv], lay.q_perm), lay.q_sizes)
            n, cq, ck = b * h, lay.num_q_clusters, lay.num_k_clusters
            kc = summary.centroids.reshape(n, ck, d)
            probe = self._probe_backend(q)
            probe_fn = ear_log_error_triton if probe == "triton" else ear_log_error
            log_err = probe_fn(qc.reshape(n, cq, d), ks.reshape(n, sv, d), vs.reshape(n, sv, d), kc,
                               summary.value_means.reshape(n, ck, d), lay.k_sizes.reshape(n, ck), scale)
            state.last_kernels["probe"] = probe
            scores = centroid_scores(qc.reshape(n, cq, d), kc, lay.k_sizes.reshape(n, ck), scale)
            block_map = ear_select(log_err, scores, lay.q_sizes.reshape(n, cq), lay.k_sizes.reshape(n, ck),
                                   top_p=cfg.top_p, min_kc_ratio=cfg.min_kc_ratio,
                                   guaranteed_ratio=self.guaranteed_ratio, gamma=self.gamma,
                                   target_density=cfg.target_density)
        return dataclasses.replace(lay, block_map=block_map.view(b, h, cq, ck)), summary

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cfg = self.cfg
        state = ctx.state.cluster_state(*ctx.site())
        base = dict(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch)
        t, tm = ctx.num_text_tokens, ctx.text_mask
        if self.is_dense_call(ctx):
            n_dense = math.floor(cfg.dense_steps_frac * ctx.num_steps)
            if cfg.seed_centroids_in_warmup and ctx.step_index == n_dense - 1 and ctx.layer_index >= cfg.dense_layers:
                build_layout(q, k, cfg, state, num_text_tokens=t, text_mask=tm, scale=ctx.scale, heads=ctx.heads)
            out = dense_attention(q, k, v, num_text_tokens=t, text_mask=tm, scale=ctx.scale)
            ctx.state.record(**base, density=1.0, dense=True)
            return out
        validate_qkv(q, k, v, t, tm, ctx.check_finite)
        layout = state.reusable_layout(cfg.layout_every, q, t, tm)
        reused, summary = layout is not None, None  # a reused layout's summary comes from these K, V
        if layout is None:
            layout, summary = self.route(q, k, v, ctx, state)
            state.keep_layout(layout, cfg.layout_every)
        out, layout = svg2_attention(q, k, v, cfg, state, num_text_tokens=t, text_mask=tm, scale=ctx.scale,
                                     layout=layout, check_finite=False, timer=ctx.state.timer, key_summary=summary)
        state.last_layout_reused = reused
        ctx.state.record(**base, density=layout.density_per_head().mean(), dense=False,
                         kernel=state.last_kernels.get("attention"), kmeans_kernel=state.last_kernels.get("kmeans"),
                         **compensation_record(cfg, state))
        return out

    def describe(self) -> dict[str, Any]:
        # the probe is part of the row key: auto's choice on CUDA changed from torch to triton
        return {"method": self.name, **self.cfg.to_dict(), "gamma": self.gamma,
                "guaranteed_ratio": self.guaranteed_ratio, "probe": self.probe}
