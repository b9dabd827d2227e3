"""``svg2-bench``: the whole SVG2 call and its attention kernel against cuDNN dense attention (GPU).

    svg2-bench                                         # Wan 1.3B and 14B, (100, 500) and (300, 1000), d 0.10/0.25/0.40
    svg2-bench shapes=[wan14b] clusters=[[100,500]] densities=[0.25] out_dir=/tmp/bench

Overrides are ``key=value`` (values in YAML/Python literal syntax); the defaults are :class:`BenchConfig`.
Per (shape, clusters, density) one row, all measured in one process on :func:`svg2.synthetic.clustered_qkv`:
cuDNN SDPA dense; the attention kernel alone on the call's plan (``AttentionPlan.run``), its efficiency
(density x t_dense / t_kernel) and, optionally, FlexAttention on the same layout; and the public call
``svg2_attention`` (warm: 2 k-means iterations) timed eager, ahead and as a CUDA graph (svg2.benchmark), with
its phases. Writes ``<out_dir>/bench_kernels<tag>.{md,json}``.
"""

# ruff: noqa: B023  (the timed closures run at once, inside the loop iteration that made them)
from __future__ import annotations

import ast
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from svg2.benchmark import PHASES, WholeCall, dense_ms, time_ms, write_rows
from svg2.config import SVG2Config
from svg2.synthetic import SHAPES, clustered_qkv


@dataclass
class BenchConfig:
    shapes: list[str] = field(default_factory=lambda: ["wan1.3b", "wan14b"])
    clusters: list[list[int]] = field(default_factory=lambda: [[100, 500], [300, 1000]])
    densities: list[float] = field(default_factory=lambda: [0.10, 0.25, 0.40])
    batch: int = 1
    head_dim: int = 128
    dtype: str = "bfloat16"
    kernel: str = "auto"  # attention kernel (svg2_kernels.available_attention_variants())
    kmeans_kernel: str = "auto"
    tiles: dict[str, Any] = field(default_factory=dict)  # TileConfig overrides
    kmeans_init_iters: int = 20  # the cold start that builds the layouts (the runtime default is 50)
    flex: bool = True  # also time FlexAttention on the same layout
    graph: bool = True
    ahead_ms: float = 20.0  # GPU sleep queued before each "ahead" call
    reps: int = 10
    budget_ms: float = 400.0
    out_dir: str = "results/kernels"
    tag: str = ""
    seed: int = 0


