"""Caption adherence of the testbed model: colour and motion direction on held-out and seen captions.

    python experiments/testbed_adherence.py --out results/testbed/adherence            # GPU, eval point
    python experiments/testbed_adherence.py --out /tmp/a --device cpu --point quick --per-triple 1 --steps 4
    python experiments/testbed_adherence.py --out /tmp/g --guidance 5,8,12   # one adherence_g<scale>.json each

Single-object captions with a still camera (``svg2.testbed.checker``); the ground-truth renders of the same
captions are scored too (the checker's own ceiling). Writes ``adherence.json`` and prints a summary.
Targets: colour >= 0.9, direction >= 0.7 on held-out captions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from svg2.testbed import checker, data
from svg2.testbed.model import TESTBED_POINTS, load_testbed_pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--point", default="eval", choices=sorted(TESTBED_POINTS))
    ap.add_argument("--per-triple", type=int, default=4, help="captions per (colour, shape, direction) triple")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the point's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--guidance", default=None,
                    help="comma-separated CFG scales, one run each (default: the point's, adherence.json)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    try:
        scales = [float(x) for x in a.guidance.split(",")] if a.guidance else [None]
    except ValueError:
        ap.error(f"--guidance {a.guidance!r}: give comma-separated numbers, e.g. --guidance 5,8,12")
    if any(g is not None and g < 1.0 for g in scales):
        ap.error(f"--guidance {a.guidance!r}: CFG scales below 1 are not classifier-free guidance; use >= 1")
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    pipe = load_testbed_pipeline(a.point, device=a.device, dtype=dtype, path=a.weights)
    p = TESTBED_POINTS[a.point]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for g in scales:
        result = _adherence(pipe, a, p, dtype, g)
        name = "adherence.json" if g is None else f"adherence_g{g:g}.json"
        (out / name).write_text(json.dumps(result, indent=2, default=str))
    return 0


def _adherence(pipe, a: argparse.Namespace, p: dict, dtype: torch.dtype, guidance: float | None) -> dict:
    """Colour and direction adherence on held-out and seen captions at one CFG scale (None: the point's)."""
    f, h, w = p["num_frames"], p["height"], p["width"]
    g = p["guidance_scale"] if guidance is None else guidance
    result: dict = {"point": a.point, "steps": a.steps or p["num_inference_steps"], "dtype": str(dtype),
                    "guidance_scale": g}
    for held in (True, False):
        eps = checker.eval_prompts(a.per_triple, held_out=held)
        vids = []
        for i in range(0, len(eps), a.batch):
            chunk = eps[i:i + a.batch]
            vids.append(pipe([e.prompt for e in chunk], num_inference_steps=a.steps, guidance_scale=g,
                             generator=torch.Generator().manual_seed(i)).frames)
        sc = checker.score(eps, np.concatenate(vids))
        scene = data.scenes_from_spec([e.spec for e in eps], torch.Generator().manual_seed(0), aspect=w / h)
        gt = checker.score(eps, data.render(scene, f, h, w).permute(0, 2, 3, 4, 1))
        key = "held_out" if held else "seen"
        result[key] = {k: v for k, v in sc.items() if k != "rows"}
        result[key]["rows"] = sc["rows"]
        result[key]["ground_truth"] = {k: v for k, v in gt.items() if k != "rows"}
        print(f"guidance {g:g} {key}: n={sc['n']} colour {sc['color_acc']:.3f} direction {sc['direction_acc']:.3f} "
              f"(ground-truth renders: colour {gt['color_acc']:.3f} direction {gt['direction_acc']:.3f})", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
