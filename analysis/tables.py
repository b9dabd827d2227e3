"""Result rows -> the paper's Table 1 layout (quality, density, latency, speedup per model and method).

``summarise(df)`` aggregates ``status == "ok"`` rows per (model, method variant, metric convention): n (the
(prompt, seed) videos), the mean and the 95% confidence interval (t-interval over those videos; each row already
averages over frames) of every metric and of the latency, density, and the speedup against the dense rows of the
same (model, prompt, seed, device) -- or, where no dense row exists, against the timed dense reference generation
on the same device (``speedup_source = "reference"``).

Methods are compared within one target density only (``group``): a row whose sparse-call density misses its
target by more than ``tolerance`` (5%) is flagged ``off_target`` (or dropped) and never ranked. The
``dense_floor`` method (the dense video through another exact attention path) is the noise floor row. Latency on
the CPU, or where no sparse variant beats dense, carries a ``latency_caveat`` and is not ranked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["add_variants", "prepare", "summarise", "to_markdown", "to_latex", "caption_lines", "failures",
           "natural_key", "t_interval", "TABLE1_COLUMNS", "DENSITY_DEFINITIONS", "DENSITY_TOLERANCE",
           "FLOOR_METHOD"]

# Short names of the knobs that tell two configurations of one method apart.
_SHORT = {"top_p": "p", "num_q_centroids": "Cq", "num_k_centroids": "Ck", "target_density": "target",
          "dense_steps_frac": "warmup", "dense_layers": "dense layers", "min_kc_ratio": "min kc",
          "kernel_attention": "kernel", "kernel_kmeans": "kmeans kernel", "kmeans_iters_step": "iters"}
# Knobs named first in a variant, in this order (the rest alphabetically): the centroid counts, then the density.
_KNOB_ORDER = ("num_q_centroids", "num_k_centroids", "top_p", "target_density", "density")
# Knobs that move a method along its density axis: one Pareto series per method and its other knobs.
_DENSITY_KNOBS = frozenset({"top_p", "target_density", "density"})

FLOOR_METHOD = "dense_floor"
# Relative miss of the sparse-call density from its target beyond which a row is not at that target.
DENSITY_TOLERANCE = 0.05
# Below this share of the generation time in the method's own components, latency measures the rest of the
# pipeline: even free attention would give at most 1 / (1 - share) = 1.25x.
_OVERHEAD_SHARE = 0.2

DENSITY_DEFINITIONS = [
    "Density: the fraction of query-key pairs computed, over every attention call of the video (dense warm-up "
    "steps and layers included; dense attention = 100%).",
    "Sparse density: the same over the sparse calls only (what a method's density knob, e.g. target_density, "
    "controls).",
]

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
_WITH_CI = ("psnr", "ssim", "lpips", "latency_s")
_LATENCY_COLS = ("latency_s", "speedup")

# Student t 0.975 quantiles for 1..30 degrees of freedom; beyond, the Cornish-Fisher expansion (error < 1e-5).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.13145, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.04523, 2.042272)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t_interval(values: Any) -> tuple[int, float, float]:
    """(n, mean, half-width of the 95% t-interval) of the finite ``values``; the half-width is NaN below n = 2
    (one video has no spread) and the mean NaN at n = 0. Infinite values (PSNR of identical videos) make the
    mean infinite and the interval NaN."""
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return 0, math.nan, math.nan
    if not np.isfinite(v).all():
        return n, float(v.mean()), math.nan
    mean = float(v.mean())
    if n < 2:
        return n, mean, math.nan
    return n, mean, float(_t975(n - 1) * v.std(ddof=1) / math.sqrt(n))


def natural_key(s: Any) -> tuple:
    """Sort key comparing the numbers inside labels by value: "Cq=8" before "Cq=32", "0.15" before "0.3"."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(s))
    return tuple(float(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def _knobs(row: pd.Series) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    for col in ("svg2_config_json", "method_kwargs_json"):
        v = row.get(col)
        if isinstance(v, str) and v not in ("null", ""):
            knobs.update(json.loads(v) or {})
    if not row.get("method_stock", False):
        knobs["kernel_attention"] = row.get("kernel_attention")
    return knobs


def _target_density(row: pd.Series, knobs: dict[str, Any]) -> float:
    for v in (knobs.get("target_density"), row.get("cfg_target_density")):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            return f
    return math.nan


def add_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``variant`` (the method label plus the knobs that differ between its configurations in ``df``),
    ``series`` (the same without the density knobs: one Pareto curve) and ``target_density`` (NaN: none)."""
    df = df.copy()
    if df.empty:
        df["variant"], df["series"], df["target_density"] = [], [], []
        return df
    if "method_label" not in df.columns:
        df["method_label"] = df.get("method", "?")
    knobs = [_knobs(r) for _, r in df.iterrows()]
    labels = df["method_label"].astype(str).tolist()
    variants, series = [], []
    for i, label in enumerate(labels):
        same = [knobs[j] for j in range(len(df)) if labels[j] == label]
        keys = sorted({k for kn in same for k in kn},
                      key=lambda k: (_KNOB_ORDER.index(k) if k in _KNOB_ORDER else len(_KNOB_ORDER), k))
        varying = [k for k in keys if len({json.dumps(kn.get(k), default=str) for kn in same}) > 1]
        parts = [f"{_SHORT.get(k, k)}={knobs[i].get(k)}" for k in varying]
        fixed = [f"{_SHORT.get(k, k)}={knobs[i].get(k)}" for k in varying if k not in _DENSITY_KNOBS]
        variants.append(label + (f" ({', '.join(parts)})" if parts else ""))
        series.append(label + (f" ({', '.join(fixed)})" if fixed else ""))
    df["variant"], df["series"] = variants, series
    df["target_density"] = [_target_density(r, kn) for (_, r), kn in zip(df.iterrows(), knobs)]
    return df


def _lpips(df: pd.DataFrame) -> pd.Series:
    for c in ("lpips_alex", "lpips_vgg"):
        if c in df.columns and df[c].notna().any():
            return df[c].astype(float)
    return pd.Series(np.nan, index=df.index)


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def prepare(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The ``ok`` rows a table may use, with ``variant`` / ``series`` / ``target_density`` /
    ``metric_convention`` added, and warnings: rows marked ok without a valid latency or density (corrupt:
    left out) and several rows of one (model, variant, convention, prompt, seed, device) (duplicates: the
    newest kept)."""
    warnings: list[str] = []
    if df.empty or "status" not in df.columns:
        return pd.DataFrame(), warnings
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return ok, warnings
    lat, dens = _num(ok, "latency_s"), _num(ok, "density")
    missing = pd.Series(False, index=ok.index)
    for c in ("model", "method"):
        missing |= ok[c].isna() if c in ok.columns else True
    bad = missing | ~np.isfinite(lat) | (lat <= 0) | ~np.isfinite(dens) | (dens <= 0) | (dens > 1 + 1e-6)
    if bad.any():
        keys = ", ".join(str(k) for k in ok.loc[bad].get("key", ok.index[bad])[:5])
        warnings.append(f"{int(bad.sum())} row(s) marked ok have no model/method or no valid latency / density "
                        f"(corrupt): left out of the tables ({keys}{' ...' if bad.sum() > 5 else ''}). Rerun them: "
                        "delete their rows/<key>.json and relaunch the sweep.")
        ok = ok[~bad]
    if ok.empty:
        return ok, warnings
    ok = add_variants(ok)
    conv = ok["metric_convention"] if "metric_convention" in ok.columns else pd.Series(None, index=ok.index)
    ok["metric_convention"] = conv.astype(object).where(conv.notna(), None)
    dup_cols = [c for c in ("model", "variant", "metric_convention", "prompt", "prompt_id", "image", "seed", "gpu")
                if c in ok.columns]
    ident = ok[dup_cols].astype(str)
    if "finished_at" in ok.columns:
        ok = ok.assign(_t=_num(ok, "finished_at").fillna(-math.inf)).sort_values("_t", kind="stable")
        ok = ok.drop(columns="_t")
        ident = ident.loc[ok.index]
    dup = ident.duplicated(keep="last")
    if dup.any():
        stores = sorted(set(ok.loc[dup, "store"].astype(str))) if "store" in ok.columns else []
        warnings.append(f"{int(dup.sum())} duplicate row(s): more than one result for one (model, variant, prompt, "
                        "seed, device)" + (f" (stores: {', '.join(stores)})" if stores else "")
                        + "; the newest of each is used. Report one store per configuration to avoid it.")
        ok = ok[~dup]
    return ok.sort_index(), warnings


def _component_share(g: pd.DataFrame) -> float:
    """Median share of the generation time spent in the method's timed components (``time_*_ms``)."""
    cols = [c for c in g.columns if c.startswith("time_") and c.endswith("_ms")]
    if not cols:
        return math.nan
    comp = sum(_num(g, c).fillna(0.0) for c in cols) / 1000.0
    has = pd.concat([_num(g, c).notna() for c in cols], axis=1).any(axis=1)
    share = (comp / _num(g, "latency_s"))[has]
    return float(share.median()) if len(share) else math.nan


def _latency_caveat(ok: pd.DataFrame, recs: list[dict[str, Any]]) -> str | None:
    """Why this model's latencies must not be read as speedup results, or None."""
    devices = sorted(ok["gpu"].dropna().astype(str).unique())
    cpu = [d for d in devices if d.lower().startswith("cpu")]
    if cpu:
        return (f"latency measured on the CPU ({', '.join(cpu)}): speedups are not GPU results and are not "
                "ranked; the plot shows quality against density.")
    warm = _num(ok, "warmup_s")
    if warm.notna().any() and (warm == 0).any():
        return ("latency timed without a warm-up run (warmup_s = 0: latency.warmup_runs=0), so the first videos "
                "of a job include compilation and autotuning: speedups are not ranked; the plot shows quality "
                "against density.")
    ranked = [r for r in recs if not r["is_dense"] and not r["is_floor"]]
    speedups = [r["speedup"] for r in ranked if np.isfinite(r["speedup"])]
    if speedups and max(speedups) <= 1.0:
        return (f"no sparse variant is faster than dense (best {max(speedups):.2f}x): at this size the run is "
                "overhead-bound (or the methods cost more than they save), so speedups are not ranked; the plot "
                "shows quality against density.")
    sparse = ok[~ok["_is_dense"] & (ok["method"] != FLOOR_METHOD)]
    share = _component_share(sparse) if not sparse.empty else math.nan
    if np.isfinite(share) and share < _OVERHEAD_SHARE:
        return (f"the attention methods take {share:.0%} of the generation time (median of their timed "
                f"components): the run is overhead-bound (free attention would give at most "
                f"{1 / (1 - share):.2f}x), so speedups are not ranked; the plot shows quality against density.")
    return None


def summarise(df: pd.DataFrame, mp4: bool = False, *, tolerance: float = DENSITY_TOLERANCE,
              off_target: str = "flag") -> pd.DataFrame:
    """One row per (model, variant, metric convention): dense first, then the floor, then one group per target
    density (ascending), then the rows without a target. ``mp4=True`` uses the metrics measured on decoded MP4s.
    ``off_target``: ``"flag"`` keeps rows whose sparse density misses their target by more than ``tolerance``
    (relative) with ``off_target=True``; ``"drop"`` leaves them out."""
    if off_target not in ("flag", "drop"):
        raise ValueError(f"off_target={off_target!r}: use 'flag' (keep, marked and unranked) or 'drop'")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise ValueError(f"tolerance={tolerance!r}: use a relative miss in [0, 1), e.g. 0.05 for 5%")
    ok, _ = prepare(df)
    if ok.empty:
        return pd.DataFrame()
    sfx = "_mp4" if mp4 else ""
    for m in ("psnr", "ssim"):
        ok[m] = _num(ok, m + sfx)
    lp = ok[[c for c in ok.columns if c in (f"lpips_alex{sfx}", f"lpips_vgg{sfx}")]]
    ok["lpips"] = _lpips(lp.rename(columns=lambda c: c.removesuffix(sfx))) if not lp.empty else np.nan
    lpips_net = next((n for n in ("alex", "vgg") if f"lpips_{n}{sfx}" in ok.columns
                      and ok[f"lpips_{n}{sfx}"].notna().any()), None)
    stock = ok.get("method_stock", pd.Series(False, index=ok.index)).fillna(False).astype(bool)
    ok["_is_dense"] = stock | (ok["method"] == "dense")
    ok["gpu"] = ok.get("gpu", pd.Series("?", index=ok.index)).fillna("?")
    conventions = _text(ok["metric_convention"], "unrecorded")
    mixed = conventions.nunique() > 1
    match = ["model", "prompt_id", "seed", "gpu"]
    dense_lat = (ok[stock].groupby(match)["latency_s"].mean() if stock.any() else pd.Series(dtype=float))
    out: list[dict[str, Any]] = []
    keys = [ok["model"], ok["variant"], conventions]
    for (model, variant, conv), g in ok.groupby(keys, sort=False):
        is_dense, is_floor = bool(g["_is_dense"].all()), bool((g["method"] == FLOOR_METHOD).all())
        rec: dict[str, Any] = {"model": model, "method": g["method"].iloc[0], "label": g["method_label"].iloc[0],
                               "variant": variant + (f" [{conv}]" if mixed else ""), "series": g["series"].iloc[0],
                               "metric_convention": None if conv == "unrecorded" else conv,
                               "is_dense": is_dense, "is_floor": is_floor, "n": len(g)}
        for c in ("psnr", "ssim", "lpips", "latency_s"):
            _n, rec[c], rec[f"{c}_ci"] = t_interval(g[c])
        rec["lpips_net"] = lpips_net
        rec["density"] = float(_num(g, "density").mean())
        sparse = _num(g, "density_sparse")
        rec["density_sparse"] = float(sparse.mean()) if sparse.notna().any() else math.nan
        target = g["target_density"].astype(float)
        rec["target_density"] = (float(target.iloc[0]) if not (is_dense or is_floor) and target.notna().all()
                                 and target.nunique() == 1 else math.nan)
        t, ds = rec["target_density"], rec["density_sparse"]
        rec["off_target"] = bool(np.isfinite(t) and np.isfinite(ds) and abs(ds - t) > tolerance * t)
        rec["group"] = ("dense" if is_dense else "floor" if is_floor else f"{t:g}" if np.isfinite(t)
                        else "untargeted")
        # Speedup over the same (prompt, seed, device) set: ratio of mean latencies.
        lat = g["latency_s"].astype(float)
        paired = [(dense_lat.get(k), t_) for k, t_ in zip(map(tuple, g[match].to_numpy()), lat)
                  if k in dense_lat.index]
        if paired:
            rec["speedup"] = float(np.mean([d for d, _ in paired]) / np.mean([t_ for _, t_ in paired]))
            rec["speedup_source"] = "dense rows"
        elif "ref_latency_s" in g and (g.get("ref_gpu") == g["gpu"]).all() and g["ref_latency_s"].notna().all():
            rec["speedup"] = float(_num(g, "ref_latency_s").mean() / lat.mean())
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
    for model in dict.fromkeys(r["model"] for r in out):
        recs = [r for r in out if r["model"] == model]
        caveat = _latency_caveat(ok[ok["model"] == model], recs)
        for r in recs:
            r["latency_caveat"] = caveat
    s = pd.DataFrame(out)
    if off_target == "drop":
        s = s[~s["off_target"]]
    order = {"dense": 0, "floor": 1}
    s = s.assign(_g=[order.get(g, 2 if g != "untargeted" else 3) for g in s["group"]],
                 _t=s["target_density"].fillna(math.inf))
    s = s.sort_values(["model", "_g", "_t", "variant", "metric_convention"], kind="stable",
                      key=lambda c: c.map(natural_key) if c.name in ("variant", "metric_convention") else c)
    return s.drop(columns=["_g", "_t"]).reset_index(drop=True)


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


def _text(v: pd.Series, fill: str) -> pd.Series:
    """``v`` as objects, ``fill`` where missing (fillna would warn on an all-missing float column)."""
    return v.astype(object).where(v.notna(), fill)


def _flag(s: pd.DataFrame, col: str) -> pd.Series:
    """A boolean column of a summary (False where absent: summaries built by hand)."""
    return s[col].fillna(False).astype(bool) if col in s else pd.Series(False, index=s.index)


def _has_targets(s: pd.DataFrame) -> bool:
    return "target_density" in s and s["target_density"].astype(float).notna().any()


def _cell(r: pd.Series, col: str, fmt: str, latex: bool) -> str:
    v = r.get(col)
    if r.get("is_dense", False) and col in ("psnr", "ssim", "lpips"):
        return _fmt(None, fmt, latex)  # the reference itself: quality columns are empty, as in the paper
    cell = _fmt(v, fmt, latex)
    ci = r.get(f"{col}_ci") if col in _WITH_CI else None
    if ci is not None and isinstance(v, float) and math.isfinite(v) and np.isfinite(ci):
        cell += (r" $\pm$ " if latex else " ± ") + _fmt(float(ci), fmt, latex)
    return cell


def _rows(s: pd.DataFrame, latex: bool) -> list[list[str]]:
    """Per summary row: model, method, n, [target], then the metric cells."""
    rows = []
    targets = _has_targets(s)
    for _, r in s.iterrows():
        name = str(r["variant"])
        if latex:
            name = _tex(name) + (r"$^\dagger$" if r.get("off_target", False) else "")
        elif r.get("off_target", False):
            name += " †"
        head = [str(r["model"]), name, str(int(r["n"])) if "n" in r and pd.notna(r["n"]) else "?"]
        if targets:
            t = r.get("target_density")
            head.append(_fmt(float(t), "{:.0%}", latex) if t is not None and np.isfinite(t)
                        else ("floor" if r.get("is_floor", False) else _fmt(None, "", latex)))
        rows.append([*head, *[_cell(r, col, fmt, latex) for col, _h, _hb, fmt in _columns(s)]])
    return rows


def _headers(s: pd.DataFrame) -> list[str]:
    return ["Model", "Method", "n", *(["Target"] if _has_targets(s) else []), *[h for _, h, _, _ in _columns(s)]]


def _bold_best(s: pd.DataFrame, rows: list[list[str]], mark: Callable[[str], str]) -> None:
    """Bold the best mean per column within one (model, metric convention, target density) group, among the
    ranked rows: sparse methods at a target (not off it); latency and speedup only without a latency caveat."""
    first = len(_headers(s)) - len(_columns(s))
    if not _has_targets(s):
        return
    ranked = s[~_flag(s, "is_dense") & ~_flag(s, "is_floor") & ~_flag(s, "off_target")
               & s["target_density"].astype(float).notna()]
    conv = _text(ranked.get("metric_convention", pd.Series(None, index=ranked.index)), "")
    caveat = ranked.get("latency_caveat", pd.Series(None, index=ranked.index)).notna()
    for j, (col, _h, higher, _f) in enumerate(_columns(s)):
        if higher is None:
            continue
        for _key, g in ranked.groupby([ranked["model"], conv, ranked["target_density"]]):
            if col in _LATENCY_COLS and caveat[g.index].any():
                continue
            vals = g[col].astype(float).replace([np.inf, -np.inf], np.nan)
            if vals.notna().sum() < 2:
                continue
            best = vals.idxmax() if higher else vals.idxmin()
            i = s.index.get_loc(best)
            rows[i][first + j] = mark(rows[i][first + j])


def caption_lines(s: pd.DataFrame, tolerance: float = DENSITY_TOLERANCE, dropped: int = 0) -> list[str]:
    """What a reader needs to read the table: the statistics, the density definitions, what is ranked, the
    floor, the metric convention, the rows off their target and the latency caveats."""
    lines = ["Mean ± 95% confidence interval (t-interval over the n (prompt, seed) videos of a row; none at n = 1). "
             "Quality is measured against the dense video of the same prompt and seed. Speedup: mean dense latency "
             "/ mean latency over the same (prompt, seed, device).", *DENSITY_DEFINITIONS]
    if s.empty:
        return lines
    if _has_targets(s):
        lines.append(f"Bold: the best mean within one target density (sparse density within {tolerance:.0%} of "
                     "the target). Rows without a target density are not ranked.")
    else:
        lines.append("No row has a target density, so no method is ranked (bold compares methods at one matched "
                     "density only: sweep method.cfg.target_density).")
    if _flag(s, "is_floor").any():
        lines.append("Dense floor: the same dense video through another exact attention path (float32 SDPA: the "
                     "memory-efficient backend on CUDA, math elsewhere; method.cfg.backend); a method whose "
                     "difference from dense is within the floor's is indistinguishable from dense.")
    else:
        lines.append("No dense floor row: add method=dense_floor to the sweep to see which differences are real.")
    conv = s["metric_convention"] if "metric_convention" in s else pd.Series(None, index=s.index)
    named = sorted(set(conv.dropna().astype(str)))
    if len(named) == 1 and conv.notna().all():
        lines.append(f"Metric convention: {named[0]}.")
    elif named:
        counts = _text(conv, "unrecorded").value_counts()
        lines.append("Mixed metric conventions (" + ", ".join(f"{k}: {v} row{'s' * (v != 1)}"
                                                             for k, v in sorted(counts.items()))
                     + "): rows are split by convention ([...] after the method); values are not comparable "
                     "across conventions.")
    off = s[_flag(s, "off_target")]
    if len(off):
        lines.append(f"† Sparse density misses the target by more than {tolerance:.0%}: not at that density, not "
                     "ranked (" + "; ".join(f"{r['variant']}: {r['density_sparse']:.1%}" for _, r in off.iterrows())
                     + "). `svg2-report --off-target drop` leaves such rows out.")
    if dropped:
        lines.append(f"{dropped} row(s) whose sparse density misses the target by more than {tolerance:.0%} are "
                     "left out (--off-target drop).")
    if "target_density" in s:
        unchecked = s[s["target_density"].astype(float).notna() & s["density_sparse"].astype(float).isna()]
        if len(unchecked):
            lines.append("Sparse density not recorded for " + ", ".join(unchecked["variant"].astype(str))
                         + ": their match to the target is not checked.")
    if "latency_caveat" in s:
        for model, g in s.groupby("model", sort=False):
            caveat = g["latency_caveat"].dropna()
            if len(caveat):
                lines.append(f"**Warning ({model})**: {caveat.iloc[0]}")
    return lines


def to_markdown(s: pd.DataFrame, caption: bool = True, tolerance: float = DENSITY_TOLERANCE,
                dropped: int = 0) -> str:
    """Table 1 as a GitHub Markdown table, its caption above it (``caption_lines``)."""
    headers = _headers(s)
    first = len(headers) - len(_columns(s))
    rows = _rows(s, latex=False)
    _bold_best(s, rows, lambda x: f"**{x}**")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|"]
    prev_model, prev_group = None, None
    groups = s["group"].tolist() if "group" in s else [None] * len(s)
    for r, grp in zip(rows, groups):
        model = r[0] if r[0] != prev_model else ""
        if first == 4 and r[0] == prev_model and grp == prev_group:
            r[3] = ""  # the target once per group
        prev_model, prev_group = r[0], grp
        lines.append("| " + " | ".join([model, *r[1:]]) + " |")
    table = "\n".join(lines) + "\n"
    if not caption:
        return table
    cap = caption_lines(s, tolerance, dropped)
    return "\n".join(f"- {c}" for c in cap) + "\n\n" + table


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#"), ("%", r"\%"),
                 ("±", r"$\pm$"), ("†", r"$^\dagger$"), ("↑", r"$\uparrow$"), ("↓", r"$\downarrow$"),
                 ("**", "")):
        s = s.replace(a, b)
    return s


def to_latex(s: pd.DataFrame, caption: str | None = None, tolerance: float = DENSITY_TOLERANCE,
             dropped: int = 0) -> str:
    """Table 1 as a booktabs LaTeX table (needs \\usepackage{booktabs,multirow}); the caption defaults to
    ``caption_lines``."""
    if caption is None:
        caption = "Quality and efficiency against dense attention. " + " ".join(caption_lines(s, tolerance, dropped))
    rows = _rows(s, latex=True)
    _bold_best(s, rows, lambda x: rf"\textbf{{{x}}}")
    headers = _headers(s)
    ncol = len(headers) - 2
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}", r"\label{tab:svg2-table1}",
           r"\begin{tabular}{ll" + "r" * ncol + "}", r"\toprule",
           " & ".join(_tex(h) for h in headers) + r" \\", r"\midrule"]
    groups = s["group"].tolist() if "group" in s else [None] * len(s)
    models = list(dict.fromkeys(r[0] for r in rows))
    for mi, model in enumerate(models):
        idx = [i for i, r in enumerate(rows) if r[0] == model]
        for k, i in enumerate(idx):
            if k and groups[i] != groups[idx[k - 1]]:
                out.append(rf"\cmidrule(l){{2-{ncol + 2}}}")  # a rule between target-density groups
            head = rf"\multirow{{{len(idx)}}}{{*}}{{{_tex(model)}}}" if k == 0 else ""
            out.append(" & ".join([head, *rows[i][1:]]) + r" \\")
        if mi < len(models) - 1:
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"