def parse_overrides(argv: list[str]) -> BenchConfig:
    """``key=value`` overrides of :class:`BenchConfig`; an unknown key names the known ones."""
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"svg2-bench: expected key=value with key in {sorted(known)}, got {arg!r}")
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if raw.startswith("[") and raw.endswith("]"):  # shapes=[wan14b]: bare words in a list
                values[key] = [w.strip() for w in raw[1:-1].split(",") if w.strip()]
            else:
                values[key] = raw
    cfg = BenchConfig(**values)
    unknown = [s for s in cfg.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"svg2-bench: unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
    return cfg


def require_gpu() -> None:
    """Refuse at once without a CUDA GPU: the timings are CUDA events against cuDNN, and the default shapes
    are full-size Wan attention calls (minutes each on a CPU, then meaningless numbers)."""
    if not torch.cuda.is_available():
        raise SystemExit("svg2-bench times CUDA kernels against cuDNN and needs an NVIDIA GPU; none is visible "
                         "(torch.cuda.is_available() is False), so nothing was run. On a CPU, "
                         "`python experiments/bench_e2e.py --tiny --out /tmp/e2e` is a smoke run of the benchmark "
                         "code, and the kernel tests run in Triton's interpreter.")


COLUMNS = ["shape", "clusters", "density", "kernel", "dense_ms", "attn_ms", "efficiency", "flex_ms",
           "eager_ms", "eager_speedup", "eager_nonattn_pct", "ahead_ms", "ahead_speedup", "ahead_nonattn_pct",
           "graph_ms", "graph_speedup", *[f"eager_{p}_ms" for p in PHASES]]


def run(cfg: BenchConfig) -> list[dict[str, Any]]:
    require_gpu()
    dev = torch.device("cuda")
    dtype = getattr(torch, cfg.dtype)
    rows: list[dict[str, Any]] = []
    for sname in cfg.shapes:
        shape = SHAPES[sname]
        q, k, v = clustered_qkv(shape, batch=cfg.batch, head_dim=cfg.head_dim, dtype=dtype, device=dev,
                                seed=cfg.seed)
        t_dense = dense_ms(q, k, v, cfg.budget_ms)
        for cq, ck in cfg.clusters:
            for density in cfg.densities:
                svg = SVG2Config(num_q_centroids=cq, num_k_centroids=ck, target_density=density, min_kc_ratio=0.0,
                                 kmeans_iters_init=cfg.kmeans_init_iters, attention_kernel=cfg.kernel,
                                 kmeans_kernel=cfg.kmeans_kernel, attention_tiles=cfg.tiles or None, seed=cfg.seed)
                call = WholeCall(q, k, v, svg)
                layout = call.last_layout()
                d = layout.density()
                plan = layout.plan(svg.attention_kernel, head_dim=q.shape[-1], dtype=q.dtype, tiles=svg.attention_tiles)
                # the kernel alone on the call's layout: sorted K/V, Q in token order (as the call runs it)
                gather = plan.variant.gather_rows
                ks, vs = gather(k, layout.k_perm), gather(v, layout.k_perm)
                t_attn = time_ms(lambda: plan.run(q, ks, vs, q_perm=layout.q_perm), dev, cfg.budget_ms)
                row: dict[str, Any] = {
                    "shape": sname, "heads": shape.heads, "seqlen": shape.seqlen, "clusters": f"{cq}/{ck}",
                    "target_density": density, "density": d, "kernel": plan.kernel, "kernels": call.kernels,
                    "tiles": plan.tiles.as_list() if plan.tiles else None, "skipped": list(plan.skipped),
                    "dense_ms": t_dense, "attn_ms": t_attn, "efficiency": d * t_dense / t_attn,
                }
                if cfg.flex:
                    try:
                        fplan = layout.plan("flex", head_dim=q.shape[-1], dtype=q.dtype)
                        qs = gather(q, layout.q_perm)
                        row["flex_ms"] = time_ms(lambda: fplan.run(qs, ks, vs), dev, cfg.budget_ms)
                    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a note, not a failure
                        row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
                for mode, lead in (("eager", 0.0), ("ahead", cfg.ahead_ms)):
                    ph = call.phases(cfg.reps, lead_ms=lead)
                    row.update({f"{mode}_{p}_ms": ph.get(p, 0.0) for p in PHASES})
                    row[f"{mode}_ms"] = ph["total"]
                    row[f"{mode}_speedup"] = t_dense / ph["total"]
                    row[f"{mode}_nonattn_pct"] = 100.0 * (1.0 - ph.get("attention", 0.0) / ph["total"])
                if cfg.graph:
                    row["graph_ms"] = call.graph_ms(cfg.reps)
                    row["graph_speedup"] = t_dense / row["graph_ms"]
                rows.append(row)
                print(" ".join(f"{c}={row.get(c)}" for c in COLUMNS[:16]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    require_gpu()  # before anything else: no config parsing, no tensors
    cfg = parse_overrides(sys.argv[1:] if argv is None else argv)
    rows = run(cfg)
    env = f"torch {torch.__version__}, {torch.cuda.get_device_name()}"
    try:
        import triton

        env += f", triton {triton.__version__}"
    except ImportError:
        pass
    header = (f"# svg2-bench{cfg.tag}\n\n{env}; batch {cfg.batch}, head dim {cfg.head_dim}, {cfg.dtype}. "
              "dense = cuDNN SDPA; attn = the attention kernel alone on the call's plan; eager / ahead / graph = "
              "the whole svg2_attention call (warm, 2 k-means iterations); non-attention share = 1 - attention "
              "phase / total; efficiency = density x dense / attn.")
    md = write_rows(rows, COLUMNS, Path(cfg.out_dir), f"bench_kernels{cfg.tag}", header)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
