"""Attention recall and output error of sparse attention methods vs density, plus an opt-in Q/K/V recorder.

*Recall* of a mask on a query row is the share of the row's exact attention probability mass that the mask
keeps; the *relative output error* is ||o_sparse - o_dense|| / ||o_dense|| over the sampled rows, with
o_sparse the renormalised attention under the mask (exactly what the variable-block kernel computes).
Both are measured per (batch, head) on ``num_rows`` sampled video query rows; text keys (joint text models)
are always kept, padded text keys always masked, as in every method.

Workflow:
  1. during a generation run, wrap the installed method with a recorder (opt-in; writes Q/K/V of selected
     layers / steps / branches / heads to disk)::

         recorder = QKVRecorder("runs/qkv", layers=[10, 20], steps=[10, 25, 40], heads=[0, 5])
         method = RecordingMethod(build_method("svg2"), recorder)   # install `method` as usual

  2. offline: ``python -m analysis.recall --records runs/qkv --out recall.png --csv recall.csv``
     (or ``--synthetic 8,16,16`` for synthetic heads with known structure): every method of the grid is
     evaluated at several densities on the same Q/K/V, one curve per method.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from svg2.attention import ClusterState, build_layout
from svg2.layout import ClusterLayout
from svg2.methods import AttentionContext, AttentionMethod, MethodState, build_method
from svg2.methods.blockwise import VIDEO_SHAPE_KEY, LayoutMethod, layout_mask_rows
from svg2.methods.svg2 import SVG2Method

__all__ = [
    "RecallResult",
    "attention_recall",
    "method_layout",
    "sample_rows",
    "MethodSpec",
    "default_grid",
    "recall_sweep",
    "summarize",
    "plot_recall",
    "QKVRecorder",
    "RecordingMethod",
    "load_qkv_records",
]


# ------------------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class RecallResult:
    """Per (batch, head) float64 tensors: token-pair density of the layout over the video block, attention
    recall and relative output error on the sampled rows."""

    density: torch.Tensor
    recall: torch.Tensor
    rel_error: torch.Tensor


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
) -> RecallResult:
    """Recall and relative output error of ``layout`` (None = dense) against exact attention.

    Args:
        q, k, v: (B, H, S, D), video tokens in raster order then ``num_text_tokens`` text tokens.
        layout: the method's ClusterLayout over the video tokens, or None for dense attention.
        rows: video query rows (r,) to evaluate; default ``sample_rows(S_video, num_rows, seed)``.
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
        return RecallResult(one, one.clone(), torch.zeros_like(one))
    keep = torch.cat([layout_mask_rows(layout, rows), text_ok.expand(b, h, r, num_text_tokens)], -1)
    recall = (p * keep).sum(-1).mean(-1)
    o = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0) @ v.double()
    err = (o - o_ref).flatten(2).norm(dim=-1) / o_ref.flatten(2).norm(dim=-1).clamp_min(1e-30)
    return RecallResult(layout.density_per_head().double(), recall, err)


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
    if method.name == "dense":
        return None
    raise TypeError(f"cannot get a layout from method {method.name!r} ({type(method).__name__})")


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


def recall_sweep(
    records: Iterable[dict[str, Any]],
    specs: Sequence[MethodSpec],
    *,
    num_rows: int | None = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Evaluate every spec on every record (dicts with q, k, v (B, H, S, D) and optional layer, step,
    branch, heads, video_shape, num_text_tokens, text_mask, scale). Every method's sparse layout is
    evaluated on every record (its dense warm-up schedule is ignored).
    Returns one row per (record, spec, batch, head)."""
    out = []
    for ri, rec in enumerate(records):
        q, k, v = (rec[name].to(device=device, dtype=torch.float32) for name in ("q", "k", "v"))
        heads = rec.get("heads") or list(range(q.shape[1]))
        for spec in specs:
            method = build_method(spec.method, **spec.kwargs)  # method_layout ignores the warm-up
            ctx = _record_context(rec, MethodState())
            layout = method_layout(method, q, k, v, ctx)
            res = attention_recall(q, k, v, layout, num_rows=num_rows, scale=ctx.scale,
                                   num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask, seed=seed + ri)
            for bi in range(q.shape[0]):
                for hi, head in enumerate(heads):
                    out.append(dict(record=ri, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch,
                                    batch=bi, head=int(head), method=spec.label, kwargs=json.dumps(spec.kwargs),
                                    density=float(res.density[bi, hi]), recall=float(res.recall[bi, hi]),
                                    rel_error=float(res.rel_error[bi, hi])))
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean density, recall and relative error per (method, kwargs), sorted by method then density."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["kwargs"])].append(row)
    out = []
    for (label, kwargs), g in groups.items():
        means = {key: sum(r[key] for r in g) / len(g) for key in ("density", "recall", "rel_error")}
        out.append(dict(method=label, kwargs=kwargs, n=len(g), **means))
    return sorted(out, key=lambda r: (r["method"], r["density"]))


def plot_recall(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Two panels, one curve per method: attention recall vs density and relative output error vs density
    (means over records and heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in sorted({r["method"] for r in summary}):
        pts = [r for r in summary if r["method"] == label]
        style = "--" if label.startswith("exact-score") else "-"
        x = [p["density"] for p in pts]
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = recall_sweep(records, specs, num_rows=args.num_rows, seed=args.seed, device=device)
    print(f"{'method':28s} {'density':>8s} {'recall':>8s} {'rel_err':>8s}")
    for r in summarize(rows):
        print(f"{r['method']:28s} {r['density']:8.3f} {r['recall']:8.3f} {r['rel_error']:8.4f}")
    print("plot:", plot_recall(rows, args.out, title))
    if args.csv:
        import csv

        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print("rows:", args.csv)


if __name__ == "__main__":
    main()
