"""GPU cost of compensating skipped clusters, of SVG-EAR and of layout reuse, at Wan 2.1 14B 720p (issue 17).

    python experiments/bench_compensation.py --out bench_compensation.json          # H100/H200, ~5 minutes
    python experiments/bench_compensation.py --configs 300x1000 --no-ear --comp-backends triton,triton_sorted \
        --out bench_compensation.json                                               # issue 17's rows, ~2-3 min
    python experiments/bench_compensation.py --tiny --out /tmp/b.json               # CPU smoke (tests)
    python experiments/bench_compensation.py --count-ops --configs 300x1000 --out /tmp/ops.json  # no GPU needed

Per (Cq, Ck) configuration, in one process and on the same clustered synthetic Q/K/V (``analysis.synthetic``:
spatial, temporal and semantic heads, B=1, H=40, S=21x45x80=75600, D=128, bf16), at target density 0.25:

* ``dense``: cuDNN SDPA (the fastest dense kernel; the backend that ran is recorded);
* ``svg2``: the public call ``svg2_attention`` on a warm state (2 k-means iterations), compensate off;
* ``svg2+lse``: the same call returning the kernel's LSE (what compensation needs from the kernel);
* ``svg2+comp``: the same call with ``compensate=True`` (the kernel's LSE; the compensation backend "auto"
  picks is recorded), and ``svg2+comp (<backend>)`` with each Triton kernel named
  (``svg2_attention(..., compensation_backend=...)``); ``overhead`` is the call's time over ``svg2``'s;
* ``comp (triton)`` / ``comp (triton (cluster order))`` / ``comp (triton_sorted)`` / ``comp (flex)`` /
  ``comp (torch)``: the compensation step alone (key-cluster summaries from the permuted K/V, centroid
  attention, LSE merge) given the sparse output and LSE; ``triton`` is the fused kernel (merge in its
  epilogue, autotuned: the chosen tiles are recorded), walking query tiles in token order, or in cluster order
  through ``q_perm``; ``triton_sorted`` walks cluster-order tiles with one or two skip rows each and only the
  centroid tiles they need (autotuned loads / warps / stages, recorded), its host tables included;
  ``comp (triton_sorted, <loads> <warps>w <stages>s)`` are its fixed launch configurations;
  ``comp (triton_sorted, <bias> <walk>)`` its other modes, autotuned (the default, ``comp (triton_sorted)``, is
  ``DEFAULT_MODE``; ``table``: the fp32 bias table; ``list``: the host walk list; ``all``: no walk list, every
  centroid tile;
  ``bits``: the list's tiles from an in-kernel bitmask; ``skip``: the bias built in the kernel from the skip
  bytes), each with ``max_abs_diff_vs_default`` (0: the same numbers) and, like the default, its host work
  (``aten_ops``: aten ops that run device work plus the kernel, ``host_mb`` written by them, on CUDA
  ``cuda_ops`` from the profiler); ``svg2+comp (triton_sorted, <bias> <walk>)`` the public call with that mode;
  ``comp tables (triton_sorted, <mode>)`` the host-side tables alone, the ``table list`` row with the fraction of
  centroid tiles walked and what compacted walks would do (:func:`walk_work`). Target (issue 17): at most 5% of
  the ``svg2`` call at (300, 1000); ``svg2+comp`` - ``svg2`` is the whole price, the LSE output included;
* ``comp summaries``: the key-cluster summaries alone (the value means; the centroids come from k-means);
* ``svg2 layout reuse``: a call that reuses its layout (``layout_every`` > 1: no k-means, no selection, no kernel
  metadata);
* ``svg_ear``: the SVG-EAR method's sparse call (clustering, probe, routing, sparse attention, compensation),
  and ``ear probe+routing`` alone (the probe ``auto`` runs: the fused Triton probe on CUDA, torch ops
  elsewhere), on CUDA both also with ``(probe torch)``; ``ear probe (torch)`` / ``ear probe (triton)``: the probe alone.

Times: medians of ``triton.testing.do_bench`` (a call slower than 1 s: median of 3 timed calls instead); on the
CPU (``--tiny``) medians of ``time.perf_counter``. Prints a Markdown table (ms, ratio to dense, compensation
overhead in % of the sparse call) and writes everything to ``--out`` as JSON. Imports only library code.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import svg2_kernels.compensation_sorted as comp_sorted
from analysis.synthetic import synthetic_qkv
from svg2 import ClusterState, SVG2Config, svg2_attention
from svg2.compensation import compensate, segment_means, summarize_key_clusters
from svg2.methods import AttentionContext, MethodState, build_method
from svg2_kernels.compensation import CompensationTiles, last_tuned_config
from svg2_kernels.compensation_sorted import (
    compensation_attention_sorted,
    default_sorted_tiles,
    last_sorted_config,
    skip_tables,
    sorted_tables,
    walk_tables,
    walk_tables_skip,
)

WAN14B = dict(heads=40, video=(21, 45, 80), head_dim=128, dtype="bfloat16")  # 720p, 81 frames: S = 75600
TINY = dict(heads=3, video=(2, 4, 6), head_dim=32, dtype="float32")
KINDS = ("spatial", "temporal", "semantic")


def make_qkv(shape: dict, device: torch.device, seed: int = 0):
    """Clustered synthetic Q/K/V (1, H, S, D), built one head at a time on the CPU (memory) and moved over."""
    dtype = getattr(torch, shape["dtype"])
    heads = []
    for h in range(shape["heads"]):
        q, k, v = synthetic_qkv(shape["video"], (KINDS[h % len(KINDS)],), head_dim=shape["head_dim"], seed=seed + h)
        heads.append(tuple(x.to(device=device, dtype=dtype) for x in (q, k, v)))
    return tuple(torch.cat([hd[i] for hd in heads], dim=1).contiguous() for i in range(3))


def timer(device: torch.device, warmup: int, rep: int):
    """A function returning the median time in ms of ``fn()``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def cuda_ms(fn) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > 1.0:  # slow path (e.g. the torch LSE fallback): a few plain timings
                times = []
                for _ in range(3):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                return statistics.median(times)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

        return cuda_ms

    def cpu_ms(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def dense_fn(q, k, v):
    """cuDNN SDPA when the device has it, else torch's default SDPA choice. Returns (fn, backend name)."""
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v)

            def run():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)

            return run, "cudnn"
        except RuntimeError:
            pass
    return (lambda: F.scaled_dot_product_attention(q, k, v)), "sdpa-default"


