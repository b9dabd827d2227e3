"""Paired differences between two configurations that differ in one knob.

Two rows pair when they share the model, caption, seed and every ``--match`` knob, and differ in the ``--vary``
knob: both videos were compared with the same dense reference, so the difference of their scores removes the
caption-to-caption spread that dominates a per-configuration interval. Reported per group of ``--match`` values:
n pairs, mean difference with a 95% t-interval, and how many pairs favour the first value.

    python -m analysis.paired results/testbed/compensation_ablation/results.jsonl.gz \\
        --vary compensate --values true,false --match method,target_density
    python -m analysis.paired multirun/compensation --vary method --values svg2,positional \\
        --match compensate,target_density
    python -m analysis.paired results/testbed/method_table/results.jsonl.gz --vary method \\
        --values svg2,sliding_tile --where-first compensate=true      # a knob only one side has

Each (caption, seed) must have exactly one row per side: rows that differ in a knob neither matched nor filtered
(e.g. svg2 with and without compensation, compared with a method that has no such knob) are refused with the
knob named, instead of one of them being picked silently.

A knob is ``method`` or a key of the row's ``method.cfg`` (``compensate``, ``target_density``, ``top_p``, ...).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.tables import t_interval
from svg2.harness.store import load_results

__all__ = ["knob_value", "parse_where", "paired_differences", "to_markdown", "load_rows", "main"]


def _norm(v: Any) -> str:
    """One spelling per value, so that ``true`` on the command line matches a stored ``True``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 1 else str(v)
    return str(v).lower() if str(v) in ("True", "False", "None") else str(v)


