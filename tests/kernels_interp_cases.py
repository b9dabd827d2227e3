"""Worker for tests/test_kernels_triton.py: runs every Triton kernel under TRITON_INTERPRET=1 at tiny shapes.

Run as a subprocess (the interpreter flag must be set before Triton is imported, and must not leak into
other tests). Prints one JSON object: case name -> {"ok": bool, "detail": str}.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch


def _import_svg2_kernels():
    try:
        import svg2_kernels  # noqa: F401
    except ImportError:  # not pip-installed: alias the svg2_kernels/ folder
        root = Path(__file__).resolve().parents[1] / "svg2_kernels"
        spec = importlib.util.spec_from_file_location(
            "svg2_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["svg2_kernels"] = mod
        spec.loader.exec_module(mod)


def random_offsets(n: int, length: int, clusters: int, g: torch.Generator) -> torch.Tensor:
    """(n, clusters+1) offsets covering ``length`` rows with empty and 1-token clusters mixed in."""
    out = []
    for _ in range(n):
        w = torch.rand(clusters, generator=g) + 0.2
        w[torch.randint(0, clusters, (max(1, clusters // 4),), generator=g)] = 0.0  # empty clusters
        sizes = torch.floor(w / w.sum() * length).long()
        one = torch.randint(0, clusters, (1,), generator=g)
        sizes[one] = 1  # a 1-token cluster
        sizes[torch.argmax(sizes)] += length - sizes.sum()
        out.append(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]))
    return torch.stack(out)


def attention_case(name, dtype, b, h, sq, sk, d, cq, ck, density, kernel, tiles, tail_q=3, tail_k=4, seed=0):
    """One kernel on a random layout, outputs and log-sum-exp against the fp32 reference (FlashAttention's
    rule: at most twice the error of the same-precision torch path, plus a small floor)."""
    from svg2_kernels.plan import TileConfig, build_plan
    from svg2_kernels.reference import varblock_attention_reference as ref

    g = torch.Generator().manual_seed(seed)
    qo = random_offsets(b * h, sq - tail_q, cq, g).reshape(b, h, cq + 1)
    ko = random_offsets(b * h, sk - tail_k, ck, g).reshape(b, h, ck + 1)
    bm = torch.rand(b, h, cq, ck, generator=g) < density
    bm[0, 0, 0] = False  # a query cluster that selects nothing
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = (torch.randn(b, h, sk, d, generator=g) * 1.5).to(dtype)
    v = torch.randn(b, h, sk, d, generator=g).to(dtype)
    plan = build_plan(qo, ko, bm, sq, sk, head_dim=d, dtype=dtype, kernel=kernel, tiles=TileConfig(**tiles))
    out, lse = plan.run(q, k, v, return_lse=True)
    r32, l32 = ref(q, k, v, qo, ko, bm, return_lse=True)
    rlow, llow = ref(q, k, v, qo, ko, bm, compute_dtype=None, return_lse=True)
    err = (out.float() - r32.float()).abs().max().item()
    base = (rlow.float() - r32.float()).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    fin = torch.isfinite(l32)
    same_inf = torch.equal(torch.isfinite(lse), fin)  # -inf exactly where no key is kept
    lerr = (lse[fin] - l32[fin]).abs().max().item()
    lbase = (llow.float()[fin] - l32[fin]).abs().max().item()
    ok = (plan.kernel == kernel and bool(torch.isfinite(out).all()) and err <= 2 * base + floor
          and same_inf and lerr <= 2 * lbase + floor and lse.dtype == torch.float32)
    return name, ok, (f"{plan.kernel}: err {err:.3g} vs same-precision torch {base:.3g}; lse err {lerr:.3g} vs "
                      f"{lbase:.3g}, -inf rows match {same_inf} (floor {floor})")


def kmeans_case(name, dtype, n, s, d, c, iters, tiles=None, sort_x=False, seed=0):
    from svg2_kernels.kmeans import KMeansTiles, kmeans_triton
    from svg2_kernels.reference import kmeans_assign_reference, kmeans_update_reference

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, s, d, generator=g).to(dtype)
    c0 = torch.randn(n, c, d, generator=g)
    c0[0, 1] += 50.0  # a cluster that stays empty
    res = kmeans_triton(x, c0, iters, blocks=None if tiles is None else KMeansTiles(*tiles), sort_x=sort_x)
    cref = c0.float()
    labels = kmeans_assign_reference(x, cref)
    for _ in range(iters):
        labels = kmeans_assign_reference(x, cref)
        cref, _ = kmeans_update_reference(x, labels, cref)
    sizes = torch.zeros(n, c, dtype=torch.long).scatter_add_(1, labels, torch.ones_like(labels))
    mism = (res.labels != labels).sum().item()
    cerr = (res.centroids - cref).abs().max().item()
    ok = (
        mism == 0
        and cerr < 1e-4
        and torch.equal(res.sizes, sizes)
        and torch.equal(res.perm, torch.argsort(res.labels, dim=1, stable=True))
        and torch.equal(res.offsets[:, 1:], res.sizes.cumsum(1))
        and int(res.offsets[:, 0].abs().sum()) == 0
    )
    if sort_x:  # the permuted rows written by the last update (or the permute kernel at iters=0)
        ok = ok and torch.equal(res.x_sorted, x.gather(1, res.perm[..., None].expand(-1, -1, d)))
    return name, ok, f"label mismatches {mism}, centroid err {cerr:.3g}"


def gather_q_case():
    """q_perm fuses the query gather and the output scatter: same outputs and lse, in token order."""
    from svg2_kernels.plan import TileConfig, build_plan

    g = torch.Generator().manual_seed(2)
    b, h, s, d, cq, ck = 1, 2, 50, 16, 4, 6
    qo = random_offsets(b * h, s, cq, g).reshape(b, h, cq + 1)
    ko = random_offsets(b * h, s, ck, g).reshape(b, h, ck + 1)
    bm = torch.rand(b, h, cq, ck, generator=g) < 0.5
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float16) for _ in range(3))
    perm = torch.stack([torch.randperm(s, generator=g) for _ in range(b * h)]).reshape(b, h, s)
    idx = perm[..., None].expand(-1, -1, -1, d)
    ok, details = True, []
    for kernel in ("triton_tma", "triton_chunks", "torch"):
        plan = build_plan(qo, ko, bm, s, s, head_dim=d, dtype=q.dtype, kernel=kernel,
                          tiles=TileConfig(block_m=32, block_n=16, block_m_small=16))
        out_s, lse_s = plan.run(q.gather(2, idx), k, v, return_lse=True)
        got, lse = plan.run(q, k, v, q_perm=perm, return_lse=True)
        want = torch.empty_like(out_s).scatter_(2, idx, out_s)
        want_l = torch.empty_like(lse_s).scatter_(2, perm, lse_s)
        same = torch.equal(got, want) and torch.equal(lse, want_l)
        ok = ok and same
        details.append(f"{kernel} equal {same}")
    return "gather_q", ok, ", ".join(details)


def chunk_table_case():
    """The one-launch Triton chunk-table builder equals the torch builder (counts and every used slot)."""
    from svg2_kernels.varblock_chunks import build_chunk_table, build_chunk_table_triton

    g = torch.Generator().manual_seed(6)
    ok, total = True, 0
    for n, cq, ck, s, ch, dens in [(3, 5, 17, 200, 4, 0.5), (2, 3, 40, 333, 16, 0.9), (2, 4, 9, 50, 8, 0.2),
                                   (1, 2, 33, 400, 16, 1.01)]:
        ko = random_offsets(n, s - 3, ck, g).to(torch.int32)
        bm = torch.rand(n, cq, ck, generator=g) < dens
        sel = bm & (ko[:, 1:] > ko[:, :-1]).unsqueeze(1)
        sel = torch.cat([sel, torch.zeros(n, 1, ck, dtype=torch.bool)], 1)
        t_ref, c_ref = build_chunk_table(ko, sel, s, ch)
        t_tri, c_tri = build_chunk_table_triton(ko, bm, s, ch)
        ok &= torch.equal(c_ref, c_tri)
        used = torch.arange(t_ref.shape[-1]) < c_ref.unsqueeze(-1)
        ok &= torch.equal(t_ref[used], t_tri[used])
        total += int(c_ref.sum())
    return "chunk_table", bool(ok), f"{total} chunks compared"


def chain_order_case():
    """The Triton chain (one program per row) visits clusters in exactly the torch path's order."""
    from svg2_kernels.order import chain_order, chain_order_torch

    g = torch.Generator().manual_seed(4)
    c = torch.randn(3, 37, 16, generator=g)
    got, want = chain_order(c), chain_order_torch(c)
    perm_ok = all(sorted(r.tolist()) == list(range(37)) for r in got)
    return "chain_order", bool(torch.equal(got, want) and perm_ok), f"first row {got[0, :8].tolist()}"


