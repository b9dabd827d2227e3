"""End-to-end transformer benchmark: dense (cuDNN SDPA) vs SVG2 on real-size Wan 2.1 and HunyuanVideo transformers.

Random weights (speed does not depend on them), bf16, batch 1 per transformer call (the diffusers pipelines
call the transformer once per CFG branch; HunyuanVideo is guidance-distilled: one call per step). Density is fixed
through SVG2's target-density mode so that it is known; clusters and the dense warm-up fraction are the authors'
per model (``svg2.bench_models.TRANSFORMERS``: Wan (100, 500) / (300, 1000); HunyuanVideo 720p (400, 1000), 10%
of the steps dense). Per model, in one process:

* dense step: one stock transformer forward (stock diffusers processors, SDPA with cuDNN first);
* self-attention share: the same SDPA call alone on the model's shape (HunyuanVideo: video + text tokens, padded
  text masked), times the number of attention layers, over the dense forward; and in the model (``in_model``):
  the per-layer dense attention of our processor's warm-up step (CUDA events) over that step;
* the limit: one forward with a perfect sparse kernel and zero overhead, ``dense - (1 - density) * attention``;
* SVG2: ``enable_svg2`` with the Triton kernels (``kernel=auto``); the first sparse call (cold k-means,
  ``kmeans_iters_init`` iterations) and warm calls (``kmeans_iters_step``) at each target density; our
  processor in a dense (warm-up) step; a per-component split (k-means / selection / permutation /
  attention, CUDA events);
* attention efficiency inside the model, per sparse layer: ``density x dense attention ms / sparse attention ms``
  of that layer (dense: the warm-up step; sparse: the attention kernel sections of that layer), and the mean;
* projected 50-step denoising time (2 calls per step with CFG, 1 for HunyuanVideo): warm-up steps dense, the
  first sparse step cold, the rest warm; dense_layers=1 (block 0 always dense) is part of every sparse forward
  measured; beside it the projection at the limit;
* peak GPU memory of each mode (``max_memory_allocated``, weights included, and minus the weights);
* optionally the same under ``torch.compile`` on both sides (``--compile``): regional compilation of the
  transformer blocks (diffusers' ``compile_repeated_blocks``, ``fullgraph=True`` unless ``--no-fullgraph``).
  With SVG2 each attention call is one opaque custom op in the block's graph (``torch.ops.svg2.attention_site``,
  ``svg2.integrations.opaque``): no graph break; the graph breaks and graphs counted are in the JSON.

Usage (GPU):  python experiments/bench_e2e.py --out $OUT --models wan1.3b,wan14b,hunyuan720p --compile wan1.3b
              add --cuda-graph to replay the warm sparse calls as CUDA graphs (SVG2Config.cuda_graph; issue 18)
CPU smoke:    python experiments/bench_e2e.py --tiny --out /tmp/e2e   (tiny Wan and tiny HunyuanVideo)
Results: one JSON per model and a markdown table (``e2e.md``) in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from svg2.bench_models import (
    TRANSFORMERS,
    attention_layers,
    attention_shape,
    random_transformer,
    transformer_inputs,
    video_tokens,
)
from svg2.benchmark import peak_gb, repeat_ms, reset_peak
from svg2.e2e import NUM_STEPS, layer_efficiency, limit_ms, per_layer, projection


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_ms(spec: dict, device, dtype, repeats: int) -> float:
    """One dense self-attention call (SDPA, same backend priority as the model) on the model's shape."""
    heads, s, d, text_real = attention_shape(spec)
    q, k, v = (torch.randn(1, heads, s, d, device=device, dtype=dtype) for _ in range(3))
    mask = None
    if text_real is not None:  # [video, text]: padded text keys masked, as the model masks them
        real = s - int(spec["text_len"]) + text_real
        mask = (torch.arange(s, device=device) < real)[None, None, None, :]
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    repeat_ms(fn, device, 2)
    return statistics.median(repeat_ms(fn, device, repeats))


def _graph_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0))}


def _reset_counters() -> None:
    from torch._dynamo.utils import counters

    counters.clear()


