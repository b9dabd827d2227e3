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
    except ImportError:  # not pip-installed: alias the kernels/ folder
        root = Path(__file__).resolve().parents[1] / "kernels"
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


def attention_case(name, dtype, b, h, sq, sk, d, cq, ck, density, cfg, tail_q=3, tail_k=4, seed=0):
    from svg2_kernels.reference import varblock_attention_reference as ref
    from svg2_kernels.varblock_attention import VarBlockConfig, _forward

    g = torch.Generator().manual_seed(seed)
    qo = random_offsets(b * h, sq - tail_q, cq, g).reshape(b, h, cq + 1)
    ko = random_offsets(b * h, sk - tail_k, ck, g).reshape(b, h, ck + 1)
    bm = torch.rand(b, h, cq, ck, generator=g) < density
    bm[0, 0, 0] = False  # a query cluster that selects nothing
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = (torch.randn(b, h, sk, d, generator=g) * 1.5).to(dtype)
    v = torch.randn(b, h, sk, d, generator=g).to(dtype)
    out = _forward(q, k, v, qo, ko, bm, None, VarBlockConfig(*cfg))
    r32 = ref(q, k, v, qo, ko, bm)
    rlow = ref(q, k, v, qo, ko, bm, compute_dtype=None)
    err = (out.float() - r32.float()).abs().max().item()
    base = (rlow.float() - r32.float()).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    ok = bool(torch.isfinite(out).all()) and err <= 2 * base + floor
    return name, ok, f"err {err:.3g} vs same-precision torch {base:.3g} (floor {floor})"