def schedule_case():
    """The two-launch Triton schedule builder equals the torch one (both tiers, with and without LPT)."""
    from svg2_kernels import varblock_attention as va
    from svg2_kernels.plan import TileConfig
    from svg2_kernels.varblock_schedule import build_work_items_triton

    g = torch.Generator().manual_seed(5)
    ok, checked = True, 0
    for n, cq, s, bm, bs, lpt, glob in [(3, 6, 300, 32, 16, False, False), (3, 6, 300, 32, 16, True, False),
                                          (3, 6, 300, 32, 16, True, True), (2, 9, 500, 64, 0, True, False),
                                          (4, 5, 257, 16, 8, True, True), (1, 1, 40, 16, 0, False, False)]:
        sz = torch.randint(0, 3 * bm, (n, cq), generator=g)
        sz[:, 0] = 0  # an empty cluster
        qo = torch.cat([torch.zeros(n, 1, dtype=torch.long), sz.cumsum(-1)], -1).clamp(max=s - 3).to(torch.int32)
        nt = torch.randint(0, 5, (n, cq + 1), generator=g).to(torch.int32)
        nt[:, -1] = 0
        tiles = TileConfig(bm, 16, 4, 1, bs, 4, 16, lpt, glob, False)
        q_bounds = torch.cat([qo, torch.full((n, 1), s, dtype=torch.int32)], dim=1)
        ref = va._with_query_tiles_torch(qo, q_bounds, s, n, cq, tiles, num_tiles=nt, chunk_table=nt,
                                         chunk_count=nt)
        w, nw, ws, nws = build_work_items_triton(qo, nt, s, bm, bs, lpt, glob)
        k, ks = int(ref.num_work), int(ref.num_work_small)
        ok &= (int(nw) == k and int(nws) == ks and w.shape == ref.work.shape and ws.shape == ref.work_small.shape
               and torch.equal(w[:k], ref.work[:k]) and torch.equal(ws[:ks], ref.work_small[:ks]))
        checked += k + ks
    return "schedule", bool(ok), f"{checked} work items compared over 6 layouts"


