"""End-to-end transformer benchmark: dense (cuDNN SDPA) vs SVG2 on real-size Wan 2.1 transformers.

Random weights (speed does not depend on them), bf16, batch 1 per transformer call (the diffusers pipelines
call the transformer once per CFG branch). Density is fixed through SVG2's target-density mode so that it is
known. Per model, in one process:

* dense step: one stock transformer forward (stock diffusers processors, SDPA with cuDNN first);
* self-attention share: the same SDPA call alone on the model's shape, times the number of blocks, over
  the dense forward;
* SVG2: ``enable_svg2`` with the Triton kernels (``kernel=auto``); the first sparse call (cold k-means,
  ``kmeans_iters_init`` iterations) and warm calls (``kmeans_iters_step``) at each target density; our
  processor in a dense (warm-up) step; a per-component split (k-means / selection / permutation /
  attention, CUDA events);
* projected 50-step denoising time with CFG (2 calls per step): warm-up steps dense, the first sparse step
  cold, the rest warm; dense_layers=1 (block 0 always dense) is part of every sparse forward measured;
* peak GPU memory of each mode (``max_memory_allocated``, weights included, and minus the weights);
* optionally the same under ``torch.compile`` on both sides (``--compile``): regional compilation of the
  transformer blocks (diffusers' ``compile_repeated_blocks``), the way diffusers recommends compiling Wan; with
  SVG2 the method runs outside the graph (one graph break per attention call, measured as ours-dense vs dense).

Usage (GPU):  python experiments/bench_e2e.py --out $OUT --models wan1.3b,wan14b --compile wan1.3b
CPU smoke:    python experiments/bench_e2e.py --tiny --out /tmp/e2e
Results: one JSON per model and a markdown table (``e2e.md``) in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from svg2.benchmark import (
    WAN_TRANSFORMERS,
    peak_gb,
    random_wan_transformer,
    repeat_ms,
    reset_peak,
    wan_transformer_inputs,
)

NUM_STEPS = 50
SCENARIOS = [(0.25, 0.2), (0.12, 0.1), (0.25, 0.1), (0.12, 0.2)]  # (density, dense-step fraction)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_ms(spec: dict, device, dtype, repeats: int) -> float:
    """One dense self-attention call (SDPA, same backend priority as the model) on the model's shape."""
    f, h, w = spec["latent"]
    s = f * (h // 2) * (w // 2)
    heads, d = spec["config"]["num_attention_heads"], spec["config"]["attention_head_dim"]
    q, k, v = (torch.randn(1, heads, s, d, device=device, dtype=dtype) for _ in range(3))
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    repeat_ms(fn, device, 2)
    return statistics.median(repeat_ms(fn, device, repeats))


def projection(t_dense: float, t_warmup_step: float, t_cold: float, t_sparse: float, frac: float) -> dict:
    """Transformer time of a 50-step CFG generation (2 calls per step), in seconds."""
    n_dense = math.floor(frac * NUM_STEPS)
    dense_total = NUM_STEPS * 2 * t_dense
    svg2_total = n_dense * 2 * t_warmup_step + 2 * t_cold + (NUM_STEPS - n_dense - 1) * 2 * t_sparse
    return {"dense_s": dense_total / 1e3, "svg2_s": svg2_total / 1e3, "speedup": dense_total / svg2_total,
            "dense_steps": n_dense}


def bench_model(name: str, args, device, dtype, compiled: bool, log) -> dict:
    from svg2 import SVG2Config, enable_svg2

    spec = WAN_TRANSFORMERS[name]
    rep = args.repeats if name != "wan14b" else args.repeats_14b
    res: dict = {"model": name, "label": spec["label"], "compiled": compiled, "dtype": str(dtype),
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "num_steps": NUM_STEPS}
    f, h, w = spec["latent"]
    res["seq_len"] = f * (h // 2) * (w // 2)
    res["num_layers"] = spec["config"]["num_layers"]
    cq, ck = spec["clusters"]
    res["clusters"] = [cq, ck]
    t0 = time.perf_counter()
    reset_peak(device)
    model = random_wan_transformer(spec, device, dtype)
    _sync(device)
    res["build_s"] = time.perf_counter() - t0
    res["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    inputs = wan_transformer_inputs(spec, device, dtype)
    log(f"[{name}{' compiled' if compiled else ''}] built in {res['build_s']:.1f}s, "
        f"{res['weights_gb']:.1f} GB, S={res['seq_len']}")

    def fwd(m):
        with torch.no_grad():
            return m(**inputs)[0]

    # -- dense (stock processors) ------------------------------------------------------------------------
    if compiled:  # regional compilation (diffusers' compile_repeated_blocks): one graph reused by every block
        torch._dynamo.reset()
        model.compile_repeated_blocks(backend=args.compile_backend)
    runner = model
    t0 = time.perf_counter()
    out = fwd(runner)
    _sync(device)
    res["dense_first_call_s"] = time.perf_counter() - t0
    res["output_finite"] = bool(torch.isfinite(out).all())
    reset_peak(device)
    res["dense_ms"] = statistics.median(repeat_ms(lambda: fwd(runner), device, rep))
    res["dense_peak_gb"] = peak_gb(device)
    log(f"  dense {res['dense_ms']:.1f} ms (first call {res['dense_first_call_s']:.1f}s)")
    if not compiled:
        res["attn_call_ms"] = attention_ms(spec, device, dtype, 5)
        res["attn_share"] = res["attn_call_ms"] * res["num_layers"] / res["dense_ms"]
        log(f"  self-attention {res['attn_call_ms']:.2f} ms/call, share {res['attn_share']:.1%}")
    args.save(res)

    # -- SVG2 ----------------------------------------------------------------------------------------------
    densities = args.densities
    cfg = SVG2Config(num_q_centroids=cq, num_k_centroids=ck, target_density=densities[0], dense_steps_frac=0.2,
                     dense_layers=1)
    handle = enable_svg2(model, cfg, timing=not compiled)
    if compiled:  # the blocks stay compiled; they recompile once with our processors
        torch._dynamo.reset()
    # our processor in a warm-up (dense) step: the same math as stock, plus (compiled) the graph breaks
    handle.set_step(0, num_steps=NUM_STEPS)
    if compiled:  # the first call compiles (eager: kernels are warm from the stock runs)
        t0 = time.perf_counter()
        fwd(runner)
        _sync(device)
        res["ours_dense_first_call_s"] = time.perf_counter() - t0
    res["ours_dense_ms"] = statistics.median(repeat_ms(lambda: fwd(runner), device, rep))
    log(f"  ours dense {res['ours_dense_ms']:.1f} ms (first call {res.get('ours_dense_first_call_s', 0):.1f}s)")
    # first sparse call of the process: Triton JIT + cold k-means; then reset and time a clean cold call
    handle.set_step(NUM_STEPS - 1, num_steps=NUM_STEPS)
    res["sparse_first_call_ms"] = repeat_ms(lambda: fwd(runner), device, 1)[0]
    handle.reset()
    handle.set_step(NUM_STEPS - 1, num_steps=NUM_STEPS)
    reset_peak(device)
    res["cold_ms"] = repeat_ms(lambda: fwd(runner), device, 1)[0]
    log(f"  svg2 first call {res['sparse_first_call_ms']:.0f} ms, cold call {res['cold_ms']:.0f} ms")
    res["svg2"] = {}
    for d in densities:
        handle.method.cfg = handle.method.cfg.replace(target_density=d)
        fwd(runner)  # warm call at this density
        if handle.timer is not None:
            handle.timer.reset()
        n_before = len(handle.targets[0].state.records)
        ms = repeat_ms(lambda: fwd(runner), device, rep)
        recs = handle.targets[0].state.resolved_records()[n_before:]
        sparse = [r["density"] for r in recs if not r.get("dense")]
        entry = {"ms": statistics.median(ms), "all_ms": ms, "measured_density": statistics.mean(sparse),
                 "kernels": sorted({str(r.get("kernel")) for r in recs if not r.get("dense")}
                                   | {str(r.get("kmeans_kernel")) for r in recs if not r.get("dense")})}
        if handle.timer is not None:
            entry["components_ms_per_forward"] = {k: v["total_ms"] / rep for k, v in handle.timer.summary().items()}
        res["svg2"][str(d)] = entry
        log(f"  svg2 d={d}: {entry['ms']:.1f} ms, measured density {entry['measured_density']:.3f}, "
            f"kernels {entry['kernels']}")
        args.save(res)
    res["svg2_peak_gb"] = peak_gb(device)
    handle.remove()

    # -- projections -----------------------------------------------------------------------------------------
    d0 = str(densities[0])
    res["projections"] = []
    for d, frac in SCENARIOS:
        if str(d) not in res["svg2"]:
            continue
        t_sparse = res["svg2"][str(d)]["ms"]
        t_cold = res["cold_ms"] - res["svg2"][d0]["ms"] + t_sparse  # cold measured at the first density
        p = projection(res["dense_ms"], res["ours_dense_ms"], t_cold, t_sparse, frac)
        res["projections"].append({"density": d, "dense_steps_frac": frac, **p})
    if compiled:
        torch._dynamo.reset()
    reset_peak(device)
    args.save(res)
    return res


def table(results: list[dict]) -> str:
    lines = ["| model | compile | dense ms | attn share | ours-dense ms | cold ms | SVG2 ms @25% | SVG2 ms @12% "
             "| 50-step x (25%, 20% warm) | (12%, 10% warm) | peak GB dense / SVG2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sv = r.get("svg2", {})
        ms = lambda d, sv=sv: f"{sv[d]['ms']:.0f} ({sv[d]['measured_density']:.2f})" if d in sv else "-"
        proj = {(p["density"], p["dense_steps_frac"]): p["speedup"] for p in r.get("projections", [])}
        pj = lambda k, proj=proj: f"{proj[k]:.2f}x" if k in proj else "-"
        share = f"{r['attn_share']:.0%}" if "attn_share" in r else "-"
        peak = (f"{r['dense_peak_gb']:.1f} / {r['svg2_peak_gb']:.1f}"
                if r.get("dense_peak_gb") is not None and r.get("svg2_peak_gb") is not None else "-")
        lines.append(f"| {r['label']} | {'yes' if r['compiled'] else 'no'} | {r.get('dense_ms', float('nan')):.0f} "
                     f"| {share} | {r.get('ours_dense_ms', float('nan')):.0f} | {r.get('cold_ms', float('nan')):.0f} "
                     f"| {ms('0.25')} | {ms('0.12')} | {pj((0.25, 0.2))} | {pj((0.12, 0.1))} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wan1.3b,wan14b")
    p.add_argument("--compile", default="", help="models to also run under torch.compile (comma list)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--densities", default="0.25,0.12")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-14b", type=int, default=1, help="timed calls per mode for wan14b (~12 s each)")
    p.add_argument("--deadline-s", type=float, default=1e9, help="skip stages that start after this many s")
    p.add_argument("--out", default="results/e2e")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model")
    args = p.parse_args(argv)
    args.densities = [float(x) for x in args.densities.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = ["tiny"] if args.tiny else [m for m in args.models.split(",") if m]
    to_compile = ["tiny"] if args.tiny and args.compile else [m for m in args.compile.split(",") if m]
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    results: list[dict] = []

    def save(res: dict) -> None:
        tag = f"{res['model']}{'_compiled' if res['compiled'] else ''}"
        (out / f"e2e_{tag}.json").write_text(json.dumps(res, indent=1, default=str))

    args.save = save
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the fastest dense kernel on Hopper first: cuDNN, then FlashAttention-2, ...
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]
        ctx = sdpa_kernel(backends, set_priority=True)
    else:
        ctx = nullcontext()
    with ctx:
        plan = [(m, False) for m in models] + [(m, True) for m in to_compile]
        for name, compiled in plan:
            if time.perf_counter() - start > args.deadline_s:
                log(f"skipped {name} compiled={compiled}: past --deadline-s")
                continue
            try:
                results.append(bench_model(name, args, device, dtype, compiled, log))
                (out / "e2e.md").write_text(table([r for r in results if "error" not in r]) + "\n")
            except Exception as e:  # keep the other models' numbers
                log(f"FAILED {name} compiled={compiled}: {type(e).__name__}: {e}")
                results.append({"model": name, "label": WAN_TRANSFORMERS[name]["label"], "compiled": compiled,
                                "error": f"{type(e).__name__}: {e}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    md = table([r for r in results if "error" not in r])
    (out / "e2e.md").write_text(md + "\n")
    for r in results:
        if "error" in r:
            print(f"ERROR {r['model']} compiled={r['compiled']}: {r['error']}")
    print(md)


if __name__ == "__main__":
    main()
