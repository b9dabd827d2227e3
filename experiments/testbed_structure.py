"""Structure acceptance of the testbed model: concentration, locality and sparse-method recall per head.

On held-out world clips (drawn with a seed no training stretch uses) at the eval point, noised to an early,
a middle and a late denoising step of the 30-step sampler, every layer and head:
- mean top-15% attention mass (target >= 0.80);
- share of heads that put more than half of that top mass outside +-1 frame, +-4 tokens (target >= 0.25);
- attention recall and output error at density 0.15 of SVG2's clusters, positional blocks, SVG1, and
  exact-score (recall-greedy) selection over raster blocks and over SVG2's clusters, from ``analysis.recall``,
  with the top-k recall ``bound`` of that density (targets: SVG2 - positional >= 0.10, oracle_kmeans >= 0.85);
- the same per head type (uniform / local / temporal / content, ``svg2.testbed.structure.classify_heads``).

``--methods`` picks the rules (``METHODS``; ``svg2_compensated`` and ``svg_ear`` are measured through their own
calls, compensation included: ``analysis.recall.recall_sweep``), ``--density`` takes several target densities
(``--min-kc-ratio`` one per density for the SVG2 rules) and ``--levels`` a subset of the noise levels; with more
than one density or a non-default method list the summary adds the matched-density table (target x rule: recall,
output error, measured density, per layer and per head type; the SVG2-clustered rules of one record share one
clustering):

    python experiments/testbed_structure.py --weights weights/testbed --out results/testbed/structure
    python experiments/testbed_structure.py --weights /tmp/w --device cpu --point quick --clips 1 --rows 64
    python experiments/testbed_structure.py --device cpu --clips 1 --rows 256 --levels middle,late \
        --recall-layers 1,3,5,7 --methods svg2,svg2_compensated,svg_ear --density 0.10,0.15,0.25 \
        --min-kc-ratio 0.05,0.1,0.1 --out /tmp/ear_vs_svg2   # results/compensation/ear_vs_svg2_testbed.md

Writes ``structure.json`` (every head) and ``structure.md`` (the summary) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from analysis.recall import MethodSpec, recall_sweep, sample_rows, shared_kmeans, summarize
from svg2.mini.model import SPATIAL_FACTOR, pack
from svg2.testbed.data import captions, render, sample_scenes
from svg2.testbed.model import TESTBED_POINTS, load_testbed_pipeline
from svg2.testbed.structure import (
    BOUND,
    StructureProbe,
    bound_rows,
    head_type_markdown,
    summarize_by,
    tag_head_types,
)

HELD_OUT_SEED = 2_000_000_011  # no training stretch draws from this seed
STEP_FRACTIONS = {"early": 0.1, "middle": 0.5, "late": 0.9}
CONCENTRATED = 0.5  # top-15% mass of a head that looks things up (chance: 0.15)


# label -> (registered method, whether it clusters with SVG2's k-means and takes SVG2's min_kc_ratio)
METHODS: dict[str, tuple[str, bool]] = {
    "svg2": ("svg2", True),  # skipped clusters dropped (the published algorithm)
    "svg2_compensated": ("svg2", True),  # compensate=True: skipped key clusters through centroid and mean value
    "svg_ear": ("svg_ear", False),  # SVG2's clusters, error-aware routing, always compensated
    "positional": ("positional", False),
    "svg1": ("svg1", False),
    "oracle_raster": ("oracle_raster", False),
    "oracle_kmeans": ("oracle_kmeans", False),
}
DEFAULT_METHODS = ("svg2", "positional", "svg1", "oracle_raster", "oracle_kmeans")


def recall_specs(density: float, cq: int, ck: int, block: int, methods: Sequence[str] = DEFAULT_METHODS,
                 min_kc_ratio: float | None = None) -> list[MethodSpec]:
    """One spec per label of ``methods`` (``METHODS``) at target ``density``. ``min_kc_ratio`` (None: the config's
    default) goes to the SVG2 rules (key clusters every query cluster keeps); SVG-EAR keeps its own
    ``guaranteed_ratio`` (0.05), its budget being the target density."""
    specs = []
    for label in methods:
        if label not in METHODS:
            raise ValueError(f"unknown method {label!r}: one of {sorted(METHODS)}")
        name, takes_min_kc = METHODS[label]
        if name in ("svg2", "svg_ear", "oracle_kmeans"):
            kw: dict[str, Any] = dict(num_q_centroids=cq, num_k_centroids=ck, target_density=density)
        else:
            kw = dict(block_size=block, target_density=density)
        if label == "svg2_compensated":
            kw["compensate"] = True
        if takes_min_kc and min_kc_ratio is not None:
            kw["min_kc_ratio"] = min_kc_ratio
        specs.append(MethodSpec(label, name, kw))
    return specs


def head_type_recall(records: list[dict], specs: list[MethodSpec], *, density: float, num_rows: int | None = 256,
                     seed: int = 0, device: torch.device | str = "cpu", share_clusters: bool = False) -> list[dict]:
    """``recall_sweep`` rows of ``specs``, plus the top-k ``bound`` rows on the same sampled rows, every row
    tagged with its head type (records carry ``stats`` when they come from ``StructureProbe``)."""
    rows = recall_sweep(records, specs, num_rows=num_rows, seed=seed, device=device, share_clusters=share_clusters)
    # the rows recall_sweep drew for record i: sample_rows(S_video, num_rows, seed + i)
    sampled = [sample_rows(r["q"].shape[2] - int(r.get("num_text_tokens", 0)), num_rows, seed + i, device)
               for i, r in enumerate(records)]
    rows += bound_rows(records, density, sampled, device=device)
    return tag_head_types(rows, records)


def matched_table(rows: Sequence[dict], by: str | None = None) -> list[dict[str, Any]]:
    """Mean recall, output error, measured density (and top-k bound at the target) per (``by`` group, target
    density, rule) of the tagged recall rows (``row["target"]``); ``compensated``: whether the error is of the
    rule's own compensated output."""
    bounds = {(r.get(by) if by else None, r["kwargs"]): r for r in
              summarize([dict(x, kwargs=str(x["target"])) for x in rows if x["method"] == BOUND], by)}
    out = []
    for r in summarize([x for x in rows if x["method"] != BOUND], by):
        target = json.loads(r["kwargs"])["target_density"]
        b = bounds.get((r.get(by) if by else None, str(target)))
        comp = {x.get("compensated", False) for x in rows if x["method"] == r["method"]}
        out.append({**({by: r[by]} if by else {}), "target": target, "method": r["method"], "n": r["n"],
                    "density": r["density"], "recall": r["recall"], "rel_error": r["rel_error"],
                    "bound_at_target": None if b is None else b["recall"], "compensated": any(comp)})
    return sorted(out, key=lambda x: (str(x.get(by, "")) if by else "", x["target"], x["method"]))