def permute_case():
    from svg2_kernels.permute import permute_rows, unpermute_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 45, 24, generator=g, dtype=torch.float16)
    perm = torch.stack([torch.randperm(45, generator=g) for _ in range(6)]).reshape(2, 3, 45)
    y = permute_rows(x, perm)
    ok = torch.equal(y, x.gather(2, perm[..., None].expand(-1, -1, -1, 24))) and torch.equal(unpermute_rows(y, perm), x)
    # one permutation shared by every head (an expanded, stride-0 view, as the text-key permutation is)
    shared = torch.randperm(45, generator=g)[None, None, :].expand(2, 3, 45)
    y2 = permute_rows(x, shared)
    ok = ok and torch.equal(y2, x.gather(2, shared[..., None].expand(-1, -1, -1, 24)))
    return "permute", ok, "gather and scatter, per-head and shared (expanded) permutations"


def opcheck_more_case():
    """Schema and fake-tensor checks of the k-means and permutation custom ops."""
    from svg2_kernels.kmeans import _kmeans_op
    from svg2_kernels.permute import _permute_rows_op

    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 30, 16, generator=g, dtype=torch.float16)
    perm = torch.stack([torch.randperm(30, generator=g) for _ in range(2)]).reshape(1, 2, 30)
    checks = ("test_schema", "test_faketensor")
    x = torch.randn(2, 40, 16, generator=g)
    c = x[:, :5].clone()
    for iters in (0, 2):  # iters=0 returns the input centroids: must not alias them
        for sort_x in (False, True):
            torch.library.opcheck(_kmeans_op, (x, c, iters, sort_x), test_utils=checks)
    torch.library.opcheck(_permute_rows_op, (q, perm), test_utils=checks)
    return "opcheck_more", True, "kmeans, permute_rows"