def attention_8bit_case(name, qk, dtype, b, h, sq, sk, d, cq, ck, density, cfg=None, k_offset=0.0, seed=0,
                        token_order=False, v_transposed=False):
    """The 8-bit kernel (INT8 or FP8 QK^T, FP8 PV) against fp32: its error at most twice that of a torch path
    that quantizes the same operands the same way (the FlashAttention rule at the kernel's precision)."""
    from svg2_kernels.reference import varblock_attention_fp8_reference as ref8
    from svg2_kernels.reference import varblock_attention_reference as ref
    from svg2_kernels.varblock_attention import VarBlockConfig
    from svg2_kernels.varblock_fp8 import _forward_fp8

    g = torch.Generator().manual_seed(seed)
    qo = random_offsets(b * h, sq - 3, cq, g).reshape(b, h, cq + 1)
    ko = random_offsets(b * h, sk - 4, ck, g).reshape(b, h, ck + 1)
    bm = torch.rand(b, h, cq, ck, generator=g) < density
    bm[0, 0, 0] = False  # a query cluster that selects nothing
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = (torch.randn(b, h, sk, d, generator=g) * 1.5 + k_offset).to(dtype)  # an offset: K's centring is exact
    k[..., 1] = 0.5  # a constant channel (scale 0 -> 1)
    v = torch.randn(b, h, sk, d, generator=g).to(dtype)
    config = VarBlockConfig(*cfg) if cfg else None
    out = _forward_fp8(q, k, v, qo, ko, bm, 1.0 / d**0.5, qk=qk, config=config,
                       v_transposed=v_transposed)
    r32, r8 = ref(q, k, v, qo, ko, bm).float(), ref8(q, k, v, qo, ko, bm, qk=qk).float()
    err = (out.float() - r32).abs().max().item()
    base = (r8 - r32).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 2 * base + 1e-3
    # rows past q_offsets[-1] and the query cluster that selects nothing are zero
    empty = out[0, 0, int(qo[0, 0, 0]):int(qo[0, 0, 1])]
    ok = ok and bool((out[..., sq - 3:, :] == 0).all()) and bool((empty == 0).all())
    detail = f"err {err:.3g} vs 8-bit torch path {base:.3g}"
    if token_order:  # q_perm: Q gathered and O scattered by the kernel
        perm = torch.stack([torch.randperm(sq, generator=g) for _ in range(b * h)]).reshape(b, h, sq)
        idx = perm[..., None].expand(-1, -1, -1, d)
        got = _forward_fp8(q, k, v, qo, ko, bm, 1.0 / d**0.5, q_perm=perm, qk=qk, config=config,
                       v_transposed=v_transposed)
        sorted_out = _forward_fp8(q.gather(2, idx), k, v, qo, ko, bm, 1.0 / d**0.5, qk=qk, config=config,
                       v_transposed=v_transposed)
        same = torch.equal(got, torch.empty_like(sorted_out).scatter_(2, idx, sorted_out))
        ok = ok and same
        detail += f", token order equal {same}"
    return name, ok, detail


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
    """q_perm fuses the query gather and the output scatter: same result in token order."""
    from svg2_kernels.varblock_attention import VarBlockConfig, build_varblock_metadata
    from svg2_kernels.varblock_attention import varblock_attention_with_metadata as run

    g = torch.Generator().manual_seed(2)
    b, h, s, d, cq, ck = 1, 2, 50, 16, 4, 6
    qo = random_offsets(b * h, s, cq, g).reshape(b, h, cq + 1)
    ko = random_offsets(b * h, s, ck, g).reshape(b, h, ck + 1)
    bm = torch.rand(b, h, cq, ck, generator=g) < 0.5
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float16) for _ in range(3))
    perm = torch.stack([torch.randperm(s, generator=g) for _ in range(b * h)]).reshape(b, h, s)
    cfg = VarBlockConfig(32, 16, 4, 4, 1, 16)
    meta = build_varblock_metadata(qo, ko, bm, s, s, cfg)
    sorted_out = run(q.gather(2, perm[..., None].expand(-1, -1, -1, d)), k, v, meta)
    want = torch.empty_like(sorted_out).scatter_(2, perm[..., None].expand(-1, -1, -1, d), sorted_out)
    got = run(q, k, v, meta, q_perm=perm)
    ok = torch.equal(got, want)
    # the same through the TMA-tile kernel (v5)
    meta = build_varblock_metadata(qo, ko, bm, s, s, VarBlockConfig(32, 16, 4, 4, 1, 16, key_layout="tma"))
    sorted_out = run(q.gather(2, perm[..., None].expand(-1, -1, -1, d)), k, v, meta)
    want_t = torch.empty_like(sorted_out).scatter_(2, perm[..., None].expand(-1, -1, -1, d), sorted_out)
    got_t = run(q, k, v, meta, q_perm=perm)
    ok = ok and torch.equal(got_t, want_t)
    return "gather_q", ok, f"max diff {(got.float() - want.float()).abs().max().item():.3g} (window), " \
        f"{(got_t.float() - want_t.float()).abs().max().item():.3g} (tma)"


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
        cfg = va.VarBlockConfig(block_m=bm, block_n=16, win=4, block_m_small=bs, lpt=lpt, lpt_global=glob)
        q_bounds = torch.cat([qo, torch.full((n, 1), s, dtype=torch.int32)], dim=1)
        ref = va._with_query_tiles_torch(qo, q_bounds, s, n, cq, cfg, num_tiles=nt, run_vstart=nt, run_delta=nt,
                                         run_vend=nt)
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
    return "permute", ok, "gather and scatter"


def opcheck_more_case():
    """Schema and fake-tensor checks of the token-order attention, k-means and permutation custom ops."""
    from svg2_kernels.kmeans import _kmeans_op
    from svg2_kernels.permute import _permute_rows_op
    from svg2_kernels.varblock_attention import _varblock_attention_token_order_op

    g = torch.Generator().manual_seed(4)
    qo = random_offsets(2, 30, 3, g).reshape(1, 2, 4)
    ko = random_offsets(2, 30, 5, g).reshape(1, 2, 6)
    bm = torch.rand(1, 2, 3, 5, generator=g) < 0.5
    q, k, v = (torch.randn(1, 2, 30, 16, generator=g, dtype=torch.float16) for _ in range(3))
    perm = torch.stack([torch.randperm(30, generator=g) for _ in range(2)]).reshape(1, 2, 30)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(_varblock_attention_token_order_op, (q, k, v, perm, qo, ko, bm, 0.25), test_utils=checks)
    x = torch.randn(2, 40, 16, generator=g)
    c = x[:, :5].clone()
    for iters in (0, 2):  # iters=0 returns the input centroids: must not alias them
        for sort_x in (False, True):
            torch.library.opcheck(_kmeans_op, (x, c, iters, sort_x), test_utils=checks)
    torch.library.opcheck(_permute_rows_op, (q, perm), test_utils=checks)
    from svg2_kernels.varblock_fp8 import _varblock_attention_fp8_op

    for p_, qk in ((perm, "int8"), (None, "fp8")):
        torch.library.opcheck(_varblock_attention_fp8_op, (q, k, v, p_, qo, ko, bm, 0.25, qk), test_utils=checks)
    return "opcheck_more", True, "token-order attention, 8-bit attention, kmeans, permute_rows"


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
                     attention_kernel="triton", kmeans_kernel="triton")
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
        out, layout = svg2_attention(q, k, v, cfg, state, num_text_tokens=t, text_mask=tm)
        sorted_q = torch.gather(layout.q_labels, 2, layout.q_perm)
        perm_ok = bool((sorted_q.diff(dim=-1) >= 0).all())
        mask = layout.to_dense()
        qd, kd, vd = q.double(), k.double(), v.double()
        s = (qd @ kd.transpose(-1, -2)) / d**0.5
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vd
        same = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        err = (out.double() - ref).abs().max().item()
        err_torch = (same.double() - ref).abs().max().item()
        ok = ok and perm_ok and err <= 2 * err_torch + 1e-4 and layout.density() < 1
        details.append(f"{call}: err {err:.3g} vs torch {err_torch:.3g}, perm sorted {perm_ok}")
    return "svg2_end_to_end", ok, "; ".join(details)