class _Rows(dict):
    """The rows of one configuration; each is also printed to stderr as it is measured (a run cut short by a
    time limit still shows what it measured)."""

    def __setitem__(self, name: str, row: dict) -> None:
        super().__setitem__(name, row)
        ms = row.get("ms")
        print(f"  {name}: {'-' if ms is None else f'{ms:.3f} ms'}", file=sys.stderr, flush=True)

    def update(self, other: dict) -> None:  # type: ignore[override]
        for name, row in other.items():
            self[name] = row


# Fixed launches of triton_sorted timed beside its autotuned one (which of them the tuner picks is recorded).
# triton_sorted's fixed launches beside the autotuned default: (descriptor loads, BLOCK_M, BLOCK_N, warps, stages).
# 128 x 64 is the default tile; 128 x 128 halves the loop's trips at Ck = 1000 (16 -> 8), where the prologue
# (Q, labels, skip rows) and the merge epilogue weigh against a short loop: the candidates for the 5% target.
SORTED_FIXED = ((True, 128, 64, 8, 2), (True, 128, 64, 4, 2), (False, 128, 64, 8, 2), (False, 128, 64, 8, 3),
                (True, 128, 128, 8, 2), (True, 128, 128, 8, 3), (True, 64, 128, 4, 2))
# triton_sorted's (bias, walk) modes (svg2_kernels.compensation_sorted): the fp32 bias table or the bias built in
# the kernel from the skip bytes; the host walk list, every tile, or the in-kernel bitmask. The same numbers bit
# for bit. The bench times DEFAULT_MODE as ``comp (triton_sorted)`` and each other mode, autotuned, beside it.
ALL_SORTED_MODES = (("table", "list"), ("table", "all"), ("table", "bits"), ("skip", "list"), ("skip", "all"),
                    ("skip", "bits"))


