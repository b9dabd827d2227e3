"""Structure acceptance of the testbed model: concentration, locality and sparse-method recall per head.

On held-out world clips (drawn with a seed no training stretch uses) at the eval point, noised to an early,
a middle and a late denoising step of the 30-step sampler, every layer and head:
- mean top-15% attention mass (target >= 0.80);
- share of heads that put more than half of that top mass outside +-1 frame, +-4 tokens (target >= 0.25);
- attention recall and output error at density 0.15 of SVG2's clusters, positional blocks, SVG1, and
  exact-score (recall-greedy) selection over raster blocks and over SVG2's clusters, from ``analysis.recall``,
  with the top-k recall ``bound`` of that density (targets: SVG2 - positional >= 0.10, oracle_kmeans >= 0.85);
- the same per head type (uniform / local / temporal / content, ``svg2.testbed.structure.classify_heads``).

    python experiments/testbed_structure.py --weights weights/testbed --out results/testbed/structure
    python experiments/testbed_structure.py --weights /tmp/w --device cpu --point quick --clips 1 --rows 64

Writes ``structure.json`` (every head) and ``structure.md`` (the summary) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from analysis.recall import MethodSpec, recall_sweep, sample_rows
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


def recall_specs(density: float, cq: int, ck: int, block: int) -> list[MethodSpec]:
    return [
        MethodSpec("svg2", "svg2", dict(num_q_centroids=cq, num_k_centroids=ck, target_density=density)),
        MethodSpec("positional", "positional", dict(block_size=block, target_density=density)),
        MethodSpec("svg1", "svg1", dict(block_size=block, target_density=density)),
        MethodSpec("oracle_raster", "oracle_raster", dict(block_size=block, target_density=density)),
        MethodSpec("oracle_kmeans", "oracle_kmeans",
                   dict(num_q_centroids=cq, num_k_centroids=ck, target_density=density)),
    ]


def head_type_recall(records: list[dict], specs: list[MethodSpec], *, density: float, num_rows: int | None = 256,
                     seed: int = 0, device: torch.device | str = "cpu") -> list[dict]:
    """``recall_sweep`` rows of ``specs``, plus the top-k ``bound`` rows on the same sampled rows, every row
    tagged with its head type (records carry ``stats`` when they come from ``StructureProbe``)."""
    rows = recall_sweep(records, specs, num_rows=num_rows, seed=seed, device=device)
    # the rows recall_sweep drew for record i: sample_rows(S_video, num_rows, seed + i)
    sampled = [sample_rows(r["q"].shape[2] - int(r.get("num_text_tokens", 0)), num_rows, seed + i, device)
               for i, r in enumerate(records)]
    rows += bound_rows(records, density, sampled, device=device)
    return tag_head_types(rows, records)


def measure(pipe, *, point: str, clips: int, rows: int, density: float, cq: int, ck: int, block: int,
            recall_layers: list[int] | None, seed: int = HELD_OUT_SEED, world_detail: float = 0.0) -> dict:
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
        for name, frac in STEP_FRACTIONS.items():
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
                for rr in head_type_recall(recs, recall_specs(density, cq, ck, block), density=density,
                                           num_rows=min(rows, 256), seed=c, device=dev):
                    recall_rows.append(dict(rr, level=name, clip=c))
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
    means = summarize_by(recall_rows).get("all", {})
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
        "recall_density": density, "clusters": [cq, ck], "block": block,
        "recall": {m: v["recall"] for m, v in means.items()},  # BOUND: the top-k recall bound of the density
        "rel_error": {m: v["rel_error"] for m, v in means.items() if v["rel_error"] is not None},
        "density": {m: v["density"] for m, v in means.items()},
        "by_head_type": summarize_by(recall_rows, "head_type"),
        "head_type_table": head_type_markdown(recall_rows) if recall_rows else [],
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
    ap.add_argument("--density", type=float, default=0.15)
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
    result = measure(pipe, point=a.point, clips=a.clips, rows=a.rows, density=a.density, cq=cq, ck=ck,
                     block=a.block, recall_layers=layers, world_detail=a.world_detail)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structure.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "structure.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
