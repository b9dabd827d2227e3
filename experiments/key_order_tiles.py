"""Key-side tile use of the kernel layouts under different key-cluster orders (CPU, no GPU needed).

    python experiments/key_order_tiles.py --shape wan14b --heads 2 --out results/kernels/key_order_tiles.md

Builds the benchmark's synthetic Q/K (experiments/bench_kernels.py), clusters them with a plain Lloyd k-means
(8 iterations), selects cluster pairs in target-density mode, and counts, per query cluster, the useful key
rows against the key rows that the tiles load: 16-row chunks packed into 128-row tiles (the chunk table of
``triton_chunks``), whole 128- and 64-row boxes of each run (the TMA boxes of ``triton_tma``). Orders:
``none`` (k-means labels), ``chain`` (the greedy nearest-neighbour chain of
:func:`svg2_kernels.order.chain_order_torch`), ``pca`` (first principal component of the centroids),
``position`` (mean token index of the cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from svg2.synthetic import SHAPES, clustered_qkv


def lloyd(x: torch.Tensor, c: int, iters: int, g: torch.Generator):
    n, s, d = x.shape
    cen = x[:, torch.randperm(s, generator=g)[:c]].clone().float()
    lab = torch.zeros(n, s, dtype=torch.long)
    for _ in range(iters):
        dist = (x.float() @ cen.transpose(1, 2)) * -2 + (cen**2).sum(-1)[:, None, :]
        lab = dist.argmin(-1)
        for i in range(n):
            cnt = torch.bincount(lab[i], minlength=c).clamp_min(1)
            cen[i] = torch.zeros(c, d).index_add_(0, lab[i], x[i].float()) / cnt[:, None]
    sizes = torch.stack([torch.bincount(lab[i], minlength=c) for i in range(n)])
    return lab, cen, sizes


def key_order(name: str, cen: torch.Tensor, lab: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    from svg2_kernels.order import chain_order_torch

    n, c, _ = cen.shape
    if name == "none":
        return torch.arange(c).expand(n, c)
    if name == "chain":
        return chain_order_torch(cen)
    if name == "pca":
        out = []
        for i in range(n):
            c0 = cen[i] - cen[i].mean(0)
            _, _, v = torch.pca_lowrank(c0, q=2)
            out.append((c0 @ v[:, 0]).argsort())
        return torch.stack(out)
    if name == "position":
        s = lab.shape[1]
        pos = torch.stack([torch.zeros(c).index_add_(0, lab[i], torch.arange(s).float()) for i in range(n)])
        return (pos / sizes.clamp_min(1)).argsort(-1)
    raise ValueError(f"unknown order {name!r}; known: none, chain, pca, position")


def run_lengths(sel: torch.Tensor, ksz: torch.Tensor) -> list[int]:
    """Row counts of the maximal stretches of selected (or empty) clusters, in cluster order."""
    lens, cur = [], 0
    for c in range(sel.shape[0]):
        if sel[c] or ksz[c] == 0:
            cur += int(ksz[c]) if sel[c] else 0
        else:
            if cur:
                lens.append(cur)
            cur = 0
    if cur:
        lens.append(cur)
    return lens


def main() -> None:
    from svg2.selection import centroid_scores, select_target_density

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="wan14b")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--orders", default="none,chain,pca,position")
    ap.add_argument("--densities", default="0.1,0.25,0.4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shape = dataclasses.replace(SHAPES[args.shape], heads=args.heads)
    q, k, _ = clustered_qkv(shape, head_dim=128, dtype=torch.float32)
    n, s = args.heads, q.shape[2]
    lines = [f"# Key-side tile use by key-cluster order ({args.shape}, {n} heads, S={s}, CPU)", "",
             "Command: `python experiments/key_order_tiles.py " + " ".join(sys.argv[1:]) + "`", "",
             "Key-side tile use = useful key rows / key rows loaded, summed over query clusters (weighted by "
             "query rows). chunk16: 16-row chunks in 128-row tiles (triton_chunks); box128 / box64: "
             "whole boxes of a run (triton_tma).", "",
             "| Cq/Ck | density | order | selected / query cluster | runs / query cluster | chunk16 | box128 | box64 |",
             "|---|---|---|---|---|---|---|---|"]
    for cq_n, ck_n in ((100, 500), (300, 1000)):
        g = torch.Generator().manual_seed(0)
        lq, cq, qsz = lloyd(q.reshape(n, s, -1), cq_n, 8, g)
        lk, ck, ksz0 = lloyd(k.reshape(n, s, -1), ck_n, 8, g)
        scores0 = centroid_scores(cq, ck, ksz0)
        for dens in (float(x) for x in args.densities.split(",")):
            sel0 = select_target_density(scores0, qsz, ksz0, dens, 0.0)
            for oname in args.orders.split(","):
                order = key_order(oname, ck, lk, ksz0)
                ksz = torch.gather(ksz0, 1, order)
                sel = torch.gather(sel0, 2, order[:, None, :].expand_as(sel0))
                useful = {"chunk16": 0.0, "box128": 0.0, "box64": 0.0}
                loaded = dict.fromkeys(useful, 0.0)
                nruns = 0
                for i in range(n):
                    for a in range(cq_n):
                        rows = int(qsz[i, a])
                        if rows == 0:
                            continue
                        lens = torch.tensor(run_lengths(sel[i, a], ksz[i]), dtype=torch.float64)
                        nruns += len(lens)
                        tot = float(lens.sum())
                        for key in useful:
                            useful[key] += rows * tot
                        loaded["chunk16"] += rows * math.ceil(float(torch.ceil(lens / 16).sum()) * 16 / 128) * 128
                        loaded["box128"] += rows * float(torch.ceil(lens / 128).sum()) * 128
                        loaded["box64"] += rows * float(torch.ceil(lens / 64).sum()) * 64
                per_q = float(sel.sum()) / (n * cq_n)
                use = " | ".join(f"{useful[key] / max(loaded[key], 1):.3f}" for key in useful)
                lines.append(f"| {cq_n}/{ck_n} | {dens} | {oname} | {per_q:.0f} | {nruns / (n * cq_n):.1f} | {use} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