def opcheck_case():
    from svg2_kernels.varblock_attention import _varblock_attention_op

    g = torch.Generator().manual_seed(1)
    qo = random_offsets(2, 30, 3, g).reshape(1, 2, 4)
    ko = random_offsets(2, 40, 5, g).reshape(1, 2, 6)
    bm = torch.rand(1, 2, 3, 5, generator=g) < 0.5
    q = torch.randn(1, 2, 32, 16, generator=g, dtype=torch.float16)
    k = torch.randn(1, 2, 44, 16, generator=g, dtype=torch.float16)
    args = (q, k, k.clone(), qo, ko, bm, 0.25)
    torch.library.opcheck(_varblock_attention_op, args, test_utils=("test_schema", "test_faketensor"))
    return "opcheck", True, "schema and fake tensor ok"


CASES = [
    ("attn_fp16_basic", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, (16, 16, 8, 4, 1)),
    ("attn_fp32_basic", torch.float32, 2, 2, 37, 45, 32, 5, 9, 0.5, (16, 16, 8, 4, 1)),
    ("attn_fp16_win2_pad", torch.float16, 1, 3, 50, 61, 32, 4, 17, 0.6, (16, 16, 2, 4, 1)),
    ("attn_fp32_bm32_d48", torch.float32, 2, 1, 70, 33, 48, 3, 6, 0.7, (32, 16, 4, 4, 1)),
    ("attn_fp16_dense_all", torch.float16, 1, 2, 40, 40, 16, 3, 4, 1.01, (16, 32, 4, 4, 1)),
    ("attn_fp16_sparse", torch.float16, 2, 2, 33, 65, 16, 6, 12, 0.15, (16, 16, 8, 4, 1)),
    ("attn_fp16_two_tier", torch.float16, 2, 2, 90, 70, 32, 4, 9, 0.5, (32, 16, 4, 4, 1, 16)),
    # (block_m, block_n, win, warps, stages, block_m_small, warps_small, tile_table)
    ("attn_fp16_tile_table", torch.float16, 2, 2, 90, 70, 32, 4, 9, 0.5, (32, 16, 4, 4, 1, 16, 4, True)),
    ("attn_fp32_tile_table_win2", torch.float32, 1, 3, 50, 61, 32, 4, 17, 0.6, (16, 16, 2, 4, 1, 0, 4, True)),
    # v4 key layout: tiles of contiguous chunks (..., key_layout, chunk)
    ("attn_fp16_chunks8", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, (16, 16, 8, 4, 1, 0, 4, False, "chunks", 8)),
    ("attn_fp32_chunks4_two_tier", torch.float32, 2, 2, 90, 70, 32, 4, 9, 0.5,
     (32, 16, 4, 4, 1, 16, 4, False, "chunks", 4)),
    ("attn_fp16_chunks_box", torch.float16, 1, 3, 50, 61, 32, 4, 17, 0.6, (16, 16, 2, 4, 1, 0, 4, False, "chunks", 16)),
    ("attn_fp16_chunks_sparse", torch.float16, 2, 2, 33, 65, 16, 6, 12, 0.15,
     (16, 32, 8, 4, 1, 0, 4, False, "chunks", 8)),
    ("attn_fp16_chunks_dense_all", torch.float16, 1, 2, 40, 40, 16, 3, 4, 1.01,
     (16, 32, 4, 4, 1, 0, 4, False, "chunks", 16)),
    # v5 key layout: tiles are whole boxes of one run, tensor-descriptor loads (..., key_layout)
    ("attn_fp16_tma", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, (16, 16, 8, 4, 1, 0, 4, False, "tma")),
    ("attn_fp32_tma_two_tier", torch.float32, 2, 2, 90, 70, 32, 4, 9, 0.5, (32, 16, 4, 4, 1, 16, 4, False, "tma")),
    ("attn_fp16_tma_sparse", torch.float16, 2, 2, 33, 65, 16, 6, 12, 0.15, (16, 32, 8, 4, 1, 0, 4, False, "tma")),
    ("attn_fp16_tma_dense_all", torch.float16, 1, 2, 40, 40, 16, 3, 4, 1.01, (16, 32, 4, 4, 1, 0, 4, False, "tma")),
    ("attn_fp32_tma_d48", torch.float32, 2, 1, 70, 33, 48, 3, 6, 0.7, (32, 16, 4, 4, 1, 0, 4, False, "tma")),
    # longest-first work order inside each head (..., chunk, lpt)
    ("attn_fp16_tma_lpt_two_tier", torch.float16, 2, 3, 90, 70, 32, 4, 9, 0.5,
     (32, 16, 4, 4, 1, 16, 4, False, "tma", 16, True)),
]
CASES_8BIT = [
    ("attn8_int8_basic", "int8", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, None, 3.0),
    ("attn8_fp8_basic", "fp8", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, None, 3.0),
    ("attn8_int8_two_tier_fp32", "int8", torch.float32, 2, 2, 90, 70, 32, 4, 9, 0.5,
     (32, 16, 4, 4, 1, 16, 4, False, "tma")),
    ("attn8_fp8_sparse", "fp8", torch.float16, 2, 2, 33, 65, 16, 6, 12, 0.15, (16, 32, 8, 4, 1, 0, 4, False, "tma")),
    ("attn8_int8_d48_token_order", "int8", torch.float16, 2, 1, 70, 33, 48, 3, 6, 0.7, None, 0.0, 0, True),
    ("attn8_fp8_dense_all_token_order", "fp8", torch.float16, 1, 2, 40, 40, 16, 3, 4, 1.01, None, 1.0, 0, True),
    ("attn8_int8_v_transposed", "int8", torch.float16, 2, 2, 37, 45, 32, 5, 9, 0.5, None, 3.0, 1, True, True),
]