def other_sorted_modes() -> tuple[tuple[str, str], ...]:
    """The modes besides ``DEFAULT_MODE`` (read at call time: the default row already times that one)."""
    return tuple(mode for mode in ALL_SORTED_MODES if mode != comp_sorted.DEFAULT_MODE)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches that run device work: every op except views and bare allocations
    (``empty*``); a Triton kernel wrapped as a custom op (``svg2_kernels::...``) counts as one, a bare Triton
    launch is not seen. ``bytes``: what those ops write, the custom ops' outputs excluded (the tables a kernel
    reads, not its result); ``largest``: the largest such tensor (bytes) and the op that wrote it."""

    _NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
                "alias"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.bytes = 0
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in self._NO_WORK or func.namespace == "prim":  # prim: metadata (prim.device)
            return out
        self.ops.append(str(func.overloadpacket))
        if not str(func.namespace).startswith("svg2"):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    nbytes = t.numel() * t.element_size()
                    self.bytes += nbytes
                    if nbytes > self.largest[0]:
                        self.largest = (nbytes, name)
        return out

    def summary(self) -> dict:
        return {"aten_ops": len(self.ops), "host_mb": round(self.bytes / 2**20, 2),
                "largest_host_mb": round(self.largest[0] / 2**20, 2), "largest_op": self.largest[1]}


def op_counts(fn) -> dict:
    """:class:`OpCounter`'s figures for one call of ``fn``; on CUDA also ``cuda_ops``: the device operations
    (kernels, memsets, copies) ``torch.profiler`` records for a second call (bare Triton launches included)."""
    with OpCounter() as counter:
        fn()
    res = counter.summary()
    if torch.cuda.is_available():
        try:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            res["cuda_ops"] = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        except Exception as e:  # noqa: BLE001 - the counts are a side figure; keep the row
            res["cuda_ops"] = f"{type(e).__name__}"
    return res


def sorted_host_work(q, summary, skipped, q_labels, q_perm, scale, out, lse, modes, tiles) -> dict:
    """Host-side work of triton_sorted per (bias, walk) mode, counted with fake tensors (nothing runs: any shape,
    no GPU): :class:`OpCounter`'s figures for ``compensation_attention_sorted`` given the key summary."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    res = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for bias, walk in modes:
            with OpCounter() as counter:
                compensation_attention_sorted(q, summary.centroids, summary.value_means, summary.sizes, skipped,
                                              q_labels, scale, out, lse, q_perm=q_perm, tiles=tiles, use_tma=True,
                                              bias=bias, walk=walk)
            res[f"{bias} {walk}"] = {**counter.summary(), "ops": counter.ops}
    return res


