"""Result rows -> the paper's Table 1 layout (quality, density, latency, speedup per model and method).

``summarise(df)`` aggregates ``status == "ok"`` rows per (model, method variant): metrics averaged over
prompts and seeds (each row already averages over frames), density, latency, and the speedup against the
dense rows of the same (model, prompt, seed, device) -- or, where no dense row exists, against the timed
dense reference generation on the same device (``speedup_source = "reference"``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["add_variants", "summarise", "to_markdown", "to_latex", "TABLE1_COLUMNS", "failures"]

# Short names of the knobs that tell two configurations of one method apart.
_SHORT = {"top_p": "p", "num_q_centroids": "Cq", "num_k_centroids": "Ck", "target_density": "target",
          "dense_steps_frac": "warmup", "dense_layers": "dense layers", "min_kc_ratio": "min kc",
          "kernel_attention": "kernel", "kernel_kmeans": "kmeans kernel", "kmeans_iters_step": "iters"}

# (column, header, higher is better?, format)
TABLE1_COLUMNS = [
    ("psnr", "PSNR ↑", True, "{:.2f}"),
    ("ssim", "SSIM ↑", True, "{:.4f}"),
    ("lpips", "LPIPS ↓", False, "{:.4f}"),
    ("density", "Density", None, "{:.1%}"),  # every attention call of the video, dense warm-up included
    ("density_sparse", "Sparse density", None, "{:.1%}"),  # the sparse calls only (what the knob controls)
    ("latency_s", "Latency (s)", False, "{:.2f}"),
    ("speedup", "Speedup", True, "{:.2f}x"),
]


def _knobs(row: pd.Series) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    for col in ("svg2_config_json", "method_kwargs_json"):
        v = row.get(col)
        if isinstance(v, str) and v not in ("null", ""):
            knobs.update(json.loads(v) or {})
    if not row.get("method_stock", False):
        knobs["kernel_attention"] = row.get("kernel_attention")
    return knobs


def add_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``variant``: the method label plus the knobs that differ between its configurations in ``df``."""
    df = df.copy()
    if df.empty:
        df["variant"] = []
        return df
    if "method_label" not in df.columns:
        df["method_label"] = df.get("method", "?")
    knobs = [_knobs(r) for _, r in df.iterrows()]
    variants = []
    for i, (_, r) in enumerate(df.iterrows()):
        same = [knobs[j] for j in range(len(df)) if df.iloc[j]["method_label"] == r["method_label"]]
        keys = sorted({k for kn in same for k in kn})
        varying = [k for k in keys if len({json.dumps(kn.get(k), default=str) for kn in same}) > 1]
        parts = [f"{_SHORT.get(k, k)}={knobs[i].get(k)}" for k in varying]
        variants.append(r["method_label"] + (f" ({', '.join(parts)})" if parts else ""))
    df["variant"] = variants
    return df


def _lpips(df: pd.DataFrame) -> pd.Series:
    for c in ("lpips_alex", "lpips_vgg"):
        if c in df.columns and df[c].notna().any():
            return df[c].astype(float)
    return pd.Series(np.nan, index=df.index)


def summarise(df: pd.DataFrame, mp4: bool = False) -> pd.DataFrame:
    """One row per (model, variant), dense first. ``mp4=True`` uses the metrics measured on decoded MP4s."""
    if df.empty or "status" not in df.columns:
        return pd.DataFrame()
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    ok = add_variants(ok)
    sfx = "_mp4" if mp4 else ""
    for m in ("psnr", "ssim"):
        ok[m] = ok[m + sfx].astype(float) if m + sfx in ok.columns else np.nan
    lp = ok[[c for c in ok.columns if c in (f"lpips_alex{sfx}", f"lpips_vgg{sfx}")]]
    ok["lpips"] = _lpips(lp.rename(columns=lambda c: c.removesuffix(sfx))) if not lp.empty else np.nan
    lpips_net = next((n for n in ("alex", "vgg") if f"lpips_{n}{sfx}" in ok.columns
                      and ok[f"lpips_{n}{sfx}"].notna().any()), None)
    stock = ok.get("method_stock", pd.Series(False, index=ok.index)).fillna(False).astype(bool)
    ok["_is_dense"] = stock | (ok["method"] == "dense")
    ok["gpu"] = ok.get("gpu", pd.Series("?", index=ok.index)).fillna("?")
    match = ["model", "prompt_id", "seed", "gpu"]
    dense_lat = (ok[stock].groupby(match)["latency_s"].mean() if stock.any()
                 else pd.Series(dtype=float))
    out = []
    for (model, variant), g in ok.groupby(["model", "variant"], sort=False):
        rec: dict[str, Any] = {"model": model, "method": g["method"].iloc[0], "label": g["method_label"].iloc[0],
                               "variant": variant,
                               "is_dense": bool(g["_is_dense"].all()), "n": len(g)}
        for c in ("psnr", "ssim", "lpips"):
            vals = g[c].astype(float)
            rec[c] = float(vals.mean()) if vals.notna().any() else math.nan
        rec["lpips_net"] = lpips_net
        rec["density"] = float(g["density"].astype(float).mean()) if "density" in g else math.nan
        sparse = g["density_sparse"].astype(float) if "density_sparse" in g else pd.Series(dtype=float)
        rec["density_sparse"] = float(sparse.mean()) if sparse.notna().any() else math.nan
        rec["latency_s"] = float(g["latency_s"].astype(float).mean())
        # Speedup over the same (prompt, seed, device) set: ratio of mean latencies.
        keys = list(map(tuple, g[match].to_numpy()))
        paired = [(dense_lat.get(k), lat) for k, lat in zip(keys, g["latency_s"].astype(float))
                  if k in dense_lat.index]
        if paired:
            rec["speedup"] = float(np.mean([d for d, _ in paired]) / np.mean([t for _, t in paired]))
            rec["speedup_source"] = "dense rows"
        elif "ref_latency_s" in g and (g.get("ref_gpu") == g["gpu"]).all() and g["ref_latency_s"].notna().all():
            rec["speedup"] = float(g["ref_latency_s"].astype(float).mean() / g["latency_s"].astype(float).mean())
            rec["speedup_source"] = "reference"
        else:
            rec["speedup"], rec["speedup_source"] = math.nan, None
        for c in ("height", "width", "num_frames", "num_steps", "gpu"):
            if c in g:
                rec[c] = g[c].iloc[0]
        for c in ("cfg_top_p", "cfg_num_q_centroids", "cfg_num_k_centroids", "cfg_target_density",
                  "cfg_dense_steps_frac", "kernel_attention", "median_step_s", "warmup_s", "peak_mem_gb"):
            if c in g:
                v = g[c]
                rec[c] = v.iloc[0] if not pd.api.types.is_numeric_dtype(v) else float(v.astype(float).mean())
        out.append(rec)
    s = pd.DataFrame(out)
    s = s.sort_values(["model", "is_dense", "variant"], ascending=[True, False, True], kind="stable")
    return s.reset_index(drop=True)


