"""Ulysses sequence parallelism benchmark: step time of one video on 1 and on N GPUs, dense and SVG2.

Random-weight Wan 2.1 transformers (``svg2.benchmark.WAN_TRANSFORMERS``: 1.3B at 480p, 14B at 720p, 81
frames), bf16, batch 1 per transformer call; a denoising step is two calls (CFG: cond, uncond). SVG2 runs at a
fixed target density (25% by default; ``dense_layers=1``, every step sparse: the first step is the cold
k-means, later ones warm). Dense is the stock diffusers model (SDPA; under context parallelism diffusers' own
Ulysses attention). In one torchrun job:

1. rank 0 alone: single-GPU step times (dense, SVG2) and the outputs of the last step;
2. all ranks: ``enable_ulysses`` (diffusers' ``ContextParallelConfig(ulysses_degree=N)``) and the same steps.

Reported per model and method: cold and warm step time on 1 and N GPUs, speedup, parallel efficiency
(speedup / N), output match against one GPU (relative L2 error and max abs difference of the last step's
output, bf16), per-rank SVG2 component time of one warm step (head load balance), peak memory per GPU.

    torchrun --nproc-per-node 2 experiments/bench_parallel.py --out $OUT                 # 2 x H200
    torchrun --nproc-per-node 2 experiments/bench_parallel.py --models tiny --out /tmp/p # CPU smoke (gloo)
Results: ``parallel_<model>.json`` and ``parallel.md`` in --out (rank 0 writes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from svg2 import SVG2Config, enable_svg2
from svg2.bench_models import TRANSFORMERS, random_transformer, transformer_inputs
from svg2.benchmark import WAN_TRANSFORMERS, peak_gb, repeat_ms, reset_peak
from svg2.parallel import enable_ulysses, init_distributed, per_rank_summary

DEFAULT_MODELS = "wan1.3b,wan14b"


def svg2_config(spec: dict, density: float) -> SVG2Config:
    qc, kc = spec["clusters"]
    return SVG2Config(num_q_centroids=qc, num_k_centroids=kc, target_density=density, dense_steps_frac=0.0,
                      dense_layers=1)


def run_steps(model, inputs, steps: int, device) -> tuple[list[float], torch.Tensor]:
    """``steps`` denoising steps (cond + uncond calls each); milliseconds per step and the last output."""
    times, out = [], None
    for i in range(steps):
        def step(i=i):
            nonlocal out
            for branch in ("cond", "uncond"):
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    out = model(**inputs)[0]
        times += repeat_ms(step, device, 1)
    return times, out


def measure(model, inputs, method: str, spec: dict, args, device, parallel: bool) -> dict:
    """One method on the model as it is now (single GPU on rank 0 alone, or context-parallel on all ranks)."""
    handle = None
    if method == "svg2":
        handle = enable_svg2(model, svg2_config(spec, args.density), num_steps=args.steps)
    reset_peak(device)
    with torch.no_grad():
        times, out = run_steps(model, inputs, args.steps, device)
    res = {"step_ms": times, "cold_step_ms": times[0],
           "warm_step_ms": statistics.median(times[1:]) if len(times) > 1 else times[0], "peak_gb": peak_gb(device)}
    if handle is not None:
        res["mean_density_rank"] = handle.stats()["mean_sparse_density"]
        handle.remove()
        # one more warm step with component timing (host syncs: not part of the step times above)
        handle = enable_svg2(model, svg2_config(spec, args.density), num_steps=2, timing=True)
        with torch.no_grad():
            run_steps(model, inputs, 2, device)
        res["per_rank"] = per_rank_summary(handle) if parallel else [{"rank": 0, "timing_ms": handle.timer.summary()}]
        handle.remove()
    res["out"] = out.float().cpu()
    return res


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).float()
    return {"rel_l2": float(diff.norm() / a.float().norm().clamp_min(1e-12)), "max_abs": float(diff.abs().max())}


def bench_model(name: str, args, info, device, dtype, log) -> dict | None:
    spec = TRANSFORMERS[name]  # a Wan entry (WAN_TRANSFORMERS names the ones this benchmark takes)
    n = info.world_size
    heads = spec["config"]["num_attention_heads"]
    if heads % n:
        log(f"[{name}] skipped: {heads} heads do not divide by {n} GPUs")
        return None
    torch.manual_seed(0)
    model = random_transformer(spec, device, dtype)
    inputs = transformer_inputs(spec, device, dtype)
    methods = args.methods.split(",")
    single: dict[str, dict] = {}
    if info.rank == 0:
        for m in methods:
            single[m] = measure(model, inputs, m, spec, args, device, parallel=False)
            log(f"[{name}] 1 GPU  {m:5s} cold {single[m]['cold_step_ms']:9.1f} ms  warm "
                f"{single[m]['warm_step_ms']:9.1f} ms")
    dist.barrier()
    enable_ulysses(model, n)
    par: dict[str, dict] = {m: measure(model, inputs, m, spec, args, device, parallel=True) for m in methods}
    result = {"model": name, "label": spec["label"], "gpus": n, "density": args.density, "steps": args.steps,
              "tokens": spec["latent"][0] * spec["latent"][1] * spec["latent"][2] // 4, "methods": {}}
    if info.rank == 0:
        for m in methods:
            s, p = single[m], par[m]
            speed = s["warm_step_ms"] / p["warm_step_ms"]
            result["methods"][m] = {
                "single": {k: v for k, v in s.items() if k != "out"},
                "parallel": {k: v for k, v in p.items() if k != "out"},
                "speedup_warm": speed, "speedup_cold": s["cold_step_ms"] / p["cold_step_ms"],
                "efficiency": speed / n, "match": compare(s["out"], p["out"]),
            }
            log(f"[{name}] {n} GPUs {m:5s} cold {p['cold_step_ms']:9.1f} ms  warm {p['warm_step_ms']:9.1f} ms  "
                f"speedup {speed:.2f}x  efficiency {speed / n:.0%}  rel-L2 vs 1 GPU "
                f"{result['methods'][m]['match']['rel_l2']:.2e}")
    del model
    reset_peak(device)
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | method | GPUs | warm step 1 GPU (ms) | warm step N GPUs (ms) | speedup | efficiency | "
             "cold step 1 / N (ms) | rel-L2 vs 1 GPU | peak GB/GPU 1 / N |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m, v in r["methods"].items():
            s, p = v["single"], v["parallel"]
            pk = "/".join(f"{x:.1f}" if x is not None else "-" for x in (s["peak_gb"], p["peak_gb"]))
            lines.append(f"| {r['label']} | {m} | {r['gpus']} | {s['warm_step_ms']:.1f} | {p['warm_step_ms']:.1f} | "
                         f"{v['speedup_warm']:.2f}x | {v['efficiency']:.0%} | {s['cold_step_ms']:.0f} / "
                         f"{p['cold_step_ms']:.0f} | {v['match']['rel_l2']:.1e} | {pk} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {sorted(WAN_TRANSFORMERS)}")
    ap.add_argument("--methods", default="dense,svg2")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=3, help="denoising steps timed (the first is SVG2's cold step)")
    args = ap.parse_args(argv)

    info = init_distributed()
    if not info.distributed:
        raise SystemExit("run under torchrun with --nproc-per-node >= 2 (rank 0 also measures the 1-GPU baseline)")
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    log = (lambda msg: print(msg, flush=True)) if info.rank == 0 else (lambda msg: None)
    results = []
    for name in args.models.split(","):
        res = bench_model(name, args, info, device, dtype, log)
        if res is None or info.rank != 0:
            continue
        results.append(res)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"parallel_{name}.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "parallel.md").write_text(table(results))
    if info.rank == 0 and results:
        print(table(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
