"""Evaluate the shipped mini model: caption adherence and attention structure.

    python experiments/eval_mini.py --out results/mini/eval_quick_cpu.json              # CPU, quick
    python experiments/eval_mini.py --variant long --device cuda --dtype bfloat16 --structure

Adherence: single-object captions with a direction, on the 12 (colour, shape, direction) combinations
held out of training (and optionally 12 seen ones); the checker reads colour and direction back from
the dense model's frames. Structure: per layer, the share of exact attention mass on each query's top 15%
of keys (mean over heads, sampled queries, all steps and both CFG branches), trained vs random init.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from svg2.harness.metrics import mean_psnr
from svg2.mini import checker
from svg2.mini.model import build_transformer
from svg2.mini.pipeline import MiniPipeline, load_mini_pipeline
from svg2.mini.structure import measure_top_mass


def density_sweep(pipe: MiniPipeline, densities: list[float], n_prompts: int) -> list[dict]:
    """SVG2 (paper defaults otherwise) at each target density, and at its top_p defaults: PSNR vs dense."""
    from svg2 import SVG2Config
    from svg2.integrations import enable_svg2

    prompts = [p.prompt for p in checker.eval_prompts(1, held_out=True)][:n_prompts]
    rows = []
    for i, prompt in enumerate(prompts):
        dense = pipe(prompt, generator=torch.Generator().manual_seed(i)).frames[0]
        for td in [None, *densities]:
            handle = enable_svg2(pipe, SVG2Config(target_density=td))
            try:
                t0 = time.time()
                sparse = pipe(prompt, generator=torch.Generator().manual_seed(i)).frames[0]
                stats = handle.stats()
            finally:
                handle.remove()
            row = {"prompt": prompt, "target_density": td, "psnr": mean_psnr(sparse, dense),
                   "mean_sparse_density": stats["mean_sparse_density"], "mean_density": stats["mean_density"],
                   "seconds": time.time() - t0}
            rows.append(row)
            print(f"  density sweep: {row}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="quick", choices=["quick", "long"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped weights/mini)")
    p.add_argument("--n-per-triple", type=int, default=4, help="prompts per (colour, shape, direction)")
    p.add_argument("--seen", action="store_true", help="also score 12 seen combinations")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--structure", action="store_true", help="measure attention structure (1 prompt)")
    p.add_argument("--no-adherence", action="store_true")
    p.add_argument("--density-sweep", default=None,
                   help="comma-separated SVG2 target densities: PSNR of SVG2 vs dense at each (plus defaults)")
    p.add_argument("--sweep-prompts", type=int, default=2)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    pipe = load_mini_pipeline(args.variant, device=args.device, dtype=dtype, path=args.weights)
    result: dict = {"variant": args.variant, "device": args.device, "dtype": args.dtype,
                    "operating_point": pipe.defaults, "tokens": pipe.tokens()}
    if not args.no_adherence:
        for held in (True, False) if args.seen else (True,):
            prompts = checker.eval_prompts(args.n_per_triple, held_out=held)
            t0 = time.time()
            videos = []
            for i in range(0, len(prompts), args.batch):
                chunk = prompts[i:i + args.batch]
                videos.append(pipe([q.prompt for q in chunk], generator=torch.Generator().manual_seed(i)).frames)
                print(f"  {i + len(chunk)}/{len(prompts)} videos, {time.time() - t0:.0f} s", flush=True)
            sc = checker.score(prompts, np.concatenate(videos))
            key = "held_out" if held else "seen"
            result[key] = {**{k: v for k, v in sc.items() if k != "rows"}, "seconds": time.time() - t0,
                           "rows": sc["rows"]}
            print(f"adherence {key}: n={sc['n']} colour {sc['color_acc']:.3f} direction "
                  f"{sc['direction_acc']:.3f} both {sc['both_acc']:.3f}", flush=True)
    if args.structure:
        prompt = "a red circle moves right over a flat blue background"
        trained = measure_top_mass(pipe, [prompt])
        rand = MiniPipeline(build_transformer(**{k: v for k, v in pipe.transformer.config.items()
                                                 if not k.startswith("_")}).eval(),
                            pipe.text_encoder, pipe.tokenizer, variant=args.variant).to(args.device, dtype)
        random_init = measure_top_mass(rand, [prompt])
        result["structure"] = {"trained": trained, "random_init": random_init}
        for name, r in result["structure"].items():
            print(f"top-15% attention mass ({name}): mean {r['mean']:.3f}, per layer "
                  f"{[round(v, 3) for v in r['per_layer'].values()]}", flush=True)
    if args.density_sweep:
        result["density_sweep"] = density_sweep(pipe, [float(x) for x in args.density_sweep.split(",")],
                                                args.sweep_prompts)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