KM_CASES = [
    ("kmeans_fp32_iters0", torch.float32, 2, 37, 32, 5, 0),
    ("kmeans_fp32_iters3", torch.float32, 3, 75, 32, 7, 3),
    ("kmeans_fp16_iters2", torch.float16, 2, 50, 16, 9, 2),
    # KMeansTiles(block_m, block_c, warps, stages, sort_block, update_split[, update_rows, rank_by_sort])
    ("kmeans_fp16_sort_block", torch.float16, 2, 75, 16, 9, 2, (32, 16, 4, 1, 16, 0)),
    ("kmeans_fp16_rank_by_sort", torch.float16, 2, 75, 16, 9, 2, (64, 16, 4, 1, 16, 0, 0, True)),
    ("kmeans_fp16_rank_by_sort_one_point", torch.float16, 2, 1, 16, 2, 2, (32, 16, 4, 1, 16, 0, 0, True)),
    ("kmeans_fp32_centroid_tiles", torch.float32, 3, 75, 32, 37, 2, (16, 16, 4, 1, 0, 0)),
    ("kmeans_fp32_split_sort_x", torch.float32, 2, 90, 32, 4, 2, (16, 16, 4, 1, 0, 4), True),
    ("kmeans_fp16_sort_x_iters0", torch.float16, 2, 37, 16, 5, 0, None, True),
    ("kmeans_fp16_sort_block_split", torch.float16, 2, 90, 16, 9, 2, (64, 16, 4, 1, 16, 2, 8), True),
]


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    _import_svg2_kernels()
    results = {}
    jobs = [lambda c=c: attention_case(*c) for c in CASES]
    jobs += [lambda c=c: attention_8bit_case(*c) for c in CASES_8BIT]
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
