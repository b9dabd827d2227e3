"""Per-kernel GPU time of one warm SVG2 call (torch.profiler), on the layouts bench_kernels.py builds.

    python experiments/profile_call.py --shape wan14b --clusters 100,500 --density 0.25 --out /tmp/prof

Prints, per CUDA kernel name, the mean GPU microseconds per call and the launch count, grouped by the
call's phases (k-means Q, k-means K, selection, permutation, metadata, attention). The bench's CUDA events
say how long each phase takes; this says which kernels inside a phase the time goes to (issue 3: the
non-attention share). It also times the host side of each phase with the GPU kept busy (launch overhead).
Writes ``profile_<shape>_<cq>_<ck><tag>.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, synthetic_qkv  # noqa: E402

from svg2.selection import centroid_scores, select_target_density  # noqa: E402


def _kernel_table(prof, reps: int) -> list[tuple[str, float, float]]:
    """(kernel name, mean us per call, launches per call), largest first."""
    rows: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(evt.name, [0.0, 0])
            r[0] += evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
            r[1] += 1
    out = [(name[:90], t / reps, c / reps) for name, (t, c) in rows.items()]
    return sorted(out, key=lambda r: -r[1])


def phases(q, k, v, cq_init, ck_init, density, cfg, iters=2, tiles=None):
    """The call of bench_kernels.SVG2Call as named phases, so each can be profiled alone."""
    from svg2_kernels.kmeans import kmeans_triton
    from svg2_kernels.permute import permute_rows
    from svg2_kernels.varblock_attention import build_varblock_metadata, varblock_attention_with_metadata

    b, h, s, d = q.shape
    n = b * h
    st: dict = {}

    def km_q():
        st["rq"] = kmeans_triton(q.reshape(n, s, d), cq_init, iters, tiles)

    def km_k():
        st["rk"] = kmeans_triton(k.reshape(n, s, d), ck_init, iters, tiles, sort_x=True)

    def selection():
        rq, rk = st["rq"], st["rk"]
        scores = centroid_scores(rq.centroids, rk.centroids, rk.sizes)
        st["bm"] = select_target_density(scores, rq.sizes, rk.sizes, density, 0.0)

    def permutation():
        # K in cluster order comes from K's k-means (sort_x), as in svg2; V is gathered here
        st["ks"], st["vs"] = st["rk"].x_sorted, permute_rows(v, st["rk"].perm.view(b, h, s))

    def metadata():
        rq, rk, bm = st["rq"], st["rk"], st["bm"]
        st["meta"] = build_varblock_metadata(rq.offsets.view(b, h, -1), rk.offsets.view(b, h, -1),
                                             bm.view(b, h, *bm.shape[1:]), s, s, cfg)

    def attention():
        st["out"] = varblock_attention_with_metadata(q, st["ks"].view(b, h, s, d), st["vs"].view(b, h, s, d),
                                                     st["meta"], q_perm=st["rq"].perm.view(b, h, s))

    return dict(kmeans_q=km_q, kmeans_k=km_k, selection=selection, permutation=permutation, metadata=metadata,
                attention=attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="wan14b", choices=sorted(SHAPES))
    ap.add_argument("--clusters", default="100,500", help="Cq,Ck")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--config", default=None, help="VarBlockConfig fields as JSON list (default: default_config)")
    ap.add_argument("--kmeans-tiles", default=None, help="KMeansTiles fields as JSON list (default: the default)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--tag", default="")
    ap.add_argument("--host-profile", action="store_true", help="also cProfile each phase's host side")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_call.py profiles CUDA kernels: run it on a GPU machine")
    from svg2_kernels.kmeans import KMeansTiles, kmeans_triton
    from svg2_kernels.order import chain_order
    from svg2_kernels.varblock_attention import VarBlockConfig, default_config

    cq, ck = (int(x) for x in a.clusters.split(","))
    dev = torch.device("cuda")
    q, k, v = synthetic_qkv(SHAPES[a.shape], 1, 128, torch.bfloat16, dev, 0)
    b, h, s, d = q.shape
    n = b * h
    g = torch.Generator(device="cpu").manual_seed(0)
    rq = kmeans_triton(q.reshape(n, s, d), q.reshape(n, s, d)[:, torch.randperm(s, generator=g)[:cq].to(dev)], 20)
    rk = kmeans_triton(k.reshape(n, s, d), k.reshape(n, s, d)[:, torch.randperm(s, generator=g)[:ck].to(dev)], 20)
    order = chain_order(rk.centroids)
    ck_init = rk.centroids.gather(1, order[..., None].expand_as(rk.centroids))
    cfg = VarBlockConfig(*json.loads(a.config)) if a.config else default_config("cuda", d, seqlen_k=s)
    tiles = KMeansTiles(*json.loads(a.kmeans_tiles)) if a.kmeans_tiles else None
    ph = phases(q, k, v, rq.centroids, ck_init, a.density, cfg, tiles=tiles)
    for fn in ph.values():  # warm-up (compiles)
        fn()
    torch.cuda.synchronize()
    lines = [f"# Per-kernel GPU time of one warm SVG2 call: {a.shape} (H={h}, S={s}), Cq/Ck={cq}/{ck}, "
             f"density {a.density}, {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             f"config: {cfg}", f"k-means tiles: {tiles or 'default'}", "",
             "| phase | kernel | us per call | launches |", "|---|---|---|---|"]
    summary, host, host_text = {}, {}, []
    for name, fn in ph.items():
        # Host time to issue the phase while the GPU is kept busy (a sleep kernel queued first): what the
        # CPU needs per call, launches included; when it exceeds the phase's GPU time, eager calls that
        # start on an idle GPU wait for the host.
        ts = []
        for _ in range(a.reps):
            torch.cuda._sleep(100_000_000)
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
        host[name] = statistics.median(ts)
        if a.host_profile:  # where the host time goes: Python functions by own time
            pr = cProfile.Profile()
            torch.cuda._sleep(100_000_000)
            pr.enable()
            for _ in range(a.reps):
                fn()
            pr.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
            host_text.append(f"## host profile: {name} ({a.reps} calls)\n\n```\n{buf.getvalue()}\n```\n")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.reps):
                fn()
            torch.cuda.synchronize()
        table = _kernel_table(prof, a.reps)
        summary[name] = sum(t for _, t, _ in table)
        for kname, t, c in table:
            lines.append(f"| {name} | `{kname}` | {t:.1f} | {c:g} |")
    lines += ["", "| phase | GPU us per call (sum of kernels) | host us per call (GPU busy) |", "|---|---|---|"]
    lines += [f"| {k_} | {v_:.1f} | {host[k_]:.1f} |" for k_, v_ in summary.items()]
    text = "\n".join(lines) + "\n" + "\n".join(host_text)
    print(text, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{a.shape}_{cq}_{ck}{a.tag}.md").write_text(text)


if __name__ == "__main__":
    main()
