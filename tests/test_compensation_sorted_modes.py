"""triton_sorted's bias sources and walks (``svg2_kernels.compensation_sorted``): ``bias="skip"`` (each tile's bias
built in the kernel from the caller's ``skipped`` bytes and ln(n_j) / scale, no (Cq, CK_PAD) fp32 table) and
``walk="all"`` / ``"bits"`` (no host walk list: every centroid tile, or the list's tiles from an in-kernel bitmask).

Rule: every mode returns the numbers of the default (``bias="table", walk="list"``, the path the H200 measured) bit
for bit, and that path
is within twice the error of the same-precision torch path against the float64 formula (FlashAttention's rule),
on layouts with padding (Ck not a multiple of 128 nor of BLOCK_N, Sq not a multiple of BLOCK_M), empty key
clusters, a one-token cluster, a query cluster that skips nothing and one that skips everything. Interpreter cases
run in one subprocess (``python -m tests.test_compensation_sorted_modes``), fp16 and fp32 only (the interpreter
of Triton 3.8 computes ``tl.dot`` on bf16 wrongly); the host-side tests run in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import interp_results_of, interp_worker
from tests.test_compensation_kernel import (
    _lse_err,
    _max_err,
    make_case,
    reference_lse,
    sparse_result,
    summary_of,
    tile_kinds,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = (("table", "all"), ("table", "bits"), ("skip", "list"), ("skip", "all"), ("skip", "bits"))
MODES_ALL = (("table", "list"), *MODES)


def _run(q, summ, skipped, layout, scale, merge_with, perm, tiles, use_tma, bias, walk):
    from svg2_kernels.compensation import CompensationTiles
    from svg2_kernels.compensation_sorted import compensation_attention_sorted

    return compensation_attention_sorted(q, summ.centroids, summ.value_means, summ.sizes, skipped, layout.q_labels,
                                         scale, *merge_with, q_perm=perm, tiles=CompensationTiles(*tiles, 4, 1),
                                         use_tma=use_tma, bias=bias, walk=walk)


# -------------------------------------------------------------------------------- interpreter cases (worker)


def modes_case(name, dtype, use_tma, *, d=32, sv=170, cq=12, ck=45, seed=7, order="sorted", merge=True,
               tiles=(16, 16), strided_skip=False):
    """Every (bias, walk) mode against the path before (bit for bit) and the float64 formula (FA rule); rows that
    skip nothing keep the sparse result bit for bit, rows that skip everything (no sparse key) are finite.
    Centroid-only (``merge=False``): against the torch backend, rows that skip nothing out 0 / lse -inf, a stale
    (finite, garbage) centroid of an empty cluster weighs nothing."""
    from svg2.compensation import KeySummary, centroid_attention
    from tests.helpers import compensated_reference

    q, k, v, layout = make_case(h=2, sv=sv, d=d, cq=cq, ck=ck, dtype=dtype, seed=seed)
    perm = layout.q_perm
    if order == "shuffled":
        g = torch.Generator().manual_seed(seed)
        perm = torch.stack([torch.stack([torch.randperm(sv, generator=g) for _ in range(2)])])
    kinds = tile_kinds(layout.q_labels, perm, tiles[0])
    skipped = ~layout.block_map
    if strided_skip:  # stored key-cluster-major: the kernel reads the bytes through their strides
        skipped = skipped.transpose(-1, -2).contiguous().transpose(-1, -2)
    scale = d**-0.5
    out_s, lse_s = sparse_result(q, k, v, layout, scale)
    summ = summary_of(k, v, layout)
    if not merge:
        stale = KeySummary(summ.centroids.clone(), summ.value_means.clone(), summ.sizes)
        stale.centroids[..., ck - 2, :] = 1e3  # an empty cluster with a garbage centroid and mean
        stale.value_means[..., ck - 2, :] = -1e3
        summ = stale
    merge_with = (out_s, lse_s) if merge else (None, None)
    run = lambda bias, walk: _run(q, summ, skipped, layout, scale, merge_with, perm, tiles, use_tma, bias, walk)  # noqa: E731
    out0, lse0 = run("table", "list")
    results = {f"{b} {w}": run(b, w) for b, w in MODES}
    same = {m: torch.equal(o, out0) and torch.equal(lo, lse0) for m, (o, lo) in results.items()}
    nothing = torch.gather(layout.block_map.all(-1), 2, layout.q_labels)  # the row's cluster skips nothing
    everything = torch.gather(~layout.block_map.any(-1), 2, layout.q_labels)  # ... computes nothing
    if merge:
        ref = compensated_reference(q, k, v, layout, scale)
        low = compensated_reference(q, k, v, layout, scale, dtype=dtype)  # the same-precision torch path
        lref, llow = reference_lse(q, k, layout, scale), reference_lse(q, k, layout, scale, dtype=dtype)
        floor = 1e-5 if dtype == torch.float32 else 1e-3
        errs = {m: (_max_err(o, ref), _lse_err(lo, lref)) for m, (o, lo) in results.items()}
        base, lbase = _max_err(low, ref), _lse_err(llow, lref)
        rule = all(e <= 2 * base + floor and le <= 2 * lbase + floor for e, le in errs.values())
        kept = all(torch.equal(o[nothing], out_s[nothing]) and torch.equal(lo[nothing], lse_s[nothing])
                   for o, lo in results.values())
        fin = all(bool(torch.isfinite(o[everything]).all() and torch.isfinite(lo[everything]).all())
                  for o, lo in results.values())
        err, lerr = errs["skip list"]
        detail = f"err {err:.3g} vs same-precision torch path {base:.3g}, lse {lerr:.3g} vs {lbase:.3g}"
        ok = rule and kept and fin
    else:
        out_t, lse_t, _ = centroid_attention(q.float(), summary_of(k, v, layout), skipped, layout.q_labels, scale,
                                             backend="torch")
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        err, lerr = _max_err(out0, out_t), _lse_err(lse0, lse_t)
        empty_rows = all(bool(torch.isneginf(lo[nothing]).all() and (o[nothing] == 0).all())
                         for o, lo in results.values())
        detail = f"err vs torch backend {err:.3g}, lse {lerr:.3g} (tol {tol})"
        ok = err <= tol and lerr <= tol and empty_rows
    ok = (ok and all(same.values()) and bool(nothing.any()) and bool(everything.any())
          and out0.dtype == dtype and (order == "sorted" or kinds[2] > 0))
    return name, ok, f"bit-equal to table list {same}; tiles with 1/2/3+ clusters {kinds}; {detail}"


def _dead_tile_layout(dtype):
    """Query clusters of 24-40 rows (16-row tiles in cluster order hold one or two), 48 key clusters in three
    16-wide tiles: tile 1 is computed by every query cluster, tile 2 holds only empty clusters, so neither holds
    a term for any query tile."""
    from svg2 import ClusterLayout

    g = torch.Generator().manual_seed(21)
    b, h, sv, d, cq, ck = 1, 2, 160, 16, 5, 48
    sizes = torch.tensor([40, 24, 40, 24, 32])
    lq = torch.repeat_interleave(torch.arange(cq), sizes)
    lq = torch.stack([lq[torch.randperm(sv, generator=g)] for _ in range(h)])[None]
    lk = torch.randint(0, 32, (b, h, sv), generator=g)  # clusters 32..47 empty
    bm = torch.rand(b, h, cq, ck, generator=g) < 0.3
    bm[..., 16:32] = True
    layout = ClusterLayout.from_labels(lq, lk, bm)
    q, k, v = (torch.randn(b, h, sv, d, generator=g).to(dtype) for _ in range(3))
    return q, k, v, layout


def dead_tiles_not_walked_case(dtype=torch.float32):
    """The list and the in-kernel bitmask skip the centroid tiles without a term; walking every tile visits them.
    Shown by poisoning those tiles' centroids and means with NaN: list / bits stay finite and equal (bit for bit)
    to the clean call, ``walk="all"`` turns NaN."""
    from svg2.compensation import KeySummary

    q, k, v, layout = _dead_tile_layout(dtype)
    kinds = tile_kinds(layout.q_labels, layout.q_perm, 16)
    scale = 0.25
    out_s, lse_s = sparse_result(q, k, v, layout, scale)
    clean = summary_of(k, v, layout)
    poisoned = KeySummary(clean.centroids.clone(), clean.value_means.clone(), clean.sizes)
    poisoned.centroids[..., 16:, :] = float("nan")
    poisoned.value_means[..., 16:, :] = float("nan")
    skipped = ~layout.block_map

    def run(summ, bias, walk):
        return _run(q, summ, skipped, layout, scale, (out_s, lse_s), layout.q_perm, (16, 16), False, bias, walk)

    want, lwant = run(clean, "skip", "all")
    got = {f"{b} {w}": run(poisoned, b, w) for b, w in (("table", "list"), ("table", "bits"), ("skip", "list"),
                                                           ("skip", "bits"), ("skip", "all"))}
    pruned = {m: torch.equal(o, want) and torch.equal(lo, lwant) for m, (o, lo) in got.items() if m != "skip all"}
    walked_all = bool(torch.isnan(got["skip all"][0]).any())
    ok = kinds[2] == 0 and all(pruned.values()) and walked_all
    return "dead_tiles_not_walked", ok, (f"tiles with 1/2/3+ clusters {kinds}; poisoned, equal to clean {pruned}; "
                                         f"walk=all reads the poison: {walked_all}")


def bits_fallback_case():
    """More centroid tiles than the bitmask holds: the launch walks every tile (the same numbers)."""
    import svg2_kernels.compensation_sorted as cs

    q, k, v, layout = make_case(h=2, sv=100, d=16, cq=6, ck=40, dtype=torch.float32, seed=5)
    out_s, lse_s = sparse_result(q, k, v, layout, 0.25)
    summ = summary_of(k, v, layout)
    args = (q, summ, ~layout.block_map, layout, 0.25, (out_s, lse_s), layout.q_perm, (16, 16), False)
    want = _run(*args, "table", "list")
    saved = cs._BITS_MAX_TILES
    try:
        cs._BITS_MAX_TILES = 1  # 3 tiles of 16 > 1
        got = _run(*args, "skip", "bits")
    finally:
        cs._BITS_MAX_TILES = saved
    ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    return "bits_fallback", ok, f"bit-equal {ok}"


def public_default_case():
    """compensate(backend="triton_sorted") runs ``DEFAULT_MODE`` (the fp32 table walked over every centroid tile,
    the fastest on the H200), and follows a change of it (what the bench's per-mode call rows do): the same numbers
    bit for bit."""
    import svg2_kernels.compensation_sorted as cs
    from svg2.compensation import compensate

    q, k, v, layout = make_case(h=2, sv=150, d=32, cq=8, ck=30, dtype=torch.float16, seed=9)
    out_s, lse_s = sparse_result(q, k, v, layout, 0.2)
    summ = summary_of(k, v, layout)
    skipped = ~layout.block_map
    args = (out_s, lse_s, q, summ, skipped, layout.q_labels, 0.2)
    want, lwant = cs.compensation_attention_sorted(q, summ.centroids, summ.value_means, summ.sizes, skipped,
                                                   layout.q_labels, 0.2, out_s, lse_s, q_perm=layout.q_perm,
                                                   bias="table", walk="list")
    calls, ops = {}, {}
    saved = cs.DEFAULT_MODE
    try:
        other = ("table", "list") if saved != ("table", "list") else ("skip", "all")
        for mode in (saved, other):
            cs.DEFAULT_MODE = mode
            seen = []
            real = cs.walk_tables  # the table list's builder: called only by the ("table", "list") mode
            cs.walk_tables = lambda *a, _r=real, _s=seen: (_s.append(1), _r(*a))[1]
            try:
                out, lse, used = compensate(*args, backend="triton_sorted", cluster_order=layout.q_perm)
            finally:
                cs.walk_tables = real
            calls[mode] = used == "triton_sorted" and torch.equal(out, want) and torch.equal(lse, lwant)
            ops[mode] = len(seen)
    finally:
        cs.DEFAULT_MODE = saved
    expected_builds = {mode: int(mode == ("table", "list")) for mode in calls}
    ok = saved == ("table", "all") and all(calls.values()) and ops == expected_builds
    return "public_default", ok, f"default {saved}; bit-equal {calls}; table-list builds {ops}"


def bench_step_rows_case():
    """experiments/bench_compensation.py's step rows for triton_sorted (what the H200 run times): each mode's row,
    its agreement with the path before (0), its host-op count, and the host-table rows with the walk fractions."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_compensation import comp_step_rows

    q, k, v, layout = make_case(h=2, sv=150, d=32, cq=8, ck=30, dtype=torch.float32, seed=10)
    scale = 32**-0.5
    out_s, lse_s = sparse_result(q, k, v, layout, scale)
    rows: dict = {}
    outs = comp_step_rows(q, k, v, layout, out_s, lse_s, lambda fn: (fn(), 1.0)[1], ["torch", "triton_sorted"], rows)
    import svg2_kernels.compensation_sorted as cs

    default = " ".join(cs.DEFAULT_MODE)
    others = [f"{b} {w}" for b, w in MODES_ALL if (b, w) != cs.DEFAULT_MODE]
    modes = [f"comp (triton_sorted, {m})" for m in others]
    have = all(m in rows and rows[m]["ms"] == 1.0 for m in ["comp (triton_sorted)", *modes])
    agree = all(rows[m]["max_abs_diff_vs_default"] == 0.0 for m in modes)
    close = all(rows[m]["max_abs_diff_vs_torch"] < 1e-5 for m in ["comp (triton_sorted)", *modes])
    # Host ops per mode by name (the default row under its mode's name): fewer without the list, fewest with
    # the bias built in the kernel.
    ops = {default: rows["comp (triton_sorted)"]["aten_ops"],
           **{m: rows[f"comp (triton_sorted, {m})"]["aten_ops"] for m in others}}
    fewer = (ops["skip all"] == ops["skip bits"] < ops["table all"] == ops["table bits"] < ops["skip list"]
             < ops["table list"])
    work = rows.get("comp tables (triton_sorted, table list)", {})
    fractions = (0 < work.get("pairs_live", 0) <= work.get("cols_union", 0) <= work.get("tiles_walked", 0) <= 1
                 and abs(work.get("walked_fraction", -1) - work.get("tiles_walked", 0)) < 1e-3)
    tables = all(f"comp tables (triton_sorted, {m})" in rows for m in ("table all", "skip list", "skip all"))
    ok = have and agree and close and fewer and fractions and tables and set(outs) >= {"torch", "triton_sorted"}
    return "bench_step_rows", ok, f"ops {ops}; work {work}; agree {agree}, close {close}"


_F16, _F32 = torch.float16, torch.float32
INTERP_CASES = {
    "fp16_tma_sorted": lambda: modes_case("fp16_tma_sorted", _F16, True),
    "fp32_ptr_sorted": lambda: modes_case("fp32_ptr_sorted", _F32, False),
    "fp32_ptr_shuffled": lambda: modes_case("fp32_ptr_shuffled", _F32, False, order="shuffled", seed=9),
    "fp16_tma_shuffled": lambda: modes_case("fp16_tma_shuffled", _F16, True, order="shuffled", seed=8),
    "fp16_d48_tma": lambda: modes_case("fp16_d48_tma", _F16, True, d=48, ck=23, sv=133, cq=6, seed=2),
    "fp32_ck32_unmasked": lambda: modes_case("fp32_ck32_unmasked", _F32, True, ck=32, sv=96, cq=6, seed=3),
    "fp16_tiles32": lambda: modes_case("fp16_tiles32", _F16, True, tiles=(32, 32), seed=4),
    # BLOCK_N above BLOCK_M (the 128 x 128 candidate of the H200 tile sweep, scaled down)
    "fp16_tiles16x32": lambda: modes_case("fp16_tiles16x32", _F16, True, tiles=(16, 32), ck=70, seed=5),
    "fp32_ck36_words4": lambda: modes_case("fp32_ck36_words4", _F32, True, ck=36, sv=130, cq=7, seed=12),
    "fp16_ck30_words2_ptr": lambda: modes_case("fp16_ck30_words2_ptr", _F16, False, ck=30, sv=110, cq=6, seed=13),
    "fp32_ck200_ptr": lambda: modes_case("fp32_ck200_ptr", _F32, False, d=16, ck=200, sv=150, cq=9, seed=6),
    "fp16_strided_skip": lambda: modes_case("fp16_strided_skip", _F16, False, strided_skip=True, seed=11),
    "fp16_centroid_only_tma": lambda: modes_case("fp16_centroid_only_tma", _F16, True, merge=False, d=16, ck=40,
                                                 sv=120, cq=5, seed=1),
    "fp32_centroid_only_ptr": lambda: modes_case("fp32_centroid_only_ptr", _F32, False, merge=False, d=16, ck=40,
                                                 sv=120, cq=5, seed=1),
    "dead_tiles_not_walked": dead_tiles_not_walked_case,
    "bits_fallback": bits_fallback_case,
    "public_default": public_default_case,
    "bench_step_rows": bench_step_rows_case,
}


@pytest.fixture(scope="module")
def interp_results():
    return interp_results_of("tests.test_compensation_sorted_modes")


@pytest.mark.parametrize("case", list(INTERP_CASES))
def test_interpreter(interp_results, case):
    res = interp_results[case]
    assert res["ok"], res["detail"]


# ------------------------------------------------------------------------------------------ host-side tests


def test_skip_tables_are_the_bias_table_values():
    """ln(n_j) / scale of skip_tables is the bias table's value bit for bit wherever the table is finite; the
    centroid tables are the casts, unpadded in Ck, the head dim padded with zeros only when not a power of two."""
    from svg2_kernels.compensation_sorted import skip_tables, sorted_tables

    g = torch.Generator().manual_seed(0)
    for d, scale in ((24, 0.125), (32, 24**-0.5)):
        cent, vm = torch.randn(1, 2, 5, d, generator=g), torch.randn(1, 2, 5, d, generator=g)
        sizes = torch.tensor([3, 0, 1, 2, 75600]).expand(1, 2, 5)
        skipped = torch.rand(1, 2, 3, 5, generator=g) < 0.5
        skipped[..., 1] = True  # skipped but empty
        _, _, bias = sorted_tables(cent, vm, sizes, skipped, scale, torch.float16)
        kc, vmp, lnb = skip_tables(cent, vm, sizes, scale, torch.float16)
        assert lnb.shape == (1, 2, 128) and lnb.dtype == torch.float32 and lnb.is_contiguous()
        assert torch.isneginf(lnb[..., 5:]).all()  # padding weighs nothing
        built = torch.where(skipped, lnb[:, :, None, :5], float("-inf"))
        assert torch.equal(built, bias[..., :5])
        bd = 32
        assert kc.shape == vmp.shape == (1, 2, 5, bd) and kc.dtype == torch.float16 and kc.is_contiguous()
        assert torch.equal(kc[..., :d], cent.to(torch.float16)) and not kc[..., d:].any()
        assert torch.equal(vmp[..., :d], vm.to(torch.float16))
    same = torch.randn(1, 1, 3, 32, dtype=torch.float16)
    assert skip_tables(same, same, torch.ones(1, 1, 3, dtype=torch.long), 1.0, torch.float16)[0] is same  # no copy


@pytest.mark.parametrize("block_m,block_n,shuffle", [(16, 16, False), (32, 16, True), (16, 32, False)])
def test_walk_tables_skip_are_the_bias_table_lists(block_m, block_n, shuffle):
    """The list built from ``skipped`` and the sizes holds the same tiles, in the same order and number, as the
    one built from the bias table (over cdiv(Ck, block_n) tiles instead of CK_PAD / block_n); tile_liveness is
    the brute-force "skips a non-empty key cluster in the tile"."""
    from svg2_kernels.compensation_sorted import sorted_tables, tile_liveness, walk_tables, walk_tables_skip

    q, k, v, layout = make_case(h=2, sv=150, cq=9, ck=40, seed=11)
    skipped, sizes = ~layout.block_map, layout.k_sizes
    perm = layout.q_perm
    if shuffle:
        g = torch.Generator().manual_seed(0)
        perm = torch.stack([torch.stack([torch.randperm(150, generator=g) for _ in range(2)])])
    summ = summary_of(k, v, layout)
    _, _, bias = sorted_tables(summ.centroids, summ.value_means, sizes, skipped, 0.3, torch.float16)
    labs, lst, count = walk_tables(layout.q_labels, perm, bias, block_m, block_n)
    labs_s, lst_s, count_s = walk_tables_skip(layout.q_labels, perm, skipped, sizes, block_m, block_n)
    nt = -(-40 // block_n)
    assert lst_s.shape == (lst.shape[0], nt) and torch.equal(count, count_s)
    assert torch.equal(labs_s.reshape(labs.shape), labs.long())
    for i in range(lst.shape[0]):
        assert lst[i, :count[i]].tolist() == lst_s[i, :count_s[i]].tolist()
        assert sorted(lst_s[i].tolist()) == list(range(nt))
    live = tile_liveness(skipped, sizes, block_n)
    want = torch.zeros(2, 9, nt, dtype=torch.bool)
    for n in range(2):
        for c in range(9):
            for j in range(40):
                if skipped[0, n, c, j] and sizes[0, n, j] > 0:
                    want[n, c, j // block_n] = True
    assert torch.equal(live, want)


def test_skip_words_view_the_callers_bytes():
    """The kernel reads ``skipped`` in place as the widest integers up to 4 bytes that tile its rows, else as bytes
    (odd Ck, strided columns); the view is of the same storage (no copy)."""
    from svg2_kernels.compensation_sorted import _row_align, _skip_words

    for ck, width in ((1000, 4), (500, 4), (30, 2), (45, 1)):
        sk = torch.rand(1, 3, 7, ck) < 0.5
        view, got = _skip_words(sk)
        assert got == width and view.data_ptr() == sk.data_ptr() and view.element_size() == width
        assert view.shape[-1] == ck // width and view.stride(2) * width == ck
        assert torch.equal(view.view(torch.bool), sk)
    strided = (torch.rand(1, 2, 8, 5, 16) < 0.5)[..., 0, :]  # rows of 16 bytes, columns contiguous: words
    assert _skip_words(strided)[1] == 4
    transposed = (torch.rand(1, 2, 40, 7) < 0.5).transpose(-1, -2)  # columns 7 bytes apart: bytes
    view, width = _skip_words(transposed)
    assert width == 1 and view.dtype == torch.uint8 and view.stride() == transposed.stride()
    assert [_row_align(st) for st in (1000, 125, 500, 1024, 45, 0)] == [8, 1, 4, 16, 1, 16]


def test_sorted_modes_are_validated():
    from svg2_kernels.compensation_sorted import compensation_attention_sorted

    q, k, v, layout = make_case(sv=40, d=16, ck=6, cq=4)
    summ = summary_of(k, v, layout)
    args = (q, summ.centroids, summ.value_means, summ.sizes, ~layout.block_map, layout.q_labels, 0.25)
    with pytest.raises(ValueError, match="bias must be one of"):
        compensation_attention_sorted(*args, bias="fp16")
    with pytest.raises(ValueError, match="walk one of"):
        compensation_attention_sorted(*args, walk="some")
    bad = (*args[:4], (~layout.block_map).to(torch.uint8), *args[5:])
    with pytest.raises(TypeError, match="skipped must be a bool tensor"):
        compensation_attention_sorted(*bad)


if __name__ == "__main__":
    interp_worker(INTERP_CASES)