def svg2_end_to_end_case():
    """svg2_attention with the Triton k-means (perm passthrough) and the fused-permutation attention path,
    joint text with padding included, against float64 masked dense attention on the layout it produced."""
    from svg2 import ClusterState, SVG2Config, svg2_attention

    g = torch.Generator().manual_seed(5)
    b, h, sv, t, d = 2, 2, 70, 5, 32
    centers = torch.randn(b, h, 6, d, generator=g) * 2
    pick = torch.randint(0, 6, (b, h, sv + t), generator=g)
    base = torch.gather(centers, 2, pick[..., None].expand(-1, -1, -1, d))
    q = (base + 0.3 * torch.randn(b, h, sv + t, d, generator=g)).float()
    k = (base + 0.3 * torch.randn(b, h, sv + t, d, generator=g)).float()
    v = torch.randn(b, h, sv + t, d, generator=g)
    tm = torch.ones(b, t, dtype=torch.bool)
    tm[1, 3:] = False
    cfg = SVG2Config(num_q_centroids=6, num_k_centroids=9, top_p=0.8, kmeans_iters_init=4,
                     attention_kernel="auto", kmeans_kernel="triton")
    state = ClusterState()
    ok, details = True, []
    # Cold call, then a warm one: the warm call's keys in cluster order come from k-means' last update.
    for call in ("cold", "warm"):
        if call == "warm":
            k = k + 0.05 * torch.randn(k.shape, generator=g)
        if call == "warm":  # this call's K does come sorted from the k-means (no separate gather)
            from svg2.attention import _build_layout

            probe = ClusterState(q_centroids=state.q_centroids.clone(), k_centroids=state.k_centroids.clone())
            _, ks = _build_layout(q, k, cfg, probe, num_text_tokens=t, text_mask=tm, scale=None, timer=None,
                                  sort_k=True)
            ok = ok and ks is not None
        out, lse, layout = svg2_attention(q, k, v, cfg, state, num_text_tokens=t, text_mask=tm, return_lse=True)
        ok = ok and state.last_kernels["attention"] == "triton_tma"  # auto picks the kernel GPUs run
        sorted_q = torch.gather(layout.q_labels, 2, layout.q_perm)
        perm_ok = bool((sorted_q.diff(dim=-1) >= 0).all())
        mask = layout.to_dense()
        qd, kd, vd = q.double(), k.double(), v.double()
        s = (qd @ kd.transpose(-1, -2)) / d**0.5
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vd
        ref_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
        lerr = (lse.double() - ref_lse).abs().max().item()
        ok = ok and lerr < 1e-4
        same = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        err = (out.double() - ref).abs().max().item()
        err_torch = (same.double() - ref).abs().max().item()
        ok = ok and perm_ok and err <= 2 * err_torch + 1e-4 and layout.density() < 1
        details.append(f"{call}: err {err:.3g} vs torch {err_torch:.3g}, lse err {lerr:.3g}, perm sorted {perm_ok}")
    return "svg2_end_to_end", ok, "; ".join(details)


def opcheck_case():
    """Schema and fake-tensor checks of the attention op on a plan's tensors, with and without the lse."""
    from svg2_kernels.plan import build_plan
    from svg2_kernels.varblock_attention import _varblock_attention_op

    g = torch.Generator().manual_seed(1)
    qo = random_offsets(2, 30, 3, g).reshape(1, 2, 4)
    ko = random_offsets(2, 40, 5, g).reshape(1, 2, 6)
    bm = torch.rand(1, 2, 3, 5, generator=g) < 0.5
    q = torch.randn(1, 2, 32, 16, generator=g, dtype=torch.float16)
    k = torch.randn(1, 2, 44, 16, generator=g, dtype=torch.float16)
    perm = torch.stack([torch.randperm(32, generator=g) for _ in range(2)]).reshape(1, 2, 32)
    for kernel in ("triton_tma", "triton_chunks"):
        plan = build_plan(qo, ko, bm, 32, 44, head_dim=16, dtype=q.dtype, kernel=kernel)
        m = plan.data
        for q_perm, lse in ((None, False), (perm, True)):
            args = (q, k, k.clone(), q_perm, m.work, m.num_work, m.work_small, m.num_work_small, m.q_bounds,
                    m.num_tiles, m.chunk_table, m.chunk_count, kernel, plan.tiles.as_list(), 0.25, lse)
            torch.library.opcheck(_varblock_attention_op, args, test_utils=("test_schema", "test_faketensor"))
    return "opcheck", True, "schema and fake tensor ok (both kernels, token order, lse)"


