"""The table of a dry run (``model.loader=random``): memory and time per stage of each (model, method) row.

    svg2-run -m model=wan2.1-t2v-1.3b,wan2.1-t2v-14b model.loader=random method=dense,svg2 model.num_steps=5 \\
        prompts.limit=1 latency.warmup_runs=0 metrics.lpips_random_backbone=true name=dryrun
    python -m experiments.dry_run multirun/dryrun/results --out results/dry_run/wan21_random.md

Columns: pipeline build, text encoding, the first denoising step (it includes the text encoding, set-up and,
for SVG2, the kernels' compilation at its first sparse step) and the median step, VAE decode (with the frames'
conversion), PSNR/SSIM/LPIPS on the frames and the MP4s, the whole call, peak GPU memory (weights included).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from svg2.harness.store import load_results

COLUMNS = [("model", "model"), ("method", "method"), ("size", "size"), ("steps", "num_steps"),
           ("build s", "pipeline_load_s"), ("text enc. s", "text_encode_s"), ("first step s", "first_step_s"),
           ("median step s", "median_step_s"), ("decode s", "decode_s"), ("metrics s", "metrics_s"),
           ("call s", "latency_s"), ("peak GiB", "peak_mem_gb"), ("density", "density"), ("gpu", "gpu")]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def table(store: str | Path) -> str:
    df = load_results(store)
    if df.empty:
        raise SystemExit(f"no rows in {store}")
    df = df[df["status"] == "ok"].copy()
    df["size"] = [f"{w}x{h}x{f}" for w, h, f in zip(df["width"], df["height"], df["num_frames"])]
    df["first_step_s"] = [json.loads(s)[0] if isinstance(s, str) and s != "[]" else math.nan
                          for s in df["step_times_json"]]
    for _, key in COLUMNS:
        if key not in df.columns:
            df[key] = math.nan
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for _, r in df.sort_values(["model", "method"]).iterrows():
        lines.append("| " + " | ".join(_fmt(r[k]) for _, k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="a results store (or a sweep folder holding one)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    md = table(args.store)
    print(md, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)


if __name__ == "__main__":
    main()