def fake_wan_inputs(shape: dict, cq: int, ck: int):
    """Fake (no storage) inputs of the compensation step at ``shape`` with (cq, ck) clusters, for
    :func:`sorted_host_work`: q, a KeySummary, skipped, q_labels, q_perm, the sparse out and LSE."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from svg2.compensation import KeySummary

    b, h, d = 1, shape["heads"], shape["head_dim"]
    s = math.prod(shape["video"])
    dtype = getattr(torch, shape["dtype"])
    with FakeTensorMode():
        q = torch.empty(b, h, s, d, dtype=dtype)
        sizes = torch.empty(b, h, ck, dtype=torch.long)
        summary = KeySummary(torch.empty(b, h, ck, d), torch.empty(b, h, ck, d), sizes)
        skipped = torch.empty(b, h, cq, ck, dtype=torch.bool)
        q_labels = torch.empty(b, h, s, dtype=torch.long)
        q_perm = torch.empty(b, h, s, dtype=torch.long)
        out = torch.empty(b, h, s, d, dtype=dtype)
        lse = torch.empty(b, h, s)
    return q, summary, skipped, q_labels, q_perm, out, lse


def walk_work(layout, block_m: int, block_n: int) -> dict:
    """How much centroid-tile work each walk does on ``layout``, as fractions of walking every tile (the MMAs
    of ``walk="all"``: cdiv(Ck, block_n) tiles per query tile), query tiles of ``block_m`` rows in ``q_perm``
    order:

    * ``tiles_walked``: the host list / the in-kernel bitmask (tiles where a query cluster of the tile's label
      range skips a non-empty key cluster);
    * ``cols_union``: a walk compacted per query tile (the union of its clusters' skipped non-empty key clusters,
      gathered into dense tiles: rounded up to block_n per query tile);
    * ``cols_cluster_aligned``: query tiles cut at cluster boundaries (rows padded to block_m per cluster) and each
      walking its one cluster's skipped non-empty key clusters, compacted (rounded up to block_n);
    * ``pairs_live``: the (row, key cluster) pairs that are terms at all: the floor of any exact walk."""
    b, h, s = layout.q_labels.shape
    cq, ck = layout.num_q_clusters, layout.num_k_clusters
    n, nm, nt = b * h, -(-s // block_m), -(-ck // block_n)
    live = (~layout.block_map & (layout.k_sizes > 0)[:, :, None, :]).reshape(n, cq, ck)
    lab = torch.gather(layout.q_labels, 2, layout.q_perm).reshape(n, s)
    lab = torch.cat([lab, lab[:, -1:].expand(n, nm * block_m - s)], 1).view(n, nm, block_m)
    c0, c1 = lab.amin(-1), lab.amax(-1)
    pref = F.pad(torch.cumsum(live.to(torch.int32), 1), (0, 0, 1, 0))  # (n, cq + 1, ck)
    union = (torch.gather(pref, 1, (c1 + 1)[..., None].expand(n, nm, ck))
             - torch.gather(pref, 1, c0[..., None].expand(n, nm, ck))) > 0  # (n, nm, ck)
    tiles = F.pad(union, (0, nt * block_n - ck)).view(n, nm, nt, block_n).any(-1)
    per_cluster = live.sum(-1)  # (n, cq)
    q_sizes = layout.q_sizes.reshape(n, cq)
    full = n * nm * nt  # query tiles x centroid tiles of walking everything
    aligned = (-(-q_sizes // block_m) * (-(-per_cluster // block_n))).sum()
    pairs = torch.gather(per_cluster, 1, layout.q_labels.reshape(n, s)).sum()
    return {"tiles_walked": round(float(tiles.sum()) / full, 4),
            "cols_union": round(float((-(-union.sum(-1) // block_n)).sum()) / full, 4),
            "cols_cluster_aligned": round(float(aligned) / full, 4),
            "pairs_live": round(float(pairs) / (n * s * nt * block_n), 4)}


def bench_config(q, k, v, cq: int, ck: int, density: float, ms, comp_backends: list[str],
                 call_backends: list[str], ear: bool = True) -> dict:
    """Every row of one (Cq, Ck) configuration: {row name: {"ms": ..., details}}."""
    cfg = SVG2Config(num_q_centroids=cq, num_k_centroids=ck, target_density=density, dense_steps_frac=0.0,
                     dense_layers=0)
    rows: dict[str, dict] = _Rows()
    dense, dense_backend = dense_fn(q, k, v)
    rows["dense"] = {"ms": ms(dense), "kernel": dense_backend}

    # -- the sparse call, warm (the first call of a state is the cold start with 50 k-means iterations) --
    st = ClusterState()
    _, layout = svg2_attention(q, k, v, cfg, st, check_finite=False)
    rows["svg2"] = {"ms": ms(lambda: svg2_attention(q, k, v, cfg, st, check_finite=False)),
                    "density": layout.density(), "kernel": st.last_kernels.get("attention"),
                    "kmeans_kernel": st.last_kernels.get("kmeans")}
    rows["svg2+lse"] = {"ms": ms(lambda: svg2_attention(q, k, v, cfg, st, check_finite=False, return_lse=True))}
    cfg_c = cfg.replace(compensate=True)
    for backend in ["auto", *call_backends]:
        name = "svg2+comp" if backend == "auto" else f"svg2+comp ({backend})"
        st_c = ClusterState()

        def call(st_c=st_c, backend=backend):
            return svg2_attention(q, k, v, cfg_c, st_c, check_finite=False, compensation_backend=backend)

        try:
            call()
            rows[name] = {"ms": ms(call), "lse": st_c.last_kernels.get("lse"),
                          "compensation": st_c.last_kernels.get("compensation")}
        except Exception as e:  # noqa: BLE001 - report why a backend could not run, keep the other rows
            rows[name] = {"ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
    if "triton_sorted" in call_backends:  # the public call with each other mode as triton_sorted's default
        for mode in other_sorted_modes():
            name, st_c, saved = f"svg2+comp (triton_sorted, {' '.join(mode)})", ClusterState(), comp_sorted.DEFAULT_MODE

            def call(st_c=st_c):
                return svg2_attention(q, k, v, cfg_c, st_c, check_finite=False, compensation_backend="triton_sorted")

            try:
                comp_sorted.DEFAULT_MODE = mode
                call()
                rows[name] = {"ms": ms(call), "compensation": st_c.last_kernels.get("compensation")}
            except Exception as e:  # noqa: BLE001 - report why a mode could not run, keep the other rows
                rows[name] = {"ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                comp_sorted.DEFAULT_MODE = saved
    st_r = ClusterState()
    cfg_r = cfg.replace(layout_every=1_000_000)
    svg2_attention(q, k, v, cfg_r, st_r, check_finite=False)  # builds the layout (and plan); later calls reuse it
    rows["svg2 layout reuse"] = {"ms": ms(lambda: svg2_attention(q, k, v, cfg_r, st_r, check_finite=False))}

    # -- the compensation step alone, given the sparse output and its LSE on one layout --
    out_s, lse, _ = svg2_attention(q, k, v, cfg, layout=layout, check_finite=False, return_lse=True)
    outs = comp_step_rows(q, k, v, layout, out_s, lse, ms, comp_backends, rows)
    # Correctness of the timed steps: against the compensated public call.
    call, _ = svg2_attention(q, k, v, cfg_c, layout=layout, check_finite=False)
    for name, out_c in outs.items():
        rows[f"comp ({name})"]["max_abs_diff_vs_call"] = float((out_c.float() - call.float()).abs().max())

    if ear:  # -- SVG-EAR (a warm sparse call of the method at the same density), with each probe --
        probes = ["auto"] + (["torch"] if q.device.type == "cuda" else [])  # auto: triton on CUDA, torch elsewhere
        for probe in probes:
            sfx = "" if probe == "auto" else f" (probe {probe})"
            method = build_method("svg_ear", cfg=cfg_c, probe=probe)
            state = MethodState()
            ctx = AttentionContext(layer_index=1, step_index=5, num_steps=10, state=state, check_finite=False)
            method(q, k, v, ctx)  # the cold start
            site = state.cluster_state(*ctx.site())
            rows[f"svg_ear{sfx}"] = {"ms": ms(lambda m=method, c=ctx: m(q, k, v, c)),
                                     "density": state.resolved_records()[-1]["density"],
                                     "compensation": state.resolved_records()[-1].get("compensation"),
                                     "probe": site.last_kernels.get("probe")}
            rows[f"ear probe+routing{sfx}"] = {"ms": ms(lambda m=method, c=ctx, st=site: m.route(q, k, v, c, st)),
                                               "note": "incl. k-means"}
        rows.update(ear_probe_rows(q, k, v, layout, ms))
    return rows


def comp_step_rows(q, k, v, layout, out_s, lse, ms, comp_backends: list[str], rows: dict) -> dict:
    """Adds to ``rows`` the rows of the compensation step alone on one layout, given the sparse output ``out_s``
    and its ``lse``: ``comp summaries``, ``comp (<backend>)`` per backend (triton_sorted: also its modes, fixed
    launches on CUDA and host tables), each step's agreement with the torch backend and the modes' with the path
    before. Returns {step name: its output}."""
    gather = lambda x, perm: torch.gather(x, 2, perm[..., None].expand(*perm.shape, x.shape[-1]))  # noqa: E731
    ks, vs = gather(k, layout.k_perm), gather(v, layout.k_perm)
    scale = 1.0 / math.sqrt(q.shape[-1])
    skipped = ~layout.block_map
    # A fresh layout's centroids come from k-means' last update (free); take this layout's exact ones.
    centroids = segment_means(ks, layout.k_sizes)
    rows["comp summaries"] = {"ms": ms(lambda: summarize_key_clusters(ks, vs, layout.k_sizes, centroids))}
    steps = {}
    for backend in comp_backends:
        name, q_perm = backend, None
        if backend == "triton (cluster order)":
            backend, q_perm = "triton", layout.q_perm
        if backend == "triton_sorted":
            q_perm = layout.q_perm  # what svg2_attention passes it (cluster_order)

        def step(backend=backend, q_perm=q_perm):
            summary = summarize_key_clusters(ks, vs, layout.k_sizes, centroids)
            return compensate(out_s, lse, q, summary, skipped, layout.q_labels, scale, backend=backend,
                              q_perm=q_perm)

        steps[name] = (step, backend)
        if backend == "triton_sorted":

            def sorted_step(**launch):  # the public call with one launch choice named (mode, or fixed tiles)
                def run():
                    summary = summarize_key_clusters(ks, vs, layout.k_sizes, centroids)
                    out, lse_c = compensation_attention_sorted(q, summary.centroids, summary.value_means,
                                                               summary.sizes, skipped, layout.q_labels, scale,
                                                               out_s, lse, q_perm=layout.q_perm, **launch)
                    return out, lse_c, "triton_sorted"

                return run

            for bias, walk in other_sorted_modes():  # autotuned like the default row; the same numbers bit for bit
                steps[f"triton_sorted, {bias} {walk}"] = (sorted_step(bias=bias, walk=walk), "triton_sorted")
            if q.device.type == "cuda":
                for tma, bm, bn, warps, stages in SORTED_FIXED:
                    tiles = CompensationTiles(bm, bn, warps, stages)
                    size = "" if (bm, bn) == (128, 64) else f"{bm}x{bn} "
                    steps[f"triton_sorted, {size}{'tma' if tma else 'ptr'} {warps}w {stages}s"] = (
                        sorted_step(tiles=tiles, use_tma=tma), None)
    outs = {}
    for name, (step, backend) in steps.items():
        try:
            out_c, _, used = step()
            outs[name] = out_c
            rows[f"comp ({name})"] = {"ms": ms(step), "compensation": used}
            if backend == "triton":
                rows[f"comp ({name})"]["tiles"] = last_tuned_config(q.shape[-1])
            if backend == "triton_sorted":
                rows[f"comp ({name})"]["tiles"] = last_sorted_config(q)
                # Host work of the step given the key summary (the summaries: their own row).
                summ = summarize_key_clusters(ks, vs, layout.k_sizes, centroids)
                bias, walk = name.split(", ")[1].split() if ", " in name else comp_sorted.DEFAULT_MODE
                rows[f"comp ({name})"].update(op_counts(lambda b=bias, w=walk, sm=summ: compensation_attention_sorted(
                    q, sm.centroids, sm.value_means, sm.sizes, skipped, layout.q_labels, scale, out_s, lse,
                    q_perm=layout.q_perm, bias=b, walk=w)))
        except Exception as e:  # noqa: BLE001 - report why a backend could not run, keep the other rows
            rows[f"comp ({name})"] = {"ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
    if "triton_sorted" in outs:
        tiles = default_sorted_tiles(q.shape[-1], q.device.type)
        vmeans = segment_means(vs, layout.k_sizes)

        def tables_list():  # the fp32 bias table and the list built from it
            _, _, bias = sorted_tables(centroids, vmeans, layout.k_sizes, skipped, scale, q.dtype)
            return walk_tables(layout.q_labels, layout.q_perm, bias, tiles.block_m, tiles.block_n)

        def tables_nolist():  # walk="all" / "bits" with the table: the tables and the labels in walk order
            sorted_tables(centroids, vmeans, layout.k_sizes, skipped, scale, q.dtype)
            return torch.gather(layout.q_labels, 2, layout.q_perm)

        def tables_skip_list():  # skip bytes read in place, the list built from them
            skip_tables(centroids, vmeans, layout.k_sizes, scale, q.dtype)
            return walk_tables_skip(layout.q_labels, layout.q_perm, skipped, layout.k_sizes, tiles.block_m,
                                    tiles.block_n)

        def tables_skip_nolist():  # skip bytes, no list: the centroid tables, ln(n)/scale and the labels
            skip_tables(centroids, vmeans, layout.k_sizes, scale, q.dtype)
            return torch.gather(layout.q_labels, 2, layout.q_perm)

        _, _, count = tables_list()
        work = walk_work(layout, tiles.block_m, tiles.block_n)
        walked = float(count.float().mean()) / -(-layout.num_k_clusters // tiles.block_n)
        rows["comp tables (triton_sorted, table list)"] = {"ms": ms(tables_list), "walked_fraction": round(walked, 4),
                                                           **work}
        rows["comp tables (triton_sorted, table all)"] = {"ms": ms(tables_nolist)}
        rows["comp tables (triton_sorted, skip list)"] = {"ms": ms(tables_skip_list)}
        rows["comp tables (triton_sorted, skip all)"] = {"ms": ms(tables_skip_nolist)}
    # Agreement of the timed steps: with the torch backend, and every triton_sorted mode with its default.
    for name, out_c in outs.items():
        if name != "torch" and "torch" in outs:
            rows[f"comp ({name})"]["max_abs_diff_vs_torch"] = float((out_c.float() - outs["torch"].float()).abs().max())
        default = outs.get("triton_sorted")  # the default mode: every other mode should match it bit for bit
        if name.startswith("triton_sorted, ") and default is not None:
            rows[f"comp ({name})"]["max_abs_diff_vs_default"] = float((out_c.float() - default.float()).abs().max())
    return outs


_EAR_FLOOR = math.log(1e-8)  # svg2.methods.svg_ear's floor of log E


def ear_log_error_f64(qc, ks, vs, kc, vm, sizes, scale: float, heads: int, rows: int = 8) -> torch.Tensor:
    """``log E_ij = log Σ_{y in K_j} ||e^{a_y} v_y - e^{c_ij} v̄_j||²`` of the first ``heads`` heads in float64,
    from the definition (the difference vectors themselves, no expansion that could cancel), each pair relative
    to its largest exponent; floored like the probes. (heads, Cq, Ck) float64."""
    n, cq, d = qc.shape
    ck = sizes.shape[-1]
    offsets = F.pad(torch.cumsum(sizes.long(), -1), (1, 0))
    out = torch.empty(heads, cq, ck, dtype=torch.float64, device=qc.device)
    for i in range(heads):
        total = int(offsets[i, -1])
        seg = torch.repeat_interleave(torch.arange(ck, device=qc.device), sizes[i].long())  # (total,)
        kf, vf = ks[i, :total].double(), vs[i, :total].double()
        cen = qc[i].double() @ kc[i].double().T * scale  # (Cq, Ck)
        for r0 in range(0, cq, rows):
            r1 = min(cq, r0 + rows)
            a = qc[i, r0:r1].double() @ kf.T * scale  # (r, total)
            m = torch.full((r1 - r0, ck), -math.inf, dtype=torch.float64, device=qc.device)
            m = m.scatter_reduce(1, seg.expand(r1 - r0, -1), a, "amax")
            m = torch.maximum(m, cen[r0:r1])
            my = m[:, seg]  # (r, total): the reference of each key's pair
            diff = (torch.exp(a - my)[..., None] * vf - torch.exp(cen[r0:r1] - m)[:, seg, None] * vm[i].double()[seg])
            e = torch.zeros(r1 - r0, ck, dtype=torch.float64, device=qc.device)
            e.scatter_add_(1, seg.expand(r1 - r0, -1), (diff * diff).sum(-1))
            out[i, r0:r1] = (2.0 * m + torch.log(e)).clamp_min(_EAR_FLOOR)
    return out


def ear_probe_rows(q, k, v, layout, ms) -> dict:
    """The error probe alone on one layout (its inputs as ``SVGEARMethod.route`` builds them), torch and fused,
    with each one's largest difference in log E from the float64 definition (first heads) and the exact fits it
    leaves above the floor."""
    from svg2.methods.svg_ear import ear_log_error
    from svg2_kernels.ear_probe import ear_log_error_triton

    b, h, s, d = q.shape
    n, cq, ck = b * h, layout.num_q_clusters, layout.num_k_clusters
    gather = lambda x, perm: torch.gather(x, 2, perm[..., None].expand(*perm.shape, d))  # noqa: E731
    ks, vs = gather(k, layout.k_perm).reshape(n, s, d), gather(v, layout.k_perm).reshape(n, s, d)
    qc = segment_means(gather(q, layout.q_perm), layout.q_sizes).reshape(n, cq, d)
    sizes = layout.k_sizes.reshape(n, ck)
    kc = segment_means(ks[:, None], sizes[:, None])[:, 0]
    vm = segment_means(vs[:, None], sizes[:, None])[:, 0]
    args = (qc, ks, vs, kc, vm, sizes, 1.0 / math.sqrt(d))
    # Accuracy against the definition in float64 on the first heads: pairs whose true error is above the floor
    # (largest |log E - log E_64|), and pairs of exact fits (one-key clusters: E = 0) left above the floor.
    want64 = ear_log_error_f64(*args, heads=min(2, n))
    live, exact = want64 > _EAR_FLOOR + 1e-3, want64 <= _EAR_FLOOR + 1e-3

    def accuracy(got: torch.Tensor) -> dict:
        got = got[: want64.shape[0]].double()
        return {"max_abs_diff_log_vs_f64": float((got - want64)[live].abs().max()) if live.any() else 0.0,
                "exact_fits_above_floor": int((got[exact] > _EAR_FLOOR + 1e-3).sum()),
                "exact_fits": int(exact.sum())}

    want = ear_log_error(*args)
    rows: dict[str, dict] = {"ear probe (torch)": {"ms": ms(lambda: ear_log_error(*args)), **accuracy(want)}}
    if q.device.type == "cuda":
        try:
            got = ear_log_error_triton(*args)
            both = want > _EAR_FLOOR + 1e-3  # torch's own exact fits carry its fp32 cancellation noise
            rows["ear probe (triton)"] = {"ms": ms(lambda: ear_log_error_triton(*args)), **accuracy(got),
                                          "max_abs_diff_log_vs_torch": float((got - want)[both].abs().max())}
        except Exception as e:  # noqa: BLE001 - report why the kernel could not run, keep the other rows
            rows["ear probe (triton)"] = {"ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
    return rows


def table(results: list[dict]) -> str:
    lines = ["| (Cq, Ck) | row | ms | ratio to dense | % of the svg2 call | overhead | notes |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        rows = res["rows"]
        dense, sparse = rows["dense"]["ms"], rows["svg2"]["ms"]
        for name, row in rows.items():
            t = row.get("ms")
            notes = ", ".join(f"{k}={v}" for k, v in row.items() if k != "ms" and v is not None)
            if t is None:
                lines.append(f"| {res['config']} | {name} | - | - | - | - | {notes} |")
                continue
            pct = f"{100 * t / sparse:.1f}%" if name.startswith(("comp", "ear probe")) else ""
            over = f"+{100 * (t - sparse) / sparse:.1f}%" if name.startswith("svg2+comp") else ""
            lines.append(f"| {res['config']} | {name} | {t:.2f} | {t / dense:.3f} | {pct} | {over} | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU shape (smoke test)")
    ap.add_argument("--configs", default=None, help="(Cq, Ck) pairs, e.g. 300x1000,100x500")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--comp-backends", default=None,
                    help="compensation step rows, comma-separated (default: every backend the device runs; "
                         "'triton (cluster order)' is the triton kernel walking q_perm)")
    ap.add_argument("--no-ear", action="store_true", help="skip the SVG-EAR rows")
    ap.add_argument("--count-ops", action="store_true",
                    help="only count triton_sorted's host ops per (bias, walk) mode at the shape, with fake tensors "
                         "(no GPU, nothing runs), and write them to --out")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = TINY if args.tiny else WAN14B
    configs = args.configs or ("4x8,3x6" if args.tiny else "300x1000,100x500")
    pairs = [tuple(int(x) for x in c.split("x")) for c in configs.split(",")]
    if args.count_ops:
        return count_ops_main(args, shape, pairs)
    if args.comp_backends:
        comp_backends = [b.strip() for b in args.comp_backends.split(",") if b.strip()]
    elif device.type == "cpu":
        comp_backends = ["torch"]
    else:
        comp_backends = ["triton", "triton (cluster order)", "triton_sorted", "flex", "torch"]
    # The public call with each Triton kernel named (auto's choice is the plain "svg2+comp" row).
    call_backends = [b for b in ("triton", "triton_sorted") if b in comp_backends]
    ms = timer(device, args.warmup, args.rep)
    q, k, v = make_qkv(shape, device)
    results = []
    with torch.no_grad():
        for cq, ck in pairs:
            print(f"({cq}, {ck}):", file=sys.stderr, flush=True)
            rows = dict(bench_config(q, k, v, cq, ck, args.density, ms, comp_backends, call_backends,
                                     ear=not args.no_ear))
            results.append({"config": f"({cq}, {ck})", "cq": cq, "ck": ck, "rows": rows})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = {
        "shape": {"batch": 1, "heads": shape["heads"], "video": list(shape["video"]),
                  "seqlen": math.prod(shape["video"]), "head_dim": shape["head_dim"], "dtype": shape["dtype"]},
        "density": args.density,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "results": results,
    }
    md = table(results)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "markdown": md}, indent=2, default=str))
    return report


def count_ops_main(args, shape: dict, pairs: list[tuple[int, int]]) -> dict:
    """``--count-ops``: host ops of every triton_sorted mode at ``shape`` with the GPU's tiles (fake tensors)."""
    tiles = CompensationTiles(128, 64, 8, 2) if shape["head_dim"] <= 128 else CompensationTiles(64, 32, 4, 2)
    modes = ALL_SORTED_MODES
    results = []
    lines = ["| (Cq, Ck) | bias walk | ops (aten + the kernel) | MB written | largest (MB, op) |",
             "|---|---|---|---|---|"]
    for cq, ck in pairs:
        q, summary, skipped, q_labels, q_perm, out, lse = fake_wan_inputs(shape, cq, ck)
        work = sorted_host_work(q, summary, skipped, q_labels, q_perm, 1.0 / math.sqrt(shape["head_dim"]), out,
                                lse, modes, tiles)
        results.append({"config": f"({cq}, {ck})", "cq": cq, "ck": ck, "modes": work})
        for mode, w in work.items():
            lines.append(f"| ({cq}, {ck}) | {mode} | {w['aten_ops']} | {w['host_mb']} | "
                         f"{w['largest_host_mb']}, {w['largest_op']} |")
    md = "\n".join(lines)
    print(md)
    report = {"shape": shape, "tiles": [tiles.block_m, tiles.block_n], "torch": torch.__version__,
              "results": results, "markdown": md}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


def _version(pkg: str) -> str | None:
    try:
        return __import__(pkg).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
