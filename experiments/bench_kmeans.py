"""k-means kernel variants on real Wan shapes (issue 3: the non-attention share of the SVG2 call).

    python experiments/bench_kmeans.py --shapes wan14b --out results/kernels --tag _r11

For each shape and (Cq, Ck): a 20-iteration cold start, then 2 warm-started iterations timed for every
:class:`svg2_kernels.kmeans.KMeansTiles` variant on Q and K (CUDA events, median), the assignment kernel
alone with and without the counting-sort bookkeeping, K's k-means with the permuted K written by the last
update (``sort_x``) against k-means + the permute kernel, and flash-kmeans 0.3.1 when installed. Every
variant's labels are compared with the first variant's. Writes ``bench_kmeans<tag>.{md,jsonl}``.
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from svg2.benchmark import time_ms as bench
from svg2.synthetic import SHAPES, clustered_qkv

VARIANTS = [  # KMeansTiles(block_m, block_c, warps, stages, sort_block, update_split[, update_rows, rank_by_sort])
    (256, 64, 8, 3, 128, 0, 0, True),  # the default
    (256, 64, 8, 3, 64, 0, 0, False),  # counting rank instead of the sort
    (256, 64, 8, 3, 64, 1),
    (128, 64, 4, 2, 64, 0),
    (256, 64, 8, 2, 64, 0),
    (256, 64, 8, 3, 128, 0),
    (256, 64, 8, 3, 0, 0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="wan14b,wan1.3b")
    ap.add_argument("--clusters", default="100,500;300,1000")
    ap.add_argument("--variants", default=None, help="JSON list of KMeansTiles tuples (default: VARIANTS)")
    ap.add_argument("--budget-ms", type=float, default=150)
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kmeans.py times CUDA kernels: run it on a GPU machine")
    from svg2_kernels import kmeans as km
    from svg2_kernels.order import chain_order
    from svg2_kernels.permute import permute_rows

    variants = [tuple(v) for v in json.loads(a.variants)] if a.variants else VARIANTS
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"bench_kmeans{a.tag}.jsonl"
    dev = torch.device("cuda")
    rows = []

    def emit(r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(log, "a") as fh:
            fh.write(json.dumps(r) + "\n")

    try:
        from flash_kmeans import batch_kmeans_Euclid as flash  # noqa: N813
    except Exception:  # noqa: BLE001
        flash = None
    for si, sname in enumerate(a.shapes.split(",")):
        q, k, _ = clustered_qkv(SHAPES[sname], dtype=torch.bfloat16, device=dev, seed=si)
        b, h, s, d = q.shape
        n = b * h
        xq, xk = q.reshape(n, s, d), k.reshape(n, s, d)
        for pair in a.clusters.split(";"):
            cq, ck = (int(x) for x in pair.split(","))
            g = torch.Generator(device="cpu").manual_seed(0)
            rq = km.kmeans_triton(xq, xq[:, torch.randperm(s, generator=g)[:cq].to(dev)], 20)
            rk = km.kmeans_triton(xk, xk[:, torch.randperm(s, generator=g)[:ck].to(dev)], 20)
            order = chain_order(rk.centroids)
            ck0 = rk.centroids.gather(1, order[..., None].expand_as(rk.centroids))
            inits = dict(q=(xq, rq.centroids), k=(xk, ck0))
            ref = {}
            for v in variants:
                tiles = km.KMeansTiles(*v)
                row = dict(kind="variant", shape=sname, cq=cq, ck=ck, tiles=list(v))
                for name, (x, c0) in inits.items():
                    try:
                        row[f"{name}_ms"] = bench(lambda: km.kmeans_triton(x, c0, 2, blocks=tiles), dev, a.budget_ms)
                        c_low, cn = c0.to(x.dtype), (c0.float() ** 2).sum(-1)
                        row[f"{name}_assign_ms"] = bench(lambda: km._assign(x, c_low, cn, True, tiles), dev,
                                                         a.budget_ms)
                        row[f"{name}_assign_nosort_ms"] = bench(lambda: km._assign(x, c_low, cn, False, tiles),
                                                                dev, a.budget_ms)
                        r = km.kmeans_triton(x, c0, 2, blocks=tiles)
                        if name not in ref:
                            ref[name] = r
                        row[f"{name}_labels_equal"] = (r.labels == ref[name].labels).float().mean().item()
                        row[f"{name}_perm_is_stable_argsort"] = bool(
                            torch.equal(r.perm, torch.argsort(r.labels, dim=1, stable=True)))
                        row[f"{name}_centroid_maxdiff"] = (r.centroids - ref[name].centroids).abs().max().item()
                    except Exception as e:  # noqa: BLE001
                        row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                emit(row)
            best = min((r for r in rows if r["kind"] == "variant" and r["shape"] == sname and r["cq"] == cq
                        and "q_ms" in r and "k_ms" in r), key=lambda r: r["q_ms"] + r["k_ms"])
            tiles = km.KMeansTiles(*best["tiles"])
            row = dict(kind="sort_x", shape=sname, cq=cq, ck=ck, tiles=best["tiles"])
            row["k_plus_permute_ms"] = bench(
                lambda: permute_rows(xk, km.kmeans_triton(xk, ck0, 2, blocks=tiles).perm), dev, a.budget_ms)
            row["k_sort_x_ms"] = bench(lambda: km.kmeans_triton(xk, ck0, 2, blocks=tiles, sort_x=True), dev,
                                       a.budget_ms)
            r = km.kmeans_triton(xk, ck0, 2, blocks=tiles, sort_x=True)
            row["sort_x_equal"] = bool(torch.equal(r.x_sorted, permute_rows(xk, r.perm)))
            if flash is not None:
                for name, (x, c0) in inits.items():
                    cc = c0.to(x.dtype)
                    row[f"flash_{name}_ms"] = bench(
                        lambda: flash(x, cc.shape[1], max_iters=2, tol=-1.0, init_centroids=cc), dev, a.budget_ms)
            emit(row)
        q = k = xq = xk = inits = ref = None
        torch.cuda.empty_cache()
    lines = [f"# k-means variants ({torch.cuda.get_device_name()}, torch {torch.__version__}), 2 warm iterations, "
             "bf16, D=128; ms (median of CUDA-event timings)", "",
             "| shape | Cq/Ck | tiles (bm, bc, warps, stages, sort_block, split[, rows, rank_by_sort]) | Q | K | Q+K "
             "| Q assign (no sort) | K assign (no sort) | K labels equal |", "|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rows:
        if r["kind"] == "variant":
            lines.append(
                f"| {r['shape']} | {r['cq']}/{r['ck']} | {r['tiles']} | {r.get('q_ms', nan):.3f} | "
                f"{r.get('k_ms', nan):.3f} | {r.get('q_ms', nan) + r.get('k_ms', nan):.3f} | "
                f"{r.get('q_assign_ms', nan):.3f} ({r.get('q_assign_nosort_ms', nan):.3f}) | "
                f"{r.get('k_assign_ms', nan):.3f} ({r.get('k_assign_nosort_ms', nan):.3f}) | "
                f"{r.get('k_labels_equal', nan):.4f} |")
    lines += ["", "| shape | Cq/Ck | best tiles | K + permute kernel | K with sort_x | equal | flash-kmeans Q | "
              "flash-kmeans K |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "sort_x":
            lines.append(f"| {r['shape']} | {r['cq']}/{r['ck']} | {r['tiles']} | {r['k_plus_permute_ms']:.3f} | "
                         f"{r['k_sort_x_ms']:.3f} | {r['sort_x_equal']} | {r.get('flash_q_ms', nan):.3f} | "
                         f"{r.get('flash_k_ms', nan):.3f} |")
    totals: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kind"] == "variant" and "q_ms" in r and "k_ms" in r:
            totals.setdefault(tuple(r["tiles"]), []).append(r["q_ms"] + r["k_ms"])
    full = [kv for kv in totals.items() if len(kv[1]) == max(map(len, totals.values()))]
    if full:
        best = min(full, key=lambda kv: sum(kv[1]))
        lines += ["", f"Fastest over all shapes and cluster counts (sum of Q + K): {list(best[0])}"]
        print("BEST " + json.dumps(list(best[0])).replace(" ", ""), flush=True)
    text = "\n".join(lines) + "\n"
    (out / f"bench_kmeans{a.tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