_T16 = dict(block_m=16, block_n=16, num_stages=1)
CASES = [
    # name, dtype, b, h, sq, sk, d, cq, ck, density, kernel, TileConfig fields
    ("attn_fp16_tma", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, "triton_tma", _T16),
    ("attn_fp32_tma", torch.float32, 2, 2, 37, 45, 32, 5, 9, 0.5, "triton_tma", _T16),
    ("attn_fp32_tma_two_tier", torch.float32, 2, 2, 90, 70, 32, 4, 9, 0.5, "triton_tma",
     dict(block_m=32, block_n=16, block_m_small=16)),
    ("attn_fp16_tma_sparse", torch.float16, 2, 2, 33, 65, 16, 6, 12, 0.15, "triton_tma",
     dict(block_m=16, block_n=32)),
    ("attn_fp16_tma_dense_all", torch.float16, 1, 2, 40, 40, 16, 3, 4, 1.01, "triton_tma",
     dict(block_m=16, block_n=32)),
    ("attn_fp32_tma_d48", torch.float32, 2, 1, 70, 33, 48, 3, 6, 0.7, "triton_tma", dict(block_m=32, block_n=16)),
    ("attn_fp16_tma_lpt_two_tier", torch.float16, 2, 3, 90, 70, 32, 4, 9, 0.5, "triton_tma",
     dict(block_m=32, block_n=16, block_m_small=16, lpt=True)),
    ("attn_fp16_tma_lpt_global", torch.float16, 2, 3, 90, 70, 32, 4, 9, 0.5, "triton_tma",
     dict(block_m=32, block_n=16, block_m_small=16, lpt=True, lpt_global=True)),
    ("attn_fp16_chunks8", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, "triton_chunks", dict(_T16, chunk=8)),
    ("attn_fp32_chunks4_two_tier", torch.float32, 2, 2, 90, 70, 32, 4, 9, 0.5, "triton_chunks",
     dict(block_m=32, block_n=16, block_m_small=16, chunk=4)),
    ("attn_fp16_chunks_box", torch.float16, 1, 3, 50, 61, 32, 4, 17, 0.6, "triton_chunks", dict(_T16, chunk=16)),
    ("attn_fp16_chunks_sparse", torch.float16, 2, 2, 33, 65, 16, 6, 12, 0.15, "triton_chunks",
     dict(block_m=16, block_n=32, chunk=8)),
    ("attn_fp16_chunks_dense_all", torch.float16, 1, 2, 40, 40, 16, 3, 4, 1.01, "triton_chunks",
     dict(block_m=16, block_n=32, chunk=16)),
    ("attn_fp32_chunks_d48", torch.float32, 2, 1, 70, 33, 48, 3, 6, 0.7, "triton_chunks",
     dict(block_m=32, block_n=16, chunk=8)),
]

KM_CASES = [
    ("kmeans_fp32_iters0", torch.float32, 2, 37, 32, 5, 0),
    ("kmeans_fp32_iters3", torch.float32, 3, 75, 32, 7, 3),
    ("kmeans_fp16_iters2", torch.float16, 2, 50, 16, 9, 2),
    # KMeansTiles(block_m, block_c, warps, stages, sort_block, update_split[, update_rows, rank_by_sort])
    ("kmeans_fp16_sort_block", torch.float16, 2, 75, 16, 9, 2, (32, 16, 4, 1, 16, 0, 0, False)),
    ("kmeans_fp16_rank_by_sort", torch.float16, 2, 75, 16, 9, 2, (64, 16, 4, 1, 16, 0, 0, True)),
    ("kmeans_fp16_rank_by_sort_one_point", torch.float16, 2, 1, 16, 2, 2, (32, 16, 4, 1, 16, 0, 0, True)),
    ("kmeans_fp32_centroid_tiles", torch.float32, 3, 75, 32, 37, 2, (16, 16, 4, 1, 0, 0, 0, False)),
    ("kmeans_fp32_split_sort_x", torch.float32, 2, 90, 32, 4, 2, (16, 16, 4, 1, 0, 4), True),
    ("kmeans_fp16_sort_x_iters0", torch.float16, 2, 37, 16, 5, 0, None, True),
    ("kmeans_fp16_sort_block_split", torch.float16, 2, 90, 16, 9, 2, (64, 16, 4, 1, 16, 2, 8), True),
]


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    _import_svg2_kernels()
    results = {}
    jobs = [lambda c=c: attention_case(*c) for c in CASES]
    jobs += [lambda c=c: kmeans_case(*c) for c in KM_CASES]
    jobs.append(gather_q_case)
    jobs.append(permute_case)
    jobs.append(chain_order_case)
    jobs.append(schedule_case)
    jobs.append(chunk_table_case)
    jobs.append(opcheck_case)
    jobs.append(svg2_end_to_end_case)
    jobs.append(opcheck_more_case)
    for job in jobs:
        try:
            name, ok, detail = job()
        except Exception as e:  # report, don't stop the other cases
            name, ok, detail = getattr(job, "__name__", "case"), False, f"{type(e).__name__}: {e}"
        results[name] = {"ok": bool(ok), "detail": detail}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
