"""Quality plots, one figure per model and one panel per metric, written as PNG and SVG:

* ``pareto_<model>``: quality against the speedup over dense (or the latency when no dense row exists), every
  point annotated with its attention density. Written only where latency is a result: not on the CPU, not
  where the run is overhead-bound (the summary's ``latency_caveat``).
* ``quality_density_<model>``: quality against the sparse-call density (the density of all calls where that
  is not recorded). Always written.

One series per method configuration without its density knob (``series``: e.g. SVG2 (Cq=100, Ck=500) over its
top-p values), in natural order (Cq=8 before Cq=32), points joined in density order, error bars the 95% CI;
the Pareto frontier over every point of a panel is drawn and labelled, the dense floor is a horizontal line,
and the legend sits outside the axes. The y axis spans the means (intervals wider than that run off the panel).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.tables import natural_key

__all__ = ["pareto_front", "plot_pareto", "plot_quality_density", "plot_all"]

_METRICS = [("psnr", "PSNR (dB) ↑", True), ("ssim", "SSIM ↑", True), ("lpips", "LPIPS ↓", False)]
_MARKERS = "osD^vP*Xh<>p"


def pareto_front(x: np.ndarray, y: np.ndarray, higher_y: bool = True) -> np.ndarray:
    """Indices of the points not dominated by any other (x higher is better), ordered by x."""
    order = np.argsort(-x, kind="stable")
    keep, best = [], -math.inf
    for i in order:
        v = y[i] if higher_y else -y[i]
        if v > best:
            keep.append(i)
            best = v
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def _flag(g: pd.DataFrame, col: str) -> pd.Series:
    return g[col].fillna(False).astype(bool) if col in g else pd.Series(False, index=g.index)


def _subtitle(g: pd.DataFrame) -> str:
    first = g.iloc[0]
    parts = [f"{int(first['width'])}x{int(first['height'])}" if "width" in g and pd.notna(first.get("width")) else None,
             f"{int(first['num_frames'])} frames" if pd.notna(first.get("num_frames", np.nan)) else None,
             first.get("gpu")]
    return ", ".join(str(p) for p in parts if p is not None and not (isinstance(p, float) and math.isnan(p)))


def _figure(g: pd.DataFrame, xcol: str, xlabel: str, higher_x: bool, title: str, stem: Path,
            annotate_density: bool, dense_line: float | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = g[~_flag(g, "is_dense") & ~_flag(g, "is_floor")]
    metrics = [(m, lab, hi) for m, lab, hi in _METRICS
               if m in points and points[m].replace([np.inf, -np.inf], np.nan).notna().any()]
    if not metrics:
        metrics = [("density", "density", False)]
    floor = g[_flag(g, "is_floor")]
    series = sorted(points["series"].dropna().unique() if "series" in points else [], key=natural_key)
    methods = list(dict.fromkeys(sorted(points.get("label", pd.Series(dtype=str)).astype(str), key=natural_key)))
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    for ax, (m, label, higher) in zip(axes[0], metrics):
        xs, ys = [], []
        for si, name in enumerate(series):
            sg = points[points["series"] == name]
            sg = sg[np.isfinite(sg[xcol].astype(float)) & np.isfinite(sg[m].astype(float))]
            if sg.empty:
                continue
            sg = sg.sort_values(["density", xcol])  # the curve follows the series' density knob
            x, y = sg[xcol].to_numpy(float), sg[m].to_numpy(float)
            err = sg[f"{m}_ci"].to_numpy(float) if f"{m}_ci" in sg else None
            marker = _MARKERS[methods.index(str(sg["label"].iloc[0])) % len(_MARKERS)] if methods else "o"
            color = cmap(si % cmap.N)
            ax.plot(x, y, "-", marker=marker, color=color, label=str(name), alpha=0.9, ms=5, zorder=3)
            if err is not None and np.isfinite(err).any():
                ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0.0), fmt="none", ecolor=color, alpha=0.35,
                            capsize=2, zorder=2)
            if annotate_density:
                for xi, yi, d in zip(x, y, sg["density"].to_numpy(float)):
                    if np.isfinite(d):
                        ax.annotate(f"{d:.0%}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=color)
            xs += list(x)
            ys += list(y)
        if len(xs) > 1:
            x, y = np.array(xs), np.array(ys)
            front = pareto_front(x if higher_x else -x, y, higher)
            fx, fy = x[front], y[front]
            order = np.argsort(fx)
            ax.plot(fx[order], fy[order], "--", color="black", lw=1.3, alpha=0.75, zorder=4,
                    label="Pareto frontier (all points)")
        fv = floor[m].astype(float) if m in floor else pd.Series(dtype=float)
        floor_v = float(fv[np.isfinite(fv)].iloc[0]) if np.isfinite(fv).any() else None  # inf: identical videos
        if floor_v is not None:
            ax.axhline(floor_v, color="0.4", ls=":", lw=1.2, label="dense floor (another exact path)")
        if dense_line is not None:
            ax.axvline(dense_line, color="0.5", ls="--", lw=1, label="dense")
        if ys:  # the axis follows the means: wide intervals (small n) run off the panel instead of flattening it
            lo, hi = min(ys), max(ys)
            if floor_v is not None:
                lo, hi = min(lo, floor_v), max(hi, floor_v)
            pad = 0.15 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[0][1:]:  # entries only another panel has (a floor measured on one metric only)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    sub = _subtitle(g)
    fig.suptitle(title + (f"\n{sub}" if sub else ""), fontsize=10)
    fig.tight_layout()
    written = []
    for ext in ("png", "svg"):
        p = stem.with_name(f"{stem.name}.{ext}")  # not with_suffix: model names have dots (wan2.1-t2v-14b)
        fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
        written.append(p)
    plt.close(fig)
    return written


def plot_pareto(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``pareto_<model>.png`` / ``.svg``: quality vs speedup, for every model whose latency is a result (no
    ``latency_caveat``; see analysis.tables)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if summary.empty:
        return written
    for model, g in summary.groupby("model", sort=False):
        if "latency_caveat" in g and g["latency_caveat"].notna().any():
            continue  # quality vs density instead (plot_quality_density)
        use_speedup = g["speedup"].notna().any()
        xcol, xlabel = ("speedup", "speedup over dense (×) →") if use_speedup else ("latency_s", "latency (s) ←")
        written += _figure(g, xcol, xlabel, use_speedup, f"{model}: quality vs speed (density annotated)",
                           out_dir / f"pareto_{_slug(str(model))}", annotate_density=True,
                           dense_line=1.0 if use_speedup else None)
    return written


def plot_quality_density(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``quality_density_<model>.png`` / ``.svg``: quality against the sparse-call density (lower is cheaper),
    for every model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if summary.empty:
        return written
    for model, g in summary.groupby("model", sort=False):
        pts = g[~_flag(g, "is_dense") & ~_flag(g, "is_floor")]
        sparse_ok = "density_sparse" in pts and len(pts) and pts["density_sparse"].astype(float).notna().all()
        xcol, xlabel = (("density_sparse", "sparse density (sparse calls only) ←") if sparse_ok
                        else ("density", "density (all attention calls) ←"))
        caveat = g["latency_caveat"].dropna().iloc[0] if "latency_caveat" in g and g["latency_caveat"].notna().any() \
            else None
        title = f"{model}: quality vs density" + (" (latency not a result here)" if caveat else "")
        written += _figure(g, xcol, xlabel, False, title, out_dir / f"quality_density_{_slug(str(model))}",
                           annotate_density=False, dense_line=None)
    return written


def plot_all(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Both plots (``pareto_<model>`` where latency is a result, ``quality_density_<model>`` always)."""
    return plot_pareto(summary, out_dir) + plot_quality_density(summary, out_dir)