def matched_markdown(table: Sequence[dict[str, Any]], by: str | None = None) -> list[str]:
    """Markdown lines of ``matched_table``."""
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    head = ([by] if by else []) + ["target", "rule", "n head calls", "measured density", "recall (exact pairs)",
                                   "rel. output error", "error of", "top-k bound at target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = ([str(r[by])] if by else []) + [
            f"{r['target']:.2f}", r["method"], str(r["n"]), f"{r['density']:.4f}", f"{r['recall']:.4f}",
            fmt(r["rel_error"], ".4f"), "own output (compensated)" if r["compensated"] else "masked softmax",
            fmt(r["bound_at_target"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def measure(pipe, *, point: str, clips: int, rows: int, density: float | Sequence[float], cq: int, ck: int,
            block: int, recall_layers: list[int] | None, seed: int = HELD_OUT_SEED, world_detail: float = 0.0,
            methods: Sequence[str] = DEFAULT_METHODS, min_kc_ratio: Sequence[float | None] | None = None,
            levels: Sequence[str] | None = None) -> dict:
    """The structure figures and the recall rows at each target ``density`` (a float or several; the legacy
    summary figures are those of the first). ``min_kc_ratio``: one per density (or one for all) for the SVG2
    rules; ``levels``: the noise levels of ``STEP_FRACTIONS`` measured (default all)."""
    densities = [float(density)] if isinstance(density, float | int) else [float(d) for d in density]
    mkc = list(min_kc_ratio) if min_kc_ratio is not None else [None]
    if len(mkc) == 1:
        mkc = mkc * len(densities)
    if len(mkc) != len(densities):
        raise ValueError(f"{len(mkc)} min_kc_ratio values for {len(densities)} densities: give one, or one each")
    steps = {name: STEP_FRACTIONS[name] for name in (levels or STEP_FRACTIONS)}
    p = TESTBED_POINTS[point]
    h, w, f = p["height"], p["width"], p["num_frames"]
    grid = (f, h // SPATIAL_FACTOR, w // SPATIAL_FACTOR)
    dev, dtype = pipe.device, pipe.dtype
    scene = sample_scenes(clips, torch.Generator().manual_seed(seed), aspect=w / h, train=False)
    caps = captions(scene)
    x0 = pack(render(scene, f, h, w, device=dev, world_detail=world_detail))
    text = pipe.encode_prompt(caps)
    pipe.scheduler.set_timesteps(p["num_inference_steps"], device=dev)
    sigmas = pipe.scheduler.sigmas
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    probe = StructureProbe(pipe.transformer, grid, num_rows=rows, keep_qkv=True)
    per_head: dict[tuple[int, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    recall_rows: list[dict] = []
    levels = {}
    try:
        for name, frac in steps.items():
            i = min(int(frac * p["num_inference_steps"]), p["num_inference_steps"] - 1)
            sigma = float(sigmas[i])
            levels[name] = {"step": i, "sigma": sigma}
            xt = ((1 - sigma) * x0 + sigma * noise).to(dtype)
            for c in range(clips):  # one clip per forward keeps the recorded Q/K/V small
                probe.tag = {"level": name, "clip": c}
                probe.qkv.clear()
                with torch.no_grad():
                    pipe.transformer(hidden_states=xt[c:c + 1], timestep=torch.full((1,), sigma * 1000, device=dev),
                                     encoder_hidden_states=text[c:c + 1], return_dict=False)
                recs = [dict(r, step=i, num_steps=p["num_inference_steps"]) for r in probe.qkv
                        if recall_layers is None or r["layer"] in recall_layers]
                # the SVG2-clustered rules of a record share one clustering at every density (same clusters, one
                # k-means cost: the outer cache serves the per-sweep ones)
                with shared_kmeans():
                    for dn, mk in zip(densities, mkc, strict=True):
                        specs = recall_specs(dn, cq, ck, block, methods, mk)
                        for rr in head_type_recall(recs, specs, density=dn, num_rows=min(rows, 256), seed=c,
                                                   device=dev, share_clusters=True):
                            recall_rows.append(dict(rr, level=name, clip=c, target=dn))
                probe.qkv.clear()
        for r in probe.rows:
            for hi in range(r["stats"].top_mass.numel()):
                per_head[(r["layer"], hi)]["top_mass"].append(float(r["stats"].top_mass[hi]))
                per_head[(r["layer"], hi)]["outside_local"].append(float(r["stats"].outside_local[hi]))
                per_head[(r["layer"], hi)][f"top_mass_{r['level']}"].append(float(r["stats"].top_mass[hi]))
    finally:
        probe.remove()
    heads = [{"layer": lh[0], "head": lh[1], **{k: sum(v) / len(v) for k, v in d.items()}}
             for lh, d in sorted(per_head.items())]
    first = [r for r in recall_rows if r["target"] == densities[0]]  # the legacy figures: the first density
    means = summarize_by(first).get("all", {})
    summary = {
        "point": point, "world_detail": world_detail, "tokens": grid[0] * grid[1] * grid[2], "clips": clips,
        "rows_per_head": rows,
        "levels": levels,
        "top_mass_mean": sum(hd["top_mass"] for hd in heads) / len(heads),
        "top_mass_by_level": {lv: sum(hd[f"top_mass_{lv}"] for hd in heads) / len(heads) for lv in levels},
        # a near-uniform head also has most of its top mass far away: count only heads that concentrate
        "content_head_share": sum(hd["outside_local"] > 0.5 and hd["top_mass"] >= CONCENTRATED
                                  for hd in heads) / len(heads),
        "far_head_share_any": sum(hd["outside_local"] > 0.5 for hd in heads) / len(heads),
        "uniform_head_share": sum(hd["top_mass"] < 0.3 for hd in heads) / len(heads),
        "num_heads": len(heads),
        "recall_density": densities[0], "densities": densities, "min_kc_ratio": mkc, "methods": list(methods),
        "recall_layers": recall_layers, "clusters": [cq, ck], "block": block,
        "recall": {m: v["recall"] for m, v in means.items()},  # BOUND: the top-k recall bound of the density
        "rel_error": {m: v["rel_error"] for m, v in means.items() if v["rel_error"] is not None},
        "density": {m: v["density"] for m, v in means.items()},
        "by_head_type": summarize_by(first, "head_type"),
        "head_type_table": head_type_markdown(first) if first else [],
        # every target density x rule (per layer, noise level and head type too)
        "matched": matched_table(recall_rows),
        "matched_by_layer": matched_table(recall_rows, "layer"),
        "matched_by_level": matched_table(recall_rows, "level"),
        "matched_by_head_type": matched_table(recall_rows, "head_type"),
    }
    rec = summary["recall"]
    if "svg2" in rec and "positional" in rec:
        summary["recall_svg2_minus_positional"] = rec["svg2"] - rec["positional"]
    return {"summary": summary, "heads": heads}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"Testbed structure at the {s['point']} point ({s['tokens']} tokens), {s['clips']} held-out clips x "
             f"{len(s['levels'])} noise levels, {s['num_heads']} heads, {s['rows_per_head']} query rows per head.", "",
             "| figure | measured | target |", "|---|---|---|",
             f"| mean top-15% attention mass | {s['top_mass_mean']:.3f} | >= 0.80 |"]
    for lv, v in s["top_mass_by_level"].items():
        lines.append(f"| ... at the {lv} step (sigma {s['levels'][lv]['sigma']:.2f}) | {v:.3f} | |")
    lines.append(f"| content heads: top mass >= {CONCENTRATED} and > half of it outside +-1 frame, +-4 tokens | "
                 f"{s['content_head_share']:.3f} | >= 0.25 |")
    lines.append(f"| ... any head with > half the top mass outside the window (near-uniform ones included) | "
                 f"{s['far_head_share_any']:.3f} | |")
    lines.append(f"| near-uniform heads (top mass < 0.3) | {s['uniform_head_share']:.3f} | |")
    for m, v in s["recall"].items():
        if m == BOUND:
            lines.append(f"| recall bound at density {s['recall_density']} (top-k exact weights: no mask of this "
                         f"density keeps more; one of a higher measured density may) | {v:.3f} | |")
            continue
        lines.append(f"| recall at density {s['recall_density']} ({m}; measured density {s['density'][m]:.3f}, "
                     f"rel. output error {s['rel_error'][m]:.3f}) | {v:.3f} | "
                     f"{'>= 0.85' if m == 'oracle_kmeans' else ''} |")
    if "recall_svg2_minus_positional" in s:
        lines.append(f"| recall SVG2 - positional | {s['recall_svg2_minus_positional']:+.3f} | >= +0.10 |")
    if s.get("head_type_table"):
        lines += ["", f"Per head type at density {s['recall_density']} (uniform: top mass < 0.3; local: >= half of "
                  "it inside +-1 frame, +-4 tokens; temporal: >= half at +-1 token in any frame; content: the "
                  "rest), mean over head calls", "",
                  *s["head_type_table"]]
    if len(s.get("densities", [])) > 1 or s.get("methods", list(DEFAULT_METHODS)) != list(DEFAULT_METHODS):
        lines += ["", f"Matched density: every rule at every target (SVG2 min_kc_ratio per target {s['min_kc_ratio']}"
                  "; one clustering per record shared by the SVG2-clustered rules), mean over head calls", "",
                  *matched_markdown(s["matched"]), "", "... per noise level", "",
                  *matched_markdown(s["matched_by_level"], "level"), "", "... per layer", "",
                  *matched_markdown(s["matched_by_layer"], "layer"), "", "... per head type", "",
                  *matched_markdown(s["matched_by_head_type"], "head_type")]
    lines += ["", "Per layer (mean over heads): top-15% mass / share outside the local window", "",
              "| layer | top mass | outside local | content heads |", "|---|---|---|---|"]
    layers = sorted({hd["layer"] for hd in result["heads"]})
    for layer in layers:
        hs = [hd for hd in result["heads"] if hd["layer"] == layer]
        lines.append(f"| {layer} | {sum(h['top_mass'] for h in hs) / len(hs):.3f} | "
                     f"{sum(h['outside_local'] for h in hs) / len(hs):.3f} | "
                     f"{sum(h['outside_local'] > 0.5 and h['top_mass'] >= CONCENTRATED for h in hs)}/{len(hs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="testbed weights folder (default: the shipped weights)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--point", default="eval", choices=sorted(TESTBED_POINTS))
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--rows", type=int, default=512, help="query rows sampled per head")
    ap.add_argument("--density", default="0.15", help="target density, or a comma list (matched-density table)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma list of rules measured for recall / error, from {sorted(METHODS)}")
    ap.add_argument("--min-kc-ratio", default=None,
                    help="SVG2 rules' min_kc_ratio: one value, or one per density (default: the config's)")
    ap.add_argument("--levels", default=",".join(STEP_FRACTIONS), help="noise levels measured (comma list)")
    ap.add_argument("--clusters", default="64,256", help="SVG2 (Cq, Ck) for the recall figures")
    ap.add_argument("--block", type=int, default=64, help="positional block size (tokens)")
    ap.add_argument("--recall-layers", default=None, help="comma list (default: all layers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--world-detail", type=float, default=0.0,
                    help="render the held-out clips with this data variant (the one the weights were trained on)")
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    pipe = load_testbed_pipeline(a.point, device=a.device, dtype=dtype, path=a.weights)
    cq, ck = (int(x) for x in a.clusters.split(","))
    layers = None if a.recall_layers is None else [int(x) for x in a.recall_layers.split(",")]
    densities = [float(x) for x in a.density.split(",")]
    mkc = None if a.min_kc_ratio is None else [float(x) for x in a.min_kc_ratio.split(",")]
    result = measure(pipe, point=a.point, clips=a.clips, rows=a.rows, density=densities, cq=cq, ck=ck,
                     block=a.block, recall_layers=layers, world_detail=a.world_detail,
                     methods=a.methods.split(","), min_kc_ratio=mkc, levels=a.levels.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structure.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "structure.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