def failures(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or "status" not in df.columns:
        return pd.DataFrame()
    f = df[df["status"] != "ok"]
    cols = [c for c in ("model", "method", "override_dirname", "prompt", "seed", "failed_stage", "error_type", "error")
            if c in f.columns]
    return f[cols].reset_index(drop=True)


def _fmt(v: Any, fmt: str, latex: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "--" if latex else "—"
    if isinstance(v, float) and math.isinf(v):
        return r"$\infty$" if latex else "∞"
    s = fmt.format(v)
    return s.replace("%", r"\%") if latex else s


def _columns(s: pd.DataFrame) -> list[tuple]:
    """TABLE1_COLUMNS, without "Sparse density" for stores written before it was recorded."""
    has_sparse = "density_sparse" in s and s["density_sparse"].astype(float).notna().any()
    return [c for c in TABLE1_COLUMNS if c[0] != "density_sparse" or has_sparse]


def _rows(s: pd.DataFrame, latex: bool) -> list[list[str]]:
    rows = []
    for _, r in s.iterrows():
        cells = []
        for col, _h, _hb, fmt in _columns(s):
            v = r.get(col)
            if r["is_dense"] and col in ("psnr", "ssim", "lpips"):
                v = None  # the reference itself: quality columns are empty, as in the paper
            cells.append(_fmt(v, fmt, latex))
        rows.append([str(r["model"]), str(r["variant"]), *cells])
    return rows


def to_markdown(s: pd.DataFrame) -> str:
    """Table 1 as a GitHub Markdown table (best non-dense value per model in bold)."""
    cols = _columns(s)
    headers = ["Model", "Method", *[h for _, h, _, _ in cols]]
    rows = _rows(s, latex=False)
    _bold_best(s, rows, lambda x: f"**{x}**")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(cols)) + "|"]
    prev = None
    for r in rows:
        model = r[0] if r[0] != prev else ""
        prev = r[0]
        lines.append("| " + " | ".join([model, *r[1:]]) + " |")
    return "\n".join(lines) + "\n"


def _bold_best(s: pd.DataFrame, rows: list[list[str]], mark) -> None:
    for j, (col, _h, higher, _f) in enumerate(_columns(s)):
        if higher is None:
            continue
        for _model, g in s[~s["is_dense"]].groupby("model"):
            vals = g[col].astype(float).replace([np.inf, -np.inf], np.nan)
            if vals.notna().sum() < 2:
                continue
            best = vals.idxmax() if higher else vals.idxmin()
            rows[s.index.get_loc(best)][2 + j] = mark(rows[s.index.get_loc(best)][2 + j])


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#"), ("%", r"\%"),
                 ("↑", r"$\uparrow$"), ("↓", r"$\downarrow$")):
        s = s.replace(a, b)
    return s


def to_latex(s: pd.DataFrame, caption: str = "Quality and efficiency against dense attention.") -> str:
    """Table 1 as a booktabs LaTeX table (needs \\usepackage{booktabs,multirow})."""
    rows = _rows(s, latex=True)
    _bold_best(s, rows, lambda x: rf"\textbf{{{x}}}")
    cols = _columns(s)
    ncol = len(cols)
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}", r"\label{tab:svg2-table1}",
           r"\begin{tabular}{ll" + "r" * ncol + "}", r"\toprule",
           " & ".join(["Model", "Method", *[_tex(h) for _, h, _, _ in cols]]) + r" \\", r"\midrule"]
    models = list(dict.fromkeys(r[0] for r in rows))
    for mi, model in enumerate(models):
        mrows = [r for r in rows if r[0] == model]
        for i, r in enumerate(mrows):
            head = rf"\multirow{{{len(mrows)}}}{{*}}{{{_tex(model)}}}" if i == 0 else ""
            out.append(" & ".join([head, _tex(r[1]), *r[2:]]) + r" \\")
        if mi < len(models) - 1:
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"
