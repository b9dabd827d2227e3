"""Attention recall and output error of sparse attention methods vs density, plus an opt-in Q/K/V recorder.

*Recall* of a mask on a query row is the share of the row's exact attention probability mass that the mask
keeps; the *relative output error* is ||o_sparse - o_dense|| / ||o_dense|| over the sampled rows, with
o_sparse the renormalised attention under the mask (exactly what the variable-block kernel computes).
Both are measured per (batch, head) on ``num_rows`` sampled video query rows; text keys (joint text models)
are always kept, padded text keys always masked, as in every method.

The *bound* (``svg2.attention_structure.recall_bound``) is the largest recall any mask keeping as many token
pairs reaches: the mass of the top-k exact attention weights. Every method row carries ``bound`` (the pooled
top-k over its sampled rows, k = the pairs its layout keeps there: no layout of that density does better,
whatever its shape) and ``bound_row`` (each row's top density x keys: the bound for layouts giving every row
the same budget; a method with uneven row budgets, e.g. SVG2's clusters, can exceed it). The CLI (and
``recall_sweep(..., bound_curve=True)``) also adds one ``bound`` row (method ``"bound"``) per target density,
drawn as the bound curve. The exact-score methods (``oracle_raster``, ``oracle_kmeans``) are recall-greedy
selections over one partition, not bounds.

Head types (``--by-head-type``): every (record, batch, head) is classified by ``HeadTypeRule`` from its own
Q/K (``svg2.attention_structure.head_stats`` / ``classify_heads``): ``uniform`` (top-15% mass below a
threshold), ``local`` (most of the top mass within +-1 frame, +-4 tokens), ``temporal`` (most of it at the
query's own position in other frames) or ``content`` (most of it elsewhere). Content is inferred from
geometry only: recorded Q/K/V carry no object ids, so no head is classified by content affinity to objects.
Records without a ``video_shape`` are tagged ``unknown``.

Workflow:
  1. during a generation run, wrap the installed method with a recorder (opt-in; writes Q/K/V of selected
     layers / steps / branches / heads to disk)::

         recorder = QKVRecorder("runs/qkv", layers=[10, 20], steps=[10, 25, 40], heads=[0, 5])
         method = RecordingMethod(build_method("svg2"), recorder)   # install `method` as usual

  2. offline: ``python -m analysis.recall --records runs/qkv --out recall.png --csv recall.csv``
     (or ``--synthetic 8,16,16`` for synthetic heads with known structure): every method of the grid is
     evaluated at several densities on the same Q/K/V, one curve per method, and the bound;
     ``--by-head-type`` adds the table of recall and output error per method per head type.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from svg2.attention import ClusterState, build_layout
from svg2.attention_structure import BOUND, HEAD_TYPES, classify_heads, head_stats, recall_bound
from svg2.layout import ClusterLayout
from svg2.methods import AttentionContext, AttentionMethod, MethodState, build_method
from svg2.methods.blockwise import VIDEO_SHAPE_KEY, LayoutMethod, layout_mask_rows
from svg2.methods.svg2 import SVG2Method
from svg2.methods.svg_ear import SVGEARMethod

__all__ = [
    "BOUND",
    "HeadTypeRule",
    "RecallResult",
    "attention_recall",
    "method_layout",
    "method_output",
    "compensates",
    "shared_kmeans",
    "sample_rows",
    "MethodSpec",
    "default_grid",
    "target_density",
    "recall_sweep",
    "summarize",
    "head_type_table",
    "plot_recall",
    "QKVRecorder",
    "RecordingMethod",
    "load_qkv_records",
]


# ------------------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class RecallResult:
    """Per (batch, head) float64 tensors: token-pair density of the layout over the video block, attention
    recall and relative output error on the sampled rows, and ``rows_density``: the share of the video pairs
    of the sampled rows the layout keeps (the density its recall was earned with, which the bound takes)."""

    density: torch.Tensor
    recall: torch.Tensor
    rel_error: torch.Tensor
    rows_density: torch.Tensor | None = None


def sample_rows(num_video: int, num_rows: int | None, seed: int = 0, device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """``num_rows`` distinct video query rows (all rows when None or >= num_video), sorted, int64."""
    if num_rows is None or num_rows >= num_video:
        return torch.arange(num_video, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_video, generator=g)[:num_rows].sort().values.to(device)


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ClusterLayout | None,
    *,
    rows: torch.Tensor | None = None,
    num_rows: int | None = 256,
    scale: float | None = None,
    num_text_tokens: int = 0,
    text_mask: torch.Tensor | None = None,
    seed: int = 0,
    output: torch.Tensor | None = None,
) -> RecallResult:
    """Recall and relative output error of ``layout`` (None = dense) against exact attention.

    Args:
        q, k, v: (B, H, S, D), video tokens in raster order then ``num_text_tokens`` text tokens.
        layout: the method's ClusterLayout over the video tokens, or None for dense attention.
        rows: video query rows (r,) to evaluate; default ``sample_rows(S_video, num_rows, seed)``.
        output: the method's own output (B, H, S, D) of this call (``method_output``): the relative error is
            then that output's on the rows (with whatever the method adds to the kept pairs, e.g. the skipped
            clusters' compensation) instead of the renormalised softmax under ``layout``'s mask. Recall stays the
            mass of the pairs ``layout`` computes exactly.
    """
    b, h, s, d = q.shape
    sv = s - num_text_tokens
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if rows is None:
        rows = sample_rows(sv, num_rows, seed, q.device)
    r = rows.numel()
    scores = torch.matmul(q[:, :, rows].double(), k.double().transpose(-1, -2)) * scale  # (B, H, r, S)
    text_ok = torch.ones(b, 1, 1, num_text_tokens, dtype=torch.bool, device=q.device)
    if text_mask is not None:
        text_ok = text_mask[:, None, None, :]
    real = torch.cat([torch.ones(b, 1, 1, sv, dtype=torch.bool, device=q.device), text_ok], -1)
    p = torch.softmax(scores.masked_fill(~real, float("-inf")), -1)
    o_ref = p @ v.double()
    if layout is None:
        one = torch.ones(b, h, dtype=torch.float64, device=q.device)
        return RecallResult(one, one.clone(), torch.zeros_like(one), one.clone())
    video_keep = layout_mask_rows(layout, rows)  # (B, H, r, Sv)
    keep = torch.cat([video_keep, text_ok.expand(b, h, r, num_text_tokens)], -1)
    recall = (p * keep).sum(-1).mean(-1)
    if output is None:
        o = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0) @ v.double()
    else:
        o = output[:, :, rows].double()
    err = (o - o_ref).flatten(2).norm(dim=-1) / o_ref.flatten(2).norm(dim=-1).clamp_min(1e-30)
    rows_density = video_keep.sum((-1, -2)).double() / (r * sv)
    return RecallResult(layout.density_per_head().double(), recall, err, rows_density)


def method_layout(method: AttentionMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  ctx: AttentionContext) -> ClusterLayout | None:
    """The layout ``method`` would use on this call, ignoring its dense warm-up (None for dense methods).

    SVG2 runs its clustering cold unless ``ctx.state`` already holds centroids for this call site."""
    if isinstance(method, LayoutMethod):
        return method.layout(q, k, v, ctx)
    if isinstance(method, SVG2Method):
        state: ClusterState = ctx.state.cluster_state(*ctx.site())
        return build_layout(q, k, method.cfg, state, num_text_tokens=ctx.num_text_tokens,
                            text_mask=ctx.text_mask, scale=ctx.scale)
    if isinstance(method, SVGEARMethod):  # SVG2's clusters, error-aware routing (its own ``route``)
        return method.route(q, k, v, ctx, ctx.state.cluster_state(*ctx.site()))[0]
    if method.name == "dense":
        return None
    raise TypeError(f"cannot get a layout from method {method.name!r} ({type(method).__name__})")


def compensates(method: AttentionMethod) -> bool:
    """Whether ``method`` adds the skipped clusters' compensation to its kept pairs (SVG2 / blockwise methods with
    ``compensate=True``; SVG-EAR always): its output is then not the renormalised softmax under its mask."""
    cfg = getattr(method, "cfg", None)
    return bool(getattr(cfg, "compensate", False) or getattr(method, "compensate", False))


def method_output(method: AttentionMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  ctx: AttentionContext) -> torch.Tensor:
    """The output (B, H, S, D) of ``method``'s own call on q, k, v: compensation applied as the method applies it.

    The call must be a sparse one: build the method with ``dense_steps_frac=0, dense_layers=0`` (as
    ``recall_sweep`` does) to measure it at any step and layer. ``ctx.state`` should be fresh (a cold clustering,
    the one ``method_layout`` reproduces on another fresh state)."""
    if method.is_dense_call(ctx):
        raise ValueError(f"{method.name!r} schedules this call (layer {ctx.layer_index}, step {ctx.step_index}) "
                         "dense: build it with dense_steps_frac=0 and dense_layers=0")
    with torch.no_grad():
        return method(q, k, v, ctx)


@contextlib.contextmanager
def shared_kmeans() -> Iterator[dict]:
    """Inside the block, identical k-means calls of ``svg2.attention`` (same input tensor, cluster count,
    iterations, warm-start centroids, seed, kernel, heads) run once: every SVG2-clustered method of a record
    (SVG2 at every density, compensated or not, SVG-EAR, their layouts and their own calls) then uses the same
    clusters, bit for bit, at one clustering's cost. k-means is deterministic under its seed, so this changes no
    result, only the time (on CPU a cold 50-iteration clustering of 8,192 tokens x 6 heads takes ~20 s).
    ``sort_points`` is not part of the key: it only decides whether the sorted points come back too, which every
    caller recomputes when absent. Yields the cache (clear it between records: keys hold tensor addresses)."""
    import svg2.attention as attn_mod

    real = attn_mod.kmeans
    cache: dict = {}

    def cached(x, num_clusters, iters, init=None, *, seed=0, kernel="auto", sort_points=False, heads=None):
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, num_clusters, iters,
               None if init is None else init.data_ptr(), seed, kernel, heads)
        if key not in cache:
            cache[key] = (real(x, num_clusters, iters, init, seed=seed, kernel=kernel, sort_points=sort_points,
                               heads=heads), x)  # keep x alive: its address stays its own
        return cache[key][0]

    attn_mod.kmeans = cached
    try:
        yield cache
    finally:
        attn_mod.kmeans = real


# -------------------------------------------------------------------------------------------- sweeps
@dataclass(frozen=True)
class MethodSpec:
    """One point of a sweep: a curve label, a registered method name and its keyword arguments."""

    label: str
    method: str
    kwargs: dict[str, Any]


def default_grid(
    densities: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    *,
    block_size: int = 64,
    tile_size: tuple[int, int, int] = (6, 8, 8),
    num_q_centroids: int = 100,
    num_k_centroids: int = 500,
) -> list[MethodSpec]:
    """Every method at every target density (the matched-density comparison). ``block_size`` is the block
    of the block-based methods (positional, svg1, radial, oracle-raster); SVG2 and oracle-kmeans use the
    given cluster counts."""
    specs = []
    for dens in densities:
        td = float(dens)
        specs += [
            MethodSpec("svg2", "svg2", dict(num_q_centroids=num_q_centroids, num_k_centroids=num_k_centroids,
                                            target_density=td)),
            MethodSpec("positional", "positional", dict(block_size=block_size, target_density=td)),
            MethodSpec("svg1", "svg1", dict(block_size=block_size, target_density=td)),
            MethodSpec("radial", "radial", dict(block_size=block_size, target_density=td)),
            MethodSpec("sliding_tile", "sliding_tile", dict(tile_size=tile_size, target_density=td)),
            MethodSpec("exact-score raster blocks", "oracle_raster", dict(block_size=block_size, target_density=td)),
            MethodSpec("exact-score k-means clusters", "oracle_kmeans",
                       dict(num_q_centroids=num_q_centroids,
                            num_k_centroids=num_k_centroids, target_density=td)),
        ]
    return specs


def _record_context(rec: dict[str, Any], state: MethodState) -> AttentionContext:
    extra = {VIDEO_SHAPE_KEY: tuple(rec["video_shape"])} if rec.get("video_shape") is not None else {}
    return AttentionContext(layer_index=int(rec.get("layer", 0)), step_index=int(rec.get("step", 0)),
                            num_steps=int(rec.get("num_steps", 1)), branch=str(rec.get("branch", "cond")),
                            num_text_tokens=int(rec.get("num_text_tokens", 0)), text_mask=rec.get("text_mask"),
                            scale=rec.get("scale"), state=state, extra=extra)


def target_density(spec: MethodSpec) -> float | None:
    """The density a spec aims at (``target_density``, else SVG1's own ``density`` knob), or None (top-p)."""
    value = spec.kwargs.get("target_density")
    if value is None:
        value = spec.kwargs.get("density")
    return None if value is None else float(value)


@dataclass(frozen=True)
class HeadTypeRule:
    """How ``recall_sweep`` classifies heads (``svg2.attention_structure.head_stats`` then ``classify_heads``).

    ``top_frac``: the concentration measure is the mass of each row's top ``top_frac`` keys; ``uniform_below``:
    heads below it are ``uniform``; ``window`` (frames, rows, cols): the local window whose share of the top
    mass makes a head ``local`` (at least ``local_share``); ``column`` (rows, cols): the query's own position,
    whose share through time makes a head ``temporal``; the rest are ``content``. ``num_rows`` query rows are
    sampled per head (seed: the record index)."""

    top_frac: float = 0.15
    uniform_below: float = 0.3
    local_share: float = 0.5
    window: tuple[int, int, int] = (1, 4, 4)
    column: tuple[int, int] = (1, 1)
    num_rows: int = 512

    def classify(self, q: torch.Tensor, k: torch.Tensor, video_shape: Sequence[int] | None, *,
                 scale: float | None = None, seed: int = 0) -> list[list[str]]:
        """Head type per (batch, head) of q, k (B, H, S, D) whose first prod(video_shape) tokens are video
        tokens in raster order (text tokens after them are left out: the types are about the video grid).
        Without a video shape every head is ``unknown``."""
        b, h = q.shape[:2]
        if video_shape is None:
            return [["unknown"] * h for _ in range(b)]
        grid = tuple(int(x) for x in video_shape)
        sv = math.prod(grid)
        return [classify_heads(head_stats(q[bi:bi + 1, :, :sv], k[bi:bi + 1, :, :sv], grid, top_frac=self.top_frac,
                                          window=self.window, column=self.column, num_rows=self.num_rows,
                                          seed=seed, scale=scale),
                               uniform_below=self.uniform_below, local_share=self.local_share)
                for bi in range(b)]


def recall_sweep(
    records: Iterable[dict[str, Any]],
    specs: Sequence[MethodSpec],
    *,
    num_rows: int | None = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    bound: bool = True,
    bound_curve: bool = False,
    head_types: HeadTypeRule | None = None,
    share_clusters: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate every spec on every record (dicts with q, k, v (B, H, S, D) and optional layer, step,
    branch, heads, video_shape, num_text_tokens, text_mask, scale). Every method's sparse layout is
    evaluated on every record (its dense warm-up schedule is ignored).

    Returns one row per (record, spec, batch, head): density, recall, rel_error and, with ``bound``, the
    top-k ``bound`` / ``bound_row`` at the pairs the layout keeps on the sampled rows. ``bound_curve`` adds one
    ``BOUND`` row per (record, target density of the specs, batch, head) (rel_error None; the bound curve of
    ``plot_recall``; off by default because callers such as ``experiments/testbed_structure.py`` add their own
    with ``svg2.testbed.structure.bound_rows``). With ``head_types`` every row gets ``head_type``
    (``HeadTypeRule.classify``).

    A method that compensates its skipped clusters (``compensates``: SVG2 with ``compensate=True``, SVG-EAR) is
    also run as itself (``method_output``, its dense warm-up switched off): its ``rel_error`` is that of its
    own output, compensation included, and its rows say ``compensated=True``; recall stays the mass of the pairs
    it computes exactly. ``share_clusters``: the methods of one record share their k-means runs
    (``shared_kmeans``: identical clusters, one clustering's cost)."""
    out = []
    for ri, rec in enumerate(records):
        with shared_kmeans() if share_clusters else contextlib.nullcontext():
            out += _sweep_record(ri, rec, specs, num_rows=num_rows, seed=seed, device=device, bound=bound,
                                 bound_curve=bound_curve, head_types=head_types)
    return out


def _sweep_record(ri: int, rec: dict[str, Any], specs: Sequence[MethodSpec], *, num_rows: int | None, seed: int,
                  device: torch.device | str, bound: bool, bound_curve: bool,
                  head_types: HeadTypeRule | None) -> list[dict[str, Any]]:
    """``recall_sweep``'s rows of record ``ri``."""
    out = []
    q, k, v = (rec[name].to(device=device, dtype=torch.float32) for name in ("q", "k", "v"))
    heads = rec.get("heads") or list(range(q.shape[1]))
    num_text = int(rec.get("num_text_tokens", 0))
    rows = sample_rows(q.shape[2] - num_text, num_rows, seed + ri, device)  # the bound needs the same rows
    results = []
    own = []  # per spec: whether rel_error is the method's own (compensated) output's
    for spec in specs:
        method = build_method(spec.method, **spec.kwargs)  # method_layout ignores the warm-up
        output = None
        if compensates(method):  # its error must include its compensation: run it as itself, never dense
            method = build_method(spec.method, **{**spec.kwargs, "dense_steps_frac": 0.0, "dense_layers": 0})
            call_ctx = _record_context(rec, MethodState())
            output = method_output(method, q, k, v, call_ctx)
            called = float(call_ctx.state.records[-1]["density"])
        ctx = _record_context(rec, MethodState())
        layout = method_layout(method, q, k, v, ctx)
        if output is not None and abs(called - float(layout.density_per_head().mean())) > 1e-9:
            raise RuntimeError(f"{spec.label}: its call kept density {called:.6f}, the layout measured here "
                               f"{float(layout.density_per_head().mean()):.6f}: not the same layout")
        res = attention_recall(q, k, v, layout, rows=rows, scale=ctx.scale,
                               num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask, output=output)
        results.append((spec.label, json.dumps(spec.kwargs), res.density, res.recall, res.rel_error,
                        res.rows_density))
        own.append(output is not None)
    ctx = _record_context(rec, MethodState())
    if bound or bound_curve:
        targets = sorted({d for d in map(target_density, specs) if d is not None}) if bound_curve else []
        b, h = q.shape[:2]
        # every layout's own kept share and every target density, read off one sort per head
        dens = torch.stack([rows_density.cpu() for *_, rows_density in results]
                           + [torch.full((b, h), d, dtype=torch.float64) for d in targets])
        tk = recall_bound(q, k, dens, rows=rows, scale=ctx.scale, num_text_tokens=ctx.num_text_tokens,
                          text_mask=ctx.text_mask)
        pooled, per_row = tk.pooled.cpu(), tk.per_row.cpu()
        for ti, d in enumerate(targets):
            results.append((BOUND, json.dumps({"target_density": d}), torch.full((b, h), d, dtype=torch.float64),
                            pooled[len(specs) + ti], None, None))
    types = head_types.classify(q, k, rec.get("video_shape"), scale=ctx.scale, seed=ri) if head_types else None
    for i, (label, kwargs, density, recall, rel_error, _) in enumerate(results):
        for bi in range(q.shape[0]):
            for hi, head in enumerate(heads):
                row = dict(record=ri, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch,
                           batch=bi, head=int(head), method=label, kwargs=kwargs,
                           density=float(density[bi, hi]), recall=float(recall[bi, hi]),
                           rel_error=None if rel_error is None else float(rel_error[bi, hi]))
                if i < len(own):
                    row["compensated"] = own[i]
                if bound or bound_curve:
                    row.update(bound=float(pooled[i, bi, hi]), bound_row=float(per_row[i, bi, hi]))
                if types is not None:
                    row["head_type"] = types[bi][hi]
                out.append(row)
    return out


_MEANS = ("density", "recall", "rel_error", "bound", "bound_row")


def summarize(rows: Sequence[dict[str, Any]], by: str | None = None) -> list[dict[str, Any]]:
    """Mean density, recall, relative error, bound and bound_row (over the rows that have them; None when none
    does, as rel_error of ``BOUND`` rows) and the row count ``n`` per (method, kwargs), or per (``row[by]``,
    method, kwargs) with the group in ``by``'s column. Sorted by group, method, density."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        group = "" if by is None else str(row.get(by, "unknown"))
        groups[(group, row["method"], row["kwargs"])].append(row)
    out = []
    for (group, label, kwargs), g in groups.items():
        means = {}
        for key in _MEANS:
            vals = [float(r[key]) for r in g if r.get(key) not in (None, "")]
            means[key] = sum(vals) / len(vals) if vals else None
        out.append(dict(**({by: group} if by is not None else {}), method=label, kwargs=kwargs, n=len(g), **means))
    return sorted(out, key=lambda r: (r.get(by, "") if by else "", r["method"], r["density"]))


def head_type_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: mean recall, top-k bound and relative output error per head type, method and target
    density (rows of ``recall_sweep(..., head_types=...)``); ``n heads`` counts (record, batch, head) triples."""
    order = {t: i for i, t in enumerate((*HEAD_TYPES, "unknown"))}
    summary = sorted(summarize(rows, by="head_type"),
                     key=lambda r: (order.get(r["head_type"], len(order)), r["method"] == BOUND, r["method"],
                                    r["density"]))
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = ["| head type | method | target density | n heads | density | recall | bound | rel. error |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        target = json.loads(r["kwargs"]) if r["kwargs"] else {}
        td = target.get("target_density", target.get("density"))
        lines.append(f"| {r['head_type']} | {r['method']} | {fmt(td, '.2f')} | {r['n']} | {r['density']:.3f} | "
                     f"{r['recall']:.3f} | {fmt(r['bound'], '.3f')} | {fmt(r['rel_error'], '.4f')} |")
    return lines


def plot_recall(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Two panels, one curve per method: attention recall vs density and relative output error vs density
    (means over records and heads); the top-k ``bound`` (no mask of a density keeps more) in black on the
    recall panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in sorted({r["method"] for r in summary}):
        pts = [r for r in summary if r["method"] == label]
        x = [p["density"] for p in pts]
        if label == BOUND:
            ax_r.plot(x, [p["recall"] for p in pts], "k:", marker="_", ms=8, lw=1.5,
                      label="bound (top-k weights, any mask)")
            continue
        style = "--" if label.startswith("exact-score") else "-"
        ax_r.plot(x, [p["recall"] for p in pts], style, marker="o", ms=4, label=label)
        ax_e.plot(x, [p["rel_error"] for p in pts], style, marker="o", ms=4, label=label)
    ax_r.set(xlabel="density (kept share of token pairs)", ylabel="attention recall", ylim=(0, 1.02))
    ax_e.set(xlabel="density (kept share of token pairs)", ylabel="relative output error", yscale="log")
    for ax in (ax_r, ax_e):
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------- recording
class QKVRecorder:
    """Writes the Q/K/V of selected attention calls to ``out_dir`` (one ``.pt`` file per call).

    Each filter is a collection of allowed values, or None for all: ``layers`` (layer indices), ``steps``
    (denoising step indices), ``branches`` ("cond"/"uncond"), ``heads`` (head indices kept in the file).
    ``max_records`` caps the number of files. Tensors are stored on the CPU in ``dtype`` (float16 halves
    the size; a Wan 1.3B 480p call is 3 x 32760 x 128 x 2 bytes = 25 MB per head)."""

    def __init__(self, out_dir: str | Path, *, layers: Iterable[int] | None = None,
                 steps: Iterable[int] | None = None, branches: Iterable[str] | None = None,
                 heads: Iterable[int] | None = None, dtype: torch.dtype = torch.float16,
                 max_records: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.layers = None if layers is None else {int(x) for x in layers}
        self.steps = None if steps is None else {int(x) for x in steps}
        self.branches = None if branches is None else {str(x) for x in branches}
        self.heads = None if heads is None else sorted({int(x) for x in heads})
        self.dtype = dtype
        self.max_records = max_records
        self.written: list[Path] = []

    def wants(self, ctx: AttentionContext) -> bool:
        if self.max_records is not None and len(self.written) >= self.max_records:
            return False
        return ((self.layers is None or ctx.layer_index in self.layers)
                and (self.steps is None or ctx.step_index in self.steps)
                and (self.branches is None or ctx.branch in self.branches))

    def record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> Path | None:
        """Save this call if it passes the filters; returns the file written (or None)."""
        if not self.wants(ctx):
            return None
        heads = self.heads if self.heads is not None else list(range(q.shape[1]))
        heads = [h for h in heads if h < q.shape[1]]
        idx = torch.tensor(heads, device=q.device)
        pick = lambda x: x.index_select(1, idx).detach().to("cpu", self.dtype).contiguous()  # noqa: E731
        shape = ctx.extra.get(VIDEO_SHAPE_KEY)
        payload = dict(q=pick(q), k=pick(k), v=pick(v), heads=heads, layer=ctx.layer_index, step=ctx.step_index,
                       num_steps=ctx.num_steps, branch=ctx.branch, num_text_tokens=ctx.num_text_tokens,
                       text_mask=None if ctx.text_mask is None else ctx.text_mask.detach().cpu(),
                       scale=ctx.scale, video_shape=None if shape is None else tuple(int(x) for x in shape))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"qkv_L{ctx.layer_index:03d}_S{ctx.step_index:03d}_{ctx.branch}.pt"
        torch.save(payload, path)
        self.written.append(path)
        return path


class RecordingMethod(AttentionMethod):
    """Wraps any attention method: records Q/K/V through a ``QKVRecorder``, then runs the method unchanged."""

    def __init__(self, inner: AttentionMethod, recorder: QKVRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.name = inner.name

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        self.recorder.record(q, k, v, ctx)
        return self.inner(q, k, v, ctx)

    def is_dense_call(self, ctx: AttentionContext) -> bool:
        return self.inner.is_dense_call(ctx)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "recording": str(self.recorder.out_dir)}


def load_qkv_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a recorder directory (or one ``.pt`` file) in file-name order."""
    path = Path(path)
    files = sorted(path.glob("qkv_*.pt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no qkv_*.pt records in {path}")
    for f in files:
        yield torch.load(f, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--records", help="directory (or file) written by QKVRecorder")
    src.add_argument("--synthetic", help="T,H,W in tokens: synthetic heads of known structure")
    ap.add_argument("--kinds", default="spatial,temporal,semantic", help="synthetic head kinds")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--tile-size", default="6,8,8")
    ap.add_argument("--centroids", default="100,500", help="Cq,Ck of svg2 and oracle (k-means clusters)")
    ap.add_argument("--num-rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="recall.png")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--no-bound", action="store_true", help="skip the top-k recall bound (one sort per head)")
    ap.add_argument("--by-head-type", action="store_true",
                    help="classify every (record, batch, head) and tabulate recall / error per head type")
    ap.add_argument("--head-type-table", default=None,
                    help="where the per-head-type table goes (default: next to --out, <stem>_head_types.md)")
    ap.add_argument("--uniform-below", type=float, default=HeadTypeRule.uniform_below,
                    help="top-15%% mass below which a head is uniform")
    ap.add_argument("--local-share", type=float, default=HeadTypeRule.local_share,
                    help="share of the top mass inside the window (or at the own position) for local (temporal)")
    ap.add_argument("--window", default=",".join(map(str, HeadTypeRule.window)),
                    help="local window half-widths: frames,rows,cols (tokens)")
    args = ap.parse_args(argv)

    if args.synthetic:
        from analysis.synthetic import synthetic_qkv

        shape = tuple(int(x) for x in args.synthetic.split(","))
        q, k, v = synthetic_qkv(shape, args.kinds.split(","), head_dim=args.head_dim, seed=args.seed)
        records: Iterable[dict[str, Any]] = [dict(q=q, k=k, v=v, video_shape=shape)]
        title = f"synthetic heads ({args.kinds}), video {shape}, D={args.head_dim}"
    else:
        records = load_qkv_records(args.records)
        title = f"recorded Q/K/V: {args.records}"
    cq, ck = (int(x) for x in args.centroids.split(","))
    specs = default_grid([float(x) for x in args.densities.split(",")], block_size=args.block_size,
                         tile_size=tuple(int(x) for x in args.tile_size.split(",")), num_q_centroids=cq,
                         num_k_centroids=ck)
    rule = None
    if args.by_head_type:
        window = tuple(int(x) for x in args.window.split(","))
        rule = HeadTypeRule(uniform_below=args.uniform_below, local_share=args.local_share, window=window)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = recall_sweep(records, specs, num_rows=args.num_rows, seed=args.seed, device=device,
                        bound=not args.no_bound, bound_curve=not args.no_bound, head_types=rule)
    print(f"{'method':28s} {'density':>8s} {'recall':>8s} {'bound':>8s} {'rel_err':>8s}")
    for r in summarize(rows):
        bound = "-" if r["bound"] is None else f"{r['bound']:.3f}"
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}"
        print(f"{r['method']:28s} {r['density']:8.3f} {r['recall']:8.3f} {bound:>8s} {err:>8s}")
    print("plot:", plot_recall(rows, args.out, title))
    if rule is not None:
        lines = head_type_table(rows)
        print("\n".join(lines))
        table = Path(args.head_type_table or Path(args.out).with_name(Path(args.out).stem + "_head_types.md"))
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(f"# Recall and output error per head type: {title}\n\n" + "\n".join(lines) + "\n")
        print("head types:", table)
    if args.csv:
        import csv

        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for r in rows for key in r)))
            writer.writeheader()
            writer.writerows(rows)
        print("rows:", args.csv)


if __name__ == "__main__":
    main()