def knob_value(row: dict[str, Any] | pd.Series, knob: str) -> str:
    """The row's value of ``knob`` as a normalised string (``none`` when the method does not set it)."""
    if knob == "method":
        return _norm(row["method"])
    cfg = json.loads(row.get("config_json") or "{}").get("method", {}).get("cfg", {})
    if knob == "target_density" and cfg.get(knob) is None and "cfg_target_density" in row:
        v = row.get("cfg_target_density")
        return _norm(None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
    return _norm(cfg.get(knob))


def load_rows(path: str | Path) -> pd.DataFrame:
    """Rows of a store / sweep folder (``svg2.harness.store.load_results``) or of a ``results.jsonl[.gz]``."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt") as f:
            return pd.DataFrame([json.loads(line) for line in f if line.strip()])
    return load_results(p)


def parse_where(spec: str | None) -> dict[str, str]:
    """``"compensate=true,top_p=0.9"`` -> ``{"compensate": "true", "top_p": "0.9"}`` (values normalised)."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"filter {item!r} is not knob=value (e.g. compensate=true)")
        k, v = (x.strip() for x in item.split("=", 1))
        out[k] = _norm(v)
    return out


def _differing_knobs(rows: list[pd.Series]) -> list[str]:
    """The method.cfg keys (and the method) whose values differ between ``rows``."""
    cfgs = [json.loads(r.get("config_json") or "{}").get("method", {}).get("cfg", {}) for r in rows]
    keys = sorted({k for c in cfgs for k in c})
    knobs = [k for k in keys if len({_norm(c.get(k)) for c in cfgs}) > 1]
    return (["method"] if len({_norm(r["method"]) for r in rows}) > 1 else []) + knobs


def paired_differences(df: pd.DataFrame, vary: str, values: tuple[str, str], match: list[str],
                       metrics: tuple[str, ...] = ("psnr", "ssim"),
                       where: tuple[dict[str, str], dict[str, str]] = ({}, {})) -> list[dict[str, Any]]:
    """One result per (model, ``match`` values) group: ``{"model", **match, "metric", "n", "mean", "ci95",
    "favours_first"}`` for each metric; difference = score under ``values[0]`` - score under ``values[1]``.
    ``where[i]``: knob values a row under ``values[i]`` must have (e.g. ``{"compensate": "true"}``)."""
    if vary in match:
        raise ValueError(f"--vary {vary!r} cannot also be in --match {match}: pairs differ in the varied knob")
    if len(values) != 2 or values[0] == values[1]:
        raise ValueError(f"--values needs two different values of {vary!r}, e.g. true,false; got {values}")
    first, second = (_norm(v) for v in values)
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    cells: dict[tuple, dict[str, dict[str, float]]] = defaultdict(dict)
    sources: dict[tuple, pd.Series] = {}
    seen_values: set[str] = set()
    for _, row in ok.iterrows():
        v = knob_value(row, vary)
        seen_values.add(v)
        if v not in (first, second):
            continue
        if any(knob_value(row, k) != want for k, want in where[0 if v == first else 1].items()):
            continue
        group = (row["model"], *(knob_value(row, k) for k in match))
        pair = (row["prompt_id"] if "prompt_id" in row else row["prompt"], int(row["seed"]))
        if v in cells[(group, pair)]:
            knobs = _differing_knobs([sources[(group, pair, v)], row]) or ["(none: the same configuration twice)"]
            raise ValueError(
                f"two rows of {vary}={v} for caption/seed {pair} in group {group}; they differ in {knobs}: add "
                f"the knob to --match, or pick one side's rows with --where-first/--where-second knob=value")
        sources[(group, pair, v)] = row
        cells[(group, pair)][v] = {m: float(row[m]) for m in metrics if m in row and row[m] is not None}
    missing = {first, second} - seen_values
    if missing:
        raise ValueError(f"no finished row has {vary}={sorted(missing)}; values present: {sorted(seen_values)}")
    diffs: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (group, _pair), by_value in cells.items():
        if first in by_value and second in by_value:
            for m in metrics:
                a, b = by_value[first].get(m), by_value[second].get(m)
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                    diffs[group][m].append(a - b)
    out = []
    for group in sorted(diffs, key=lambda g: tuple(map(str, g))):
        for m in metrics:
            d = np.asarray(diffs[group][m])
            if d.size == 0:
                continue
            n, mean, half = t_interval(d)
            out.append({"model": group[0], **dict(zip(match, group[1:])), "metric": m, "n": n, "mean": mean,
                        "ci95": half, "favours_first": int((d > 0).sum())})
    return out


def to_markdown(results: list[dict[str, Any]], vary: str, values: tuple[str, str], match: list[str]) -> str:
    head = ["model", *match, "metric", f"{vary}={values[0]} - {vary}={values[1]}", "n", f"pairs favouring {values[0]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(match) + 2) + "---:|---:|---:|"]
    for r in results:
        fmt = "{:+.2f} ± {:.2f}" if r["metric"] == "psnr" else "{:+.4f} ± {:.4f}"
        lines.append("| " + " | ".join([str(r["model"]), *(str(r[k]) for k in match), r["metric"],
                                         fmt.format(r["mean"], r["ci95"]), str(r["n"]),
                                         f"{r['favours_first']}/{r['n']}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a results store, sweep folder, or results.jsonl[.gz]")
    ap.add_argument("--vary", required=True, help="the knob the two configurations differ in (method, compensate, ...)")
    ap.add_argument("--values", required=True, help="its two values, first,second (difference = first - second)")
    ap.add_argument("--match", default="target_density", help="knobs held equal within a pair (comma-separated)")
    ap.add_argument("--metrics", default="psnr,ssim")
    ap.add_argument("--where-first", default=None, help="knob=value[,...] the first value's rows must have")
    ap.add_argument("--where-second", default=None, help="knob=value[,...] the second value's rows must have")
    args = ap.parse_args(argv)
    values = tuple(v.strip() for v in args.values.split(","))
    match = [k.strip() for k in args.match.split(",") if k.strip()]
    try:
        where = (parse_where(args.where_first), parse_where(args.where_second))
        res = paired_differences(load_rows(args.path), args.vary, values, match, tuple(args.metrics.split(",")),
                                 where)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"analysis.paired: {e}\n")
    if not res:
        ap.exit(1, "analysis.paired: no pairs (no caption/seed has a finished row under both values)\n")
    print(to_markdown(res, args.vary, values, match), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