def bench_model(name: str, args, device, dtype, compiled: bool, log) -> dict:
    from svg2 import SVG2Config, enable_svg2

    spec = TRANSFORMERS[name]
    rep = args.repeats_large if spec.get("large") else args.repeats
    calls = int(spec["calls_per_step"])
    res: dict = {"model": name, "label": spec["label"], "family": spec["family"], "compiled": compiled,
                 "dtype": str(dtype), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "num_steps": NUM_STEPS, "calls_per_step": calls, "repeats": rep}
    heads, s_attn, _, _ = attention_shape(spec)
    res["seq_len"] = video_tokens(spec)
    res["attention_seq_len"] = s_attn
    res["num_layers"] = attention_layers(spec)
    cq, ck = spec["clusters"]
    res["clusters"] = [cq, ck]
    t0 = time.perf_counter()
    reset_peak(device)
    model = random_transformer(spec, device, dtype)
    _sync(device)
    res["build_s"] = time.perf_counter() - t0
    res["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    inputs = transformer_inputs(spec, device, dtype)
    log(f"[{name}{' compiled' if compiled else ''}] built in {res['build_s']:.1f}s, "
        f"{res['weights_gb']:.1f} GB, S={res['seq_len']} (attention over {s_attn}), {res['num_layers']} layers")

    def fwd(m):
        with torch.no_grad():
            return m(**inputs)[0]

    # -- dense (stock processors) ------------------------------------------------------------------------
    if compiled:  # regional compilation (diffusers' compile_repeated_blocks): one graph reused by every block
        torch._dynamo.reset()
        _reset_counters()
        model.compile_repeated_blocks(backend=args.compile_backend, fullgraph=args.fullgraph)
    runner = model
    t0 = time.perf_counter()
    out = fwd(runner)
    _sync(device)
    res["dense_first_call_s"] = time.perf_counter() - t0
    res["output_finite"] = bool(torch.isfinite(out).all())
    del out
    reset_peak(device)
    res["dense_ms"] = statistics.median(repeat_ms(lambda: fwd(runner), device, rep))
    res["dense_peak_gb"] = peak_gb(device)
    if compiled:
        res["dense_graphs"] = _graph_counts()
    log(f"  dense {res['dense_ms']:.1f} ms (first call {res['dense_first_call_s']:.1f}s)")
    if not compiled:
        res["attn_call_ms"] = attention_ms(spec, device, dtype, 5)
        res["attn_share"] = res["attn_call_ms"] * res["num_layers"] / res["dense_ms"]
        res["limit"] = {str(d): limit_ms(res["dense_ms"], res["attn_call_ms"] * res["num_layers"], d)
                        for d in args.densities}
        log(f"  self-attention {res['attn_call_ms']:.2f} ms/call, share {res['attn_share']:.1%}; limit "
            + ", ".join(f"d={d}: {ms:.1f} ms ({res['dense_ms'] / ms:.2f}x)" for d, ms in res["limit"].items()))
    args.save(res)

    # -- SVG2 ----------------------------------------------------------------------------------------------
    densities = args.densities
    sparse_frac = min(f for _, f in spec["scenarios"])
    graphs = bool(getattr(args, "cuda_graph", False))
    res["cuda_graph"] = graphs
    cfg = SVG2Config(num_q_centroids=cq, num_k_centroids=ck, target_density=densities[0],
                     dense_steps_frac=sparse_frac, dense_layers=1, cuda_graph=graphs)
    # --cuda-graph: no component timer (replayed calls have no per-component sections; svg2.cuda_graph)
    handle = enable_svg2(model, cfg, timing=not compiled and not graphs)
    if compiled:  # the blocks stay compiled; they recompile once with our processors
        torch._dynamo.reset()
        _reset_counters()
    # our processor in a warm-up (dense) step: the same math as stock (compiled: the same graph plus nothing)
    handle.set_step(0, num_steps=NUM_STEPS)
    if compiled:  # the first call compiles (eager: kernels are warm from the stock runs)
        t0 = time.perf_counter()
        fwd(runner)
        _sync(device)
        res["ours_dense_first_call_s"] = time.perf_counter() - t0
    if handle.timer is not None:
        handle.timer.reset()
    res["ours_dense_ms"] = statistics.median(repeat_ms(lambda: fwd(runner), device, rep))
    dense_layer_ms: dict = {}
    if handle.timer is not None:
        dense_layer_ms = per_layer(handle.timer.summary_by_tag(), "site_call", rep)
        res["dense_attention_layer_ms"] = {str(k): v for k, v in sorted(dense_layer_ms.items())}
        res["attn_share_in_model"] = sum(dense_layer_ms.values()) / res["ours_dense_ms"]
    log(f"  ours dense {res['ours_dense_ms']:.1f} ms (first call {res.get('ours_dense_first_call_s', 0):.1f}s)"
        + (f", attention share in the model {res['attn_share_in_model']:.1%}" if dense_layer_ms else ""))
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
        if graphs:
            fwd(runner)  # --cuda-graph: the capture call (the first warm call above ran eagerly); timed: replays
        if handle.timer is not None:
            handle.timer.reset()
        n_before = len(handle.targets[0].state.records)
        ms = repeat_ms(lambda: fwd(runner), device, rep)
        recs = handle.targets[0].state.resolved_records()[n_before:]
        sparse = [r for r in recs if not r.get("dense")]
        kernels = {str(r.get("kernel")) for r in sparse} | {str(r.get("kmeans_kernel")) for r in sparse}
        entry = {"ms": statistics.median(ms), "all_ms": ms, "kernels": sorted(kernels),
                 "measured_density": statistics.mean(r["density"] for r in sparse)}
        if handle.timer is not None:
            entry["components_ms_per_forward"] = {k: v["total_ms"] / rep for k, v in handle.timer.summary().items()}
            layers = sorted({r["layer"] for r in sparse})
            by_tag = handle.timer.summary_by_tag()
            density_of = {layer: statistics.mean(r["density"] for r in sparse if r["layer"] == layer)
                          for layer in layers}
            entry["attn_efficiency"] = layer_efficiency(
                dense_layer_ms, per_layer(by_tag, "attention", rep, layers), d, measured_density=density_of,
                call_ms=per_layer(by_tag, "site_call", rep, layers))
        res["svg2"][str(d)] = entry
        eff = entry.get("attn_efficiency", {})
        log(f"  svg2 d={d}: {entry['ms']:.1f} ms, measured density {entry['measured_density']:.3f}, "
            f"kernels {entry['kernels']}"
            + (f", attention efficiency mean {eff['mean']:.2f} (layers {eff['min']:.2f}-{eff['max']:.2f})"
               if eff.get("mean") is not None else ""))
        args.save(res)
    res["svg2_peak_gb"] = peak_gb(device)
    if graphs:
        cache = handle.targets[0].state.graphs
        res["cuda_graph_events"] = dict(cache.events) if cache is not None else {}
        res["cuda_graph_refusals"] = list(cache.reasons) if cache is not None else []
        log(f"  cuda graphs: {res['cuda_graph_events']}" + (f", eager because: {res['cuda_graph_refusals']}"
                                                             if res["cuda_graph_refusals"] else ""))
    if compiled:
        res["svg2_graphs"] = _graph_counts()
        log(f"  compiled with svg2: {res['svg2_graphs']}")
    handle.remove()

    # -- projections -----------------------------------------------------------------------------------------
    d0 = str(densities[0])
    res["projections"] = []
    for d, frac in spec["scenarios"]:
        if str(d) not in res["svg2"]:
            continue
        t_sparse = res["svg2"][str(d)]["ms"]
        t_cold = res["cold_ms"] - res["svg2"][d0]["ms"] + t_sparse  # cold measured at the first density
        p = projection(res["dense_ms"], res["ours_dense_ms"], t_cold, t_sparse, frac, calls)
        if "limit" in res and str(d) in res["limit"]:
            t_lim = res["limit"][str(d)]
            p["limit_speedup"] = projection(res["dense_ms"], res["dense_ms"], t_lim, t_lim, frac, calls)["speedup"]
        res["projections"].append({"density": d, "dense_steps_frac": frac, **p})
    if compiled:
        torch._dynamo.reset()
    reset_peak(device)
    args.save(res)
    return res


def _cell(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(results: list[dict], densities: list[float]) -> str:
    ds = [str(d) for d in densities]
    head = (["model", "compile", "S", "clusters", "dense ms", "attn share (alone / in model)", "ours-dense ms",
             "cold ms"] + [f"SVG2 ms @{d} (density)" for d in ds] + [f"limit ms @{d}" for d in ds]
            + [f"attn efficiency @{d} mean (min-max)" for d in ds]
            + ["50-step x measured / limit (density, warm-up)", "peak GB dense / SVG2"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        sv, lim = r.get("svg2", {}), r.get("limit", {})
        share = f"{_cell(r.get('attn_share'), '.0%')} / {_cell(r.get('attn_share_in_model'), '.0%')}"
        cells = [r["label"], "yes" if r["compiled"] else "no", str(r["seq_len"]), "/".join(map(str, r["clusters"])),
                 _cell(r.get("dense_ms"), ".0f"), share, _cell(r.get("ours_dense_ms"), ".0f"),
                 _cell(r.get("cold_ms"), ".0f")]
        cells += [f"{sv[d]['ms']:.0f} ({sv[d]['measured_density']:.2f})" if d in sv else "-" for d in ds]
        cells += [_cell(lim.get(d), ".0f") for d in ds]
        for d in ds:
            e = sv.get(d, {}).get("attn_efficiency", {})
            cells.append(f"{e['mean']:.2f} ({e['min']:.2f}-{e['max']:.2f})" if e.get("mean") is not None else "-")
        cells.append("; ".join(f"{p['speedup']:.2f}x / {_cell(p.get('limit_speedup'), '.2f')}x "
                               f"({p['density']:.0%}, {p['dense_steps_frac']:.0%})" for p in r.get("projections", []))
                     or "-")
        cells.append(f"{r['dense_peak_gb']:.1f} / {r['svg2_peak_gb']:.1f}"
                     if r.get("dense_peak_gb") is not None and r.get("svg2_peak_gb") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_table(results: list[dict]) -> str:
    """Per sparse layer attention efficiency of every eager result (one row per model, density and layer)."""
    lines = ["| model | density | layer | dense attn ms | sparse attn ms | efficiency | measured density | "
             "efficiency (measured density) | whole call ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for d, entry in r.get("svg2", {}).items():
            for row in entry.get("attn_efficiency", {}).get("layers", []):
                cells = [r["label"], d, str(row["layer"]), f"{row['dense_ms']:.2f}", f"{row['attention_ms']:.2f}",
                         f"{row['efficiency']:.2f}", _cell(row.get("density"), ".3f"),
                         _cell(row.get("efficiency_measured"), ".2f"), _cell(row.get("call_ms"), ".2f")]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wan1.3b,wan14b", help=f"comma list of {sorted(TRANSFORMERS)}")
    p.add_argument("--compile", default="", help="models to also run under torch.compile (comma list)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                   help="compile the blocks allowing graph breaks (default: fullgraph=True)")
    p.add_argument("--densities", default="0.25,0.12")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-large", "--repeats-14b", dest="repeats_large", type=int, default=1,
                   help="timed calls per mode for the large models (wan14b ~12 s, hunyuan720p ~30 s each)")
    p.add_argument("--deadline-s", type=float, default=1e9, help="skip stages that start after this many s")
    p.add_argument("--out", default="results/e2e")
    p.add_argument("--cuda-graph", dest="cuda_graph", action="store_true",
                   help="SVG2Config.cuda_graph: replay warm sparse calls as CUDA graphs (no component timing)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on tiny Wan and HunyuanVideo models")
    args = p.parse_args(argv)
    args.densities = [float(x) for x in args.densities.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = ["tiny", "tiny_hunyuan"]
    models = tiny if args.tiny else [m for m in args.models.split(",") if m]
    to_compile = tiny if args.tiny and args.compile else [m for m in args.compile.split(",") if m]
    unknown = sorted(set(models + to_compile) - set(TRANSFORMERS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {sorted(TRANSFORMERS)}")
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    results: list[dict] = []

    def save(res: dict) -> None:
        tag = f"{res['model']}{'_compiled' if res['compiled'] else ''}"
        (out / f"e2e_{tag}.json").write_text(json.dumps(res, indent=1, default=str))

    def write_tables() -> str:
        ok = [r for r in results if "error" not in r]
        md = table(ok, args.densities)
        per_layer_md = layer_table(ok)
        (out / "e2e.md").write_text(f"{md}\n\nAttention efficiency per sparse layer (eager):\n\n{per_layer_md}\n")
        return md

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
                write_tables()
            except Exception as e:  # keep the other models' numbers
                log(f"FAILED {name} compiled={compiled}: {type(e).__name__}: {e}")
                results.append({"model": name, "label": TRANSFORMERS[name]["label"], "compiled": compiled,
                                "error": f"{type(e).__name__}: {e}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    md = write_tables()
    for r in results:
        if "error" in r:
            print(f"ERROR {r['model']} compiled={r['compiled']}: {r['error']}")
    print(md)


if __name__ == "__main__":
    main()
