"""Quality vs speed Pareto plots: one figure per model, one panel per metric, one curve per method.

x is the speedup over dense (or the latency when no dense baseline exists), y is PSNR / SSIM / LPIPS against
the dense video; every point is annotated with its attention density. Written as PNG and SVG.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["pareto_front", "plot_pareto"]

_METRICS = [("psnr", "PSNR (dB) ↑", True), ("ssim", "SSIM ↑", True), ("lpips", "LPIPS ↓", False)]


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


def plot_pareto(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write ``pareto_<model>.png`` and ``.svg`` for every model in ``summary`` (see analysis.tables)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if summary.empty:
        return written
    for model, g in summary.groupby("model", sort=False):
        use_speedup = g["speedup"].notna().any()
        xcol, xlabel = ("speedup", "speedup over dense (×) →") if use_speedup else ("latency_s", "latency (s) ←")
        metrics = [(m, lab, hi) for m, lab, hi in _METRICS
                   if g.loc[~g["is_dense"], m].replace([np.inf, -np.inf], np.nan).notna().any()]
        if not metrics:
            metrics = [("density", "density", False)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
        sparse = g[~g["is_dense"]]
        for ax, (m, label, higher) in zip(axes[0], metrics):
            for meth, mg in sparse.groupby("label", sort=False):
                mg = mg[np.isfinite(mg[xcol].astype(float)) & np.isfinite(mg[m].astype(float))]
                if mg.empty:
                    continue
                mg = mg.sort_values(["density", xcol])  # the curve follows the density knob
                x, y = mg[xcol].to_numpy(float), mg[m].to_numpy(float)
                (line,) = ax.plot(x, y, "o-", label=str(meth), alpha=0.9, ms=5)
                front = pareto_front(x, y, higher)
                if len(front) < len(x):
                    ax.plot(x[front], y[front], "-", color=line.get_color(), lw=2.5, alpha=0.35)
                for xi, yi, d in zip(x, y, mg["density"].to_numpy(float)):
                    if np.isfinite(d):
                        ax.annotate(f"{d:.0%}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=line.get_color())
            if use_speedup:
                ax.axvline(1.0, color="0.5", ls="--", lw=1, label="dense")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8, loc="best")
        first = g.iloc[0]
        sub = ", ".join(str(v) for v in (
            f"{int(first['width'])}x{int(first['height'])}" if "width" in g and pd.notna(first.get("width")) else None,
            f"{int(first['num_frames'])} frames" if pd.notna(first.get("num_frames", np.nan)) else None,
            first.get("gpu")) if v)
        fig.suptitle(f"{model}: quality vs speed (density annotated)" + (f"\n{sub}" if sub else ""), fontsize=10)
        fig.tight_layout()
        for ext in ("png", "svg"):
            p = out_dir / f"pareto_{_slug(str(model))}.{ext}"
            fig.savefig(p, dpi=130 if ext == "png" else None)
            written.append(p)
        plt.close(fig)
    return written
