"""Benchmark of the SVG2 kernels on an H100/H200 (DESIGN.md §4, §7; issue 3).

    python experiments/bench_kernels.py                          # defaults of conf/bench_kernels.yaml
    python experiments/bench_kernels.py shapes=[wan1.3b] densities=[0.25] tune=false out_dir=/tmp/b

Overrides use Hydra's syntax (``key=value``); Hydra's compose API parses them when installed, otherwise a
small fallback parser does (the GPU machine has no Hydra). Every row is measured in one process: cuDNN SDPA
dense, our Triton kernel, FlexAttention on the same token mask, and the breakdown of one whole SVG2 call
(k-means 2 warm iterations on Q and K, selection, permutation, metadata, attention, inverse permutation).
Layouts come from our k-means on structured synthetic Q/K (Gaussian mixtures with unequal masses over a
spatio-temporal grid, plus a positional component), selection in target-density mode.
Efficiency = density x t_dense / t_kernel. Writes ``<out_dir>/bench_kernels<tag>.{md,json,log}``.
"""

# ruff: noqa: B023  (closures passed to bench() run at once, inside the loop iteration that made them)
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from svg2.selection import centroid_scores, select_target_density

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # frames x latent height x width after 2x2 patching (81 frames -> 21 latent frames)
    "wan1.3b": dict(heads=12, frames=21, height=30, width=52),  # 480p: S = 32760
    "wan14b": dict(heads=40, frames=21, height=45, width=80),  # 720p: S = 75600
    "hunyuan": dict(heads=24, frames=33, height=45, width=80),  # 720p 129f: S = 118800 (text not added)
    "tiny": dict(heads=2, frames=2, height=8, width=12),  # CPU smoke (interpreter)
}
DEFAULT_CONFIGS = [  # block_m, block_n, win, warps, stages, block_m_small, warps_small, tile_table, layout, chunk
    (128, 128, 16, 8, 3, 64, 4, False, "tma", 16),  # v5 default on sm_90
    (128, 128, 16, 8, 2, 64, 4, False, "tma", 16), (128, 64, 16, 4, 3, 64, 4, False, "tma", 16),
    (128, 128, 16, 8, 3, 0, 4, False, "tma", 16), (64, 128, 16, 4, 3, 0, 4, False, "tma", 16),
    (128, 128, 16, 8, 2, 64, 4, True),  # v3
    (128, 128, 16, 8, 3, 64, 4, False, "chunks", 16),  # v4 as first measured (run r4a)
    (128, 128, 16, 8, 3, 0, 4, False, "chunks", 16), (128, 64, 16, 4, 3, 64, 4, False, "chunks", 16),
    (64, 128, 16, 4, 3, 0, 4, False, "chunks", 16), (64, 64, 16, 4, 3, 0, 4, False, "chunks", 16),
    (64, 64, 16, 4, 4, 0, 4, False, "chunks", 16), (64, 128, 16, 4, 2, 0, 4, False, "chunks", 16),
]


# ---------------------------------------------------------------------------------------------- config


def load_config(argv: list[str]) -> dict:
    conf_dir = ROOT / "conf"
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return OmegaConf.to_container(compose(config_name="bench_kernels", overrides=argv), resolve=True)
    except ImportError:
        import yaml

        cfg = yaml.safe_load((conf_dir / "bench_kernels.yaml").read_text())
        for arg in argv:
            key, _, val = arg.partition("=")
            if key.lstrip("+") not in cfg and not key.startswith("+"):
                raise KeyError(f"unknown override {key!r}; known: {sorted(cfg)}") from None
            cfg[key.lstrip("+")] = yaml.safe_load(val)
        return cfg


# ---------------------------------------------------------------------------------------------- timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, budget_ms: float, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU), after one warm-up call."""
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    one = (time.perf_counter() - t0) * 1e3
    reps = int(min(max_reps, max(min_reps, budget_ms / max(one, 1e-3))))
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -------------------------------------------------------------------------------------------- data


def synthetic_qkv(shape: dict, batch: int, d: int, dtype, dev, seed: int):
    """Structured Q/K: per head a mixture of Gaussians with unequal masses whose components occupy
    spatio-temporal blobs of the latent grid (so clusters are spatially coherent), plus a positional term."""
    g = torch.Generator(device=dev).manual_seed(seed)
    h, f, hh, ww = shape["heads"], shape["frames"], shape["height"], shape["width"]
    s = f * hh * ww
    t_, y_, x_ = torch.meshgrid(torch.arange(f, device=dev), torch.arange(hh, device=dev),
                                torch.arange(ww, device=dev), indexing="ij")
    pos = torch.stack([t_ / f, y_ / hh, x_ / ww], -1).reshape(s, 3).float()
    comps = 96
    n = batch * h
    q = torch.empty(n, s, d, device=dev, dtype=dtype)
    k = torch.empty_like(q)
    freqs = torch.randn(3, d // 2, device=dev, generator=g) * 3.0
    pe = torch.cat([torch.sin(pos @ freqs), torch.cos(pos @ freqs)], -1)  # (s, d)
    for i in range(n):
        cpos = torch.rand(comps, 3, device=dev, generator=g)
        logmass = torch.randn(comps, device=dev, generator=g) * 1.5  # unequal masses
        width = 0.05 + 0.2 * torch.rand(comps, device=dev, generator=g)
        logit = -((pos[:, None, :] - cpos[None]) ** 2).sum(-1) / (2 * width**2) + logmass
        logit = logit - torch.log(-torch.log(torch.rand(s, comps, device=dev, generator=g).clamp_min(1e-9)))
        comp = logit.argmax(-1)
        mu = torch.randn(comps, d, device=dev, generator=g)
        q[i] = (mu[comp] + 0.6 * torch.randn(s, d, device=dev, generator=g) + 0.5 * pe).to(dtype)
        k[i] = (mu[comp] + 0.6 * torch.randn(s, d, device=dev, generator=g) + 0.5 * pe).to(dtype)
    v = torch.randn(n, s, d, device=dev, dtype=dtype, generator=g)
    shp = (batch, h, s, d)
    return q.reshape(shp), k.reshape(shp), v.reshape(shp)


def gather_rows(x, perm):
    """x (N, S, D), perm (N, S) -> x[n, perm[n]] as one flat index_select."""
    n, s, d = x.shape
    flat = (perm + torch.arange(n, device=x.device)[:, None] * s).reshape(-1)
    return x.reshape(n * s, d).index_select(0, flat).reshape(n, s, d), flat


# ------------------------------------------------------------------------------------------ the call


class SVG2Call:
    """One warm-started SVG2 attention call on our kernels, with per-component CUDA events."""

    def __init__(self, cq_init, ck_init, density, min_kc_ratio, iters, cfg, fused=True, overlap=False,
                 tiles=None, sort_k=False, qk8=None):
        self.fused = fused
        # qk8: "int8" / "fp8" runs the 8-bit kernel (K/V quantized after the permutation); None: bf16
        self.qk8 = qk8 if fused else None
        # tiles: KMeansTiles of both k-means; sort_k: K's last centroid update also writes the permuted K
        self.tiles, self.sort_k = tiles, sort_k and fused
        # overlap: K's k-means on a second stream, concurrent with Q's (independent work)
        self.side = torch.cuda.Stream() if overlap and torch.cuda.is_available() else None
        self.cq_init, self.ck_init = cq_init, ck_init
        self.density, self.min_kc_ratio, self.iters, self.cfg = density, min_kc_ratio, iters, cfg
        self.skip_attention = False

    def __call__(self, q, k, v, marks=None):
        from svg2_kernels.kmeans import kmeans_triton
        from svg2_kernels.varblock_attention import build_varblock_metadata, varblock_attention_with_metadata

        b, h, s, d = q.shape
        n = b * h
        mark = (lambda name: marks.append((name, _event()))) if marks is not None else (lambda name: None)
        mark("start")
        if self.side is not None:
            main = torch.cuda.current_stream()
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                rk = kmeans_triton(k.reshape(n, s, d), self.ck_init, self.iters, self.tiles, self.sort_k)
            rq = kmeans_triton(q.reshape(n, s, d), self.cq_init, self.iters, self.tiles)
            main.wait_stream(self.side)
            if not torch.cuda.is_current_stream_capturing():  # (a graph keeps its own memory pool)
                made = (rk.labels, rk.centroids, rk.sizes, rk.offsets, rk.perm, rk.x_sorted)
                for t in (t for t in made if t is not None):
                    t.record_stream(main)  # made on the side stream, used (and freed) on the main one
        else:
            rq = kmeans_triton(q.reshape(n, s, d), self.cq_init, self.iters, self.tiles)
            rk = kmeans_triton(k.reshape(n, s, d), self.ck_init, self.iters, self.tiles, self.sort_k)
        mark("kmeans")
        scores = centroid_scores(rq.centroids, rk.centroids, rk.sizes)
        bm = select_target_density(scores, rq.sizes, rk.sizes, self.density, self.min_kc_ratio)
        mark("selection")
        if self.fused:  # K/V gathered by the Triton permute kernel; Q gather / O scatter inside attention
            from svg2_kernels.permute import permute_rows

            vs = permute_rows(v, rk.perm.view(b, h, s))
            ks = rk.x_sorted if self.sort_k else permute_rows(k, rk.perm.view(b, h, s))
        else:
            qs, qflat = gather_rows(q.reshape(n, s, d), rq.perm)
            ks, _ = gather_rows(k.reshape(n, s, d), rk.perm)
            vs, _ = gather_rows(v.reshape(n, s, d), rk.perm)
        mark("permutation")
        shp = (b, h)
        meta = build_varblock_metadata(rq.offsets.view(*shp, -1), rk.offsets.view(*shp, -1),
                                       bm.view(*shp, *bm.shape[1:]), s, s, self.cfg)
        mark("metadata")
        if self.skip_attention:  # the non-attention part alone (its CUDA-graph time)
            return meta
        if self.qk8 is not None:
            from svg2_kernels.varblock_fp8 import quantize_kv_fp8, varblock_attention_fp8_with_metadata

            kv8 = quantize_kv_fp8(ks.view(b, h, s, d), vs.view(b, h, s, d), self.qk8)
            mark("quantize")
            out = varblock_attention_fp8_with_metadata(q, kv8, meta, q_perm=rq.perm.view(b, h, s))
            mark("attention")
            return out
        if self.fused:
            out = varblock_attention_with_metadata(q, ks.view(b, h, s, d), vs.view(b, h, s, d), meta,
                                                   q_perm=rq.perm.view(b, h, s))
            mark("attention")
            return out
        o = varblock_attention_with_metadata(qs.view(b, h, s, d), ks.view(b, h, s, d), vs.view(b, h, s, d), meta)
        mark("attention")
        out = torch.empty_like(q).reshape(n * s, d).index_copy_(0, qflat, o.reshape(n * s, d))
        mark("inverse_permutation")
        return out.reshape(b, h, s, d)


def _event():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def graph_time(call, q, k, v, reps: int) -> float:
    """Median ms of the whole call replayed as one CUDA graph (no host sync on the sparse path)."""
    call(q, k, v)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(q, k, v)
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times[1:])


def tile_utilization(meta, useful_pairs: float) -> float:
    """Useful token pairs / token pairs computed by the kernel's tiles (query and key padding included)."""
    cfg = meta.config
    total = 0.0
    for work, num, bm in ((meta.work, meta.num_work, cfg.block_m), (meta.work_small, meta.num_work_small,
                                                                     cfg.block_m_small)):
        w = work[: int(num.item())].long()
        if w.numel():
            total += float(meta.num_tiles[w[:, 0], w[:, 1]].double().sum().item()) * bm * cfg.block_n
    return useful_pairs / max(total, 1.0)


def probe_dense_layout(q, k, v, t_dense, cfg, sname, budget, emit) -> None:
    """Every tune config on a fully dense layout (query clusters of 256 rows, one key cluster, all selected):
    what the kernel's inner loop reaches on whole tiles, against cuDNN on the same tensors."""
    from svg2_kernels.varblock_attention import (
        VarBlockConfig,
        build_varblock_metadata,
        varblock_attention_with_metadata,
    )

    b, h, s, _ = q.shape
    cq = -(-s // 256)
    q_off = torch.clamp(torch.arange(cq + 1, device=q.device) * 256, max=s).to(torch.int32).expand(b, h, -1)
    k_off = torch.tensor([0, s], device=q.device, dtype=torch.int32).expand(b, h, -1)
    bm = torch.ones(b, h, cq, 1, dtype=torch.bool, device=q.device)
    for c in (cfg["tune_configs"] or DEFAULT_CONFIGS):
        vc = VarBlockConfig(*c)
        info = []
        try:
            meta = build_varblock_metadata(q_off.contiguous(), k_off.contiguous(), bm, s, s, vc)
            out = varblock_attention_with_metadata(q, k, v, meta, compile_info=info)
            ref = F.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1]).float()
            err = (out[:, :1].float() - ref).abs().max()
            t = bench(lambda meta=meta: varblock_attention_with_metadata(q, k, v, meta), q.device, budget)
        except Exception as e:  # noqa: BLE001
            t, err = float("nan"), float("nan")
            print(f"dense probe {c} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        emit(dict(kind="dense_probe", shape=sname, cq=cq, ck=1, density=1.0, config=list(c), ms=t,
                  efficiency=t_dense / t, max_err_head0=float(err), compile=info))


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep`` (measured: the clock is not exposed)."""
    torch.cuda._sleep(1_000_000)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(20_000_000)
    b.record()
    b.synchronize()
    return 20_000_000 / a.elapsed_time(b)


def breakdown(call, q, k, v, reps: int, lead_cycles: int = 0) -> dict[str, float]:
    """Median CUDA-event ms per component of the call. lead_cycles > 0 queues a GPU sleep first, so the host
    issues the call while the GPU is busy, as inside a model's forward (the projections in front of the
    attention keep the GPU busy): then the events time the GPU work without waits for the host."""
    call(q, k, v)
    per = {}
    for _ in range(reps):
        marks = []
        if lead_cycles:
            torch.cuda._sleep(lead_cycles)
        call(q, k, v, marks)
        torch.cuda.synchronize()
        for (_, a), (name, b) in zip(marks[:-1], marks[1:]):
            per.setdefault(name, []).append(a.elapsed_time(b))
        per.setdefault("total", []).append(marks[0][1].elapsed_time(marks[-1][1]))
    return {k_: statistics.median(v_) for k_, v_ in per.items()}


# ---------------------------------------------------------------------------------------------- main


def dense_time(q, k, v, budget):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench(lambda: F.scaled_dot_product_attention(q, k, v), q.device, budget)


def measure_8bit(row, qk, qs, ks, vs, q_off, k_off, bm4, meta, out_bf16, t_dense, density, dev, budget):
    """The 8-bit kernel (QK^T in ``qk``, PV in e4m3) on the row's layout: quantization and kernel time,
    efficiency against bf16 cuDNN, and accuracy (relative L2 to the bf16 kernel on every head; max error against
    fp32 on head 0, next to that of the torch path with the same quantization)."""
    from svg2_kernels.reference import varblock_attention_fp8_reference, varblock_attention_reference
    from svg2_kernels.varblock_fp8 import quantize_kv_fp8, varblock_attention_fp8_with_metadata

    p = f"q8_{qk}_"
    try:
        if meta.config.key_layout != "tma":  # the 8-bit kernel reads the TMA tile table (CPU: its small tiles)
            from svg2_kernels.varblock_attention import build_varblock_metadata
            from svg2_kernels.varblock_fp8 import fp8_config

            s = qs.shape[2]
            meta = build_varblock_metadata(q_off, k_off, bm4, s, s, fp8_config(qs, s))
        kv = quantize_kv_fp8(ks, vs, qk)
        row[p + "quantize_ms"] = bench(lambda: quantize_kv_fp8(ks, vs, qk), dev, budget)
        o8 = varblock_attention_fp8_with_metadata(qs, kv, meta)
        row[p + "ms"] = bench(lambda: varblock_attention_fp8_with_metadata(qs, kv, meta), dev, budget)
        row[p + "speedup_vs_bf16_kernel"] = row["ours_ms"] / row[p + "ms"]
        row[p + "efficiency"] = density * t_dense / row[p + "ms"]
        row[p + "relerr_vs_bf16_kernel"] = ((o8.float() - out_bf16.float()).norm() / out_bf16.float().norm()).item()
        row[p + "finite"] = bool(torch.isfinite(o8).all().item())
        hh = slice(0, 1)
        args = (qs[:, hh], ks[:, hh], vs[:, hh], q_off[:, hh], k_off[:, hh], bm4[:, hh])
        ref = varblock_attention_reference(*args).float()
        emu = varblock_attention_fp8_reference(*args, qk=qk).float()
        row[p + "err"] = (o8[:, hh].float() - ref).abs().max().item()
        row[p + "err_torch_same_quant"] = (emu - ref).abs().max().item()
        row[p + "relerr_vs_fp32_head0"] = ((o8[:, hh].float() - ref).norm() / ref.norm()).item()
        row[p + "relerr_bf16_kernel_vs_fp32_head0"] = ((out_bf16[:, hh].float() - ref).norm() / ref.norm()).item()
    except Exception as e:  # noqa: BLE001
        row[p + "error"] = f"{type(e).__name__}: {e}"[:300]


def run(cfg: dict) -> list[dict]:
    from svg2_kernels.kmeans import kmeans_triton
    from svg2_kernels.reference import varblock_attention_reference
    from svg2_kernels.varblock_attention import (
        VarBlockConfig,
        build_varblock_metadata,
        default_config,
        varblock_attention_with_metadata,
    )

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cycles_per_ms = sleep_cycles_per_ms() if dev.type == "cuda" else 0.0
    dtype = getattr(torch, cfg["dtype"]) if dev.type == "cuda" else torch.float16
    d, bsz, budget = cfg["head_dim"], cfg["batch"], cfg["budget_ms"]
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = cfg["tag"]
    rows, tune_rows = [], []
    log = out_dir / f"bench_kernels{tag}.log"
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(env), flush=True)
    forced = VarBlockConfig(*cfg["config"]) if cfg.get("config") else None
    from svg2_kernels.kmeans import KMeansTiles

    ktiles = KMeansTiles(*cfg["kmeans_tiles"]) if cfg.get("kmeans_tiles") else None
    extra = dict(tiles=ktiles, sort_k=bool(cfg.get("kmeans_sort_k")))
    # QK^T formats of the opt-in 8-bit variants asked for ("triton_int8_fp8" -> "int8", "triton_fp8" -> "fp8")
    qk8_formats = [{"triton_int8_fp8": "int8", "triton_fp8": "fp8"}[v_] for v_ in cfg["variants"]
                   if v_ in ("triton_int8_fp8", "triton_fp8")]

    def emit(row: dict, table: list):
        table.append(row)
        print(json.dumps(row), flush=True)
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    flash = None
    if cfg["flash_kmeans"] and dev.type == "cuda":
        try:
            from flash_kmeans import batch_kmeans_Euclid as flash  # noqa: N813
        except Exception as e:  # noqa: BLE001
            print(f"flash-kmeans unavailable: {e}", flush=True)

    for si, sname in enumerate(cfg["shapes"]):
        shape = SHAPES[sname]
        q, k, v = synthetic_qkv(shape, bsz, d, dtype, dev, cfg["seed"] + si)
        b, h, s, _ = q.shape
        n = b * h
        kcfg = forced or default_config(dev.type, d, seqlen_k=s)  # the default depends on the sequence length
        t_dense = dense_time(q, k, v, budget) if dev.type == "cuda" else float("nan")
        print(f"[{sname}] S={s} H={h} dense cuDNN {t_dense:.2f} ms", flush=True)
        if cfg.get("probe_dense") and dev.type == "cuda":
            probe_dense_layout(q, k, v, t_dense, cfg, sname, budget, lambda r: emit(r, tune_rows))
        for cq, ck in cfg["clusters"]:
            g = torch.Generator(device="cpu").manual_seed(cfg["seed"])
            init_q = q.reshape(n, s, d)[:, torch.randperm(s, generator=g)[:cq].to(dev)].float()
            init_k = k.reshape(n, s, d)[:, torch.randperm(s, generator=g)[:ck].to(dev)].float()
            t0 = time.perf_counter()
            rq = kmeans_triton(q.reshape(n, s, d), init_q, cfg["kmeans_init_iters"])
            rk = kmeans_triton(k.reshape(n, s, d), init_k, cfg["kmeans_init_iters"])
            _sync(dev)
            t_cold = (time.perf_counter() - t0) * 1e3
            km = dict(shape=sname, cq=cq, ck=ck, cold_iters=cfg["kmeans_init_iters"], cold_ms=t_cold)
            if cfg.get("order_keys"):  # once per video (cold start), as svg2 does: key clusters along a chain
                from svg2_kernels.order import chain_order

                km["order_ms"] = bench(lambda: chain_order(rk.centroids), dev, budget)
                order = chain_order(rk.centroids)
                ordered = rk.centroids.gather(1, order[..., None].expand_as(rk.centroids))
                rk = kmeans_triton(k.reshape(n, s, d), ordered, 1)  # labels / perm in the new order
            it = cfg["kmeans_step_iters"]
            km["ours_q_ms"] = bench(lambda: kmeans_triton(q.reshape(n, s, d), rq.centroids, it, ktiles), dev, budget)
            km["ours_k_ms"] = bench(lambda: kmeans_triton(k.reshape(n, s, d), rk.centroids, it, ktiles), dev, budget)
            if flash is not None:
                for name, x, c in (("q", q, rq.centroids), ("k", k, rk.centroids)):
                    try:
                        xx, cc = x.reshape(n, s, d), c.to(dtype)
                        km[f"flash_{name}_ms"] = bench(
                            lambda xx=xx, cc=cc: flash(xx, cc.shape[1], max_iters=it, tol=-1.0, init_centroids=cc),
                            dev, budget)
                    except Exception as e:  # noqa: BLE001
                        km[f"flash_{name}_ms"] = float("nan")
                        km["flash_error"] = f"{type(e).__name__}: {e}"[:200]
            for blocks in cfg.get("kmeans_tune") or []:  # assignment tiles (BLOCK_M, BLOCK_C, warps, stages)
                kt = dict(kind="kmeans_tune", shape=sname, cq=cq, ck=ck, blocks=list(blocks))
                try:
                    kt["q_ms"] = bench(lambda b_=tuple(blocks): kmeans_triton(q.reshape(n, s, d), rq.centroids, it,
                                                                               blocks=b_), dev, budget)
                    kt["k_ms"] = bench(lambda b_=tuple(blocks): kmeans_triton(k.reshape(n, s, d), rk.centroids, it,
                                                                               blocks=b_), dev, budget)
                    same = kmeans_triton(k.reshape(n, s, d), rk.centroids, it, blocks=tuple(blocks))
                    ref = kmeans_triton(k.reshape(n, s, d), rk.centroids, it)
                    kt["label_agreement_vs_default"] = (same.labels == ref.labels).float().mean().item()
                except Exception as e:  # noqa: BLE001
                    kt["error"] = f"{type(e).__name__}: {e}"[:200]
                emit(kt, tune_rows)
            qsz = rq.sizes.float()
            km["q_cluster_size_p10_p50_p90"] = [round(x, 1) for x in qsz.quantile(
                torch.tensor([0.1, 0.5, 0.9], device=dev)).tolist()]
            km["k_cluster_size_p10_p50_p90"] = [round(x, 1) for x in rk.sizes.float().quantile(
                torch.tensor([0.1, 0.5, 0.9], device=dev)).tolist()]
            emit(dict(kind="kmeans", **km), rows)
            scores = centroid_scores(rq.centroids, rk.centroids, rk.sizes)
            qs = gather_rows(q.reshape(n, s, d), rq.perm)[0].view(b, h, s, d)
            ks = gather_rows(k.reshape(n, s, d), rk.perm)[0].view(b, h, s, d)
            vs = gather_rows(v.reshape(n, s, d), rk.perm)[0].view(b, h, s, d)
            q_off, k_off = rq.offsets.view(b, h, -1), rk.offsets.view(b, h, -1)
            for dens in cfg["densities"]:
                bm = select_target_density(scores, rq.sizes, rk.sizes, dens, cfg["min_kc_ratio"])
                pairs = (bm * rq.sizes[:, :, None] * rk.sizes[:, None, :]).sum((1, 2)).double()
                density = (pairs / float(s * s)).mean().item()
                bm4 = bm.view(b, h, cq, ck)

                # -- tile-config sweep (first shape's hardest layout, or every layout if asked) --
                tune_here = (cq, ck) == tuple(cfg["clusters"][-1]) or cfg.get("tune_layouts", "last") == "all"
                if cfg["tune"] and dev.type == "cuda" and tune_here and abs(dens - 0.25) < 1e-6:
                    best = None
                    for c in (cfg["tune_configs"] or DEFAULT_CONFIGS):
                        vc = VarBlockConfig(*c)
                        info, util = [], float("nan")
                        try:
                            meta = build_varblock_metadata(q_off, k_off, bm4, s, s, vc)
                            varblock_attention_with_metadata(qs, ks, vs, meta, compile_info=info)
                            util = tile_utilization(meta, float(pairs.sum().item()))
                            t = bench(lambda meta=meta: varblock_attention_with_metadata(qs, ks, vs, meta), dev,
                                      budget)
                        except Exception as e:  # noqa: BLE001
                            t = float("nan")
                            print(f"config {c} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        emit(dict(kind="tune", shape=sname, cq=cq, ck=ck, density=density, config=list(c),
                                  ms=t, efficiency=density * t_dense / t, tile_util=util, compile=info), tune_rows)
                        if t == t and (best is None or t < best[0]):
                            best = (t, vc)
                    if best is not None and not cfg.get("config"):
                        kcfg = best[1]
                        print(f"[{sname}] best config {kcfg}", flush=True)

                meta = build_varblock_metadata(q_off, k_off, bm4, s, s, kcfg)
                row = dict(kind="attention", shape=sname, heads=h, seqlen=s, cq=cq, ck=ck, target=dens,
                           density=density, dense_ms=t_dense, config=list(dataclasses.astuple(kcfg)))
                row["meta_ms"] = bench(lambda: build_varblock_metadata(q_off, k_off, bm4, s, s, kcfg), dev, budget)
                out = varblock_attention_with_metadata(qs, ks, vs, meta)
                row["ours_ms"] = bench(lambda: varblock_attention_with_metadata(qs, ks, vs, meta), dev, budget)
                row["speedup"] = t_dense / row["ours_ms"]
                row["tile_util"] = tile_utilization(meta, float(pairs.sum().item()))
                row["efficiency"] = density * t_dense / row["ours_ms"]
                if cfg["check"]:
                    hh = slice(0, 1)
                    ref = varblock_attention_reference(qs[:, hh], ks[:, hh], vs[:, hh], q_off[:, hh], k_off[:, hh],
                                                       bm4[:, hh])
                    low = varblock_attention_reference(qs[:, hh], ks[:, hh], vs[:, hh], q_off[:, hh], k_off[:, hh],
                                                       bm4[:, hh], compute_dtype=None)
                    row["err_ours"] = (out[:, hh].float() - ref.float()).abs().max().item()
                    row["err_torch_same_prec"] = (low.float() - ref.float()).abs().max().item()
                    row["finite"] = bool(torch.isfinite(out).all().item())
                for qk8 in qk8_formats:
                    measure_8bit(row, qk8, qs, ks, vs, q_off, k_off, bm4, meta, out, t_dense, density, dev, budget)
                if "flex" in cfg["variants"] and dev.type == "cuda":
                    try:
                        from svg2_kernels.flex import flex_block_mask, flex_varblock_attention

                        t0 = time.perf_counter()
                        mask = flex_block_mask(q_off, k_off, bm4, s, s)
                        _sync(dev)
                        row["flex_mask_ms"] = (time.perf_counter() - t0) * 1e3
                        fo = flex_varblock_attention(qs, ks, vs, q_off, k_off, bm4, block_mask=mask)
                        row["flex_ms"] = bench(
                            lambda mask=mask: flex_varblock_attention(qs, ks, vs, q_off, k_off, bm4, block_mask=mask),
                            dev, budget)
                        row["flex_efficiency"] = density * t_dense / row["flex_ms"]
                        row["relerr_ours_vs_flex"] = ((out.float() - fo.float()).norm() / fo.float().norm()).item()
                        del fo, mask
                    except Exception as e:  # noqa: BLE001
                        row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
                if dev.type == "cuda":
                    call = SVG2Call(rq.centroids, rk.centroids, dens, cfg["min_kc_ratio"], cfg["kmeans_step_iters"],
                                    kcfg, **extra)
                    reps = 3 if s * h > 2_000_000 else 5
                    try:
                        bd = breakdown(call, q, k, v, reps)
                        row.update({f"call_{k_}_ms": v_ for k_, v_ in bd.items()})
                        row["call_speedup"] = t_dense / bd["total"]
                        row["call_nonattn_frac"] = 1.0 - bd["attention"] / bd["total"]
                        # Host ahead: the same call issued while a 20 ms sleep keeps the GPU busy.
                        ahead = breakdown(call, q, k, v, reps, lead_cycles=int(20 * cycles_per_ms))
                        row.update({f"call_ahead_{k_}_ms": v_ for k_, v_ in ahead.items()})
                        row["call_ahead_speedup"] = t_dense / ahead["total"]
                        row["call_ahead_nonattn_frac"] = 1.0 - ahead["attention"] / ahead["total"]
                        row["call_graph_ms"] = graph_time(call, q, k, v, reps)
                        row["call_graph_speedup"] = t_dense / row["call_graph_ms"]
                        # Everything but the attention kernel, as its own graph (attention times vary by ~2 ms
                        # between runs, more than the whole difference between eager and graph).
                        call.skip_attention = True
                        row["call_graph_nonattn_ms"] = graph_time(call, q, k, v, reps)
                        call.skip_attention = False
                        row["call_graph_nonattn_frac"] = row["call_graph_nonattn_ms"] / row["call_graph_ms"]
                        for qk8 in qk8_formats:
                            c8 = SVG2Call(rq.centroids, rk.centroids, dens, cfg["min_kc_ratio"],
                                          cfg["kmeans_step_iters"], kcfg, qk8=qk8, **extra)
                            bd8 = breakdown(c8, q, k, v, reps)
                            row[f"call_{qk8}_total_ms"] = bd8["total"]
                            row[f"call_{qk8}_quantize_ms"] = bd8["quantize"]
                            row[f"call_{qk8}_attention_ms"] = bd8["attention"]
                            row[f"call_{qk8}_speedup"] = t_dense / bd8["total"]
                            row[f"call_{qk8}_graph_ms"] = graph_time(c8, q, k, v, reps)
                            row[f"call_{qk8}_graph_speedup"] = t_dense / row[f"call_{qk8}_graph_ms"]
                        if cfg.get("unfused", True):
                            unfused = SVG2Call(rq.centroids, rk.centroids, dens, cfg["min_kc_ratio"],
                                               cfg["kmeans_step_iters"], kcfg, fused=False, **extra)
                            bdu = breakdown(unfused, q, k, v, reps)
                            row["call_unfused_perm_ms"] = bdu["permutation"] + bdu["inverse_permutation"]
                            row["call_unfused_total_ms"] = bdu["total"]
                        if cfg.get("overlap", False):
                            over = SVG2Call(rq.centroids, rk.centroids, dens, cfg["min_kc_ratio"],
                                            cfg["kmeans_step_iters"], kcfg, overlap=True, **extra)
                            bdo = breakdown(over, q, k, v, reps)
                            row["call_overlap_kmeans_ms"] = bdo["kmeans"]
                            row["call_overlap_total_ms"] = bdo["total"]
                            row["call_overlap_speedup"] = t_dense / bdo["total"]
                            row["call_overlap_graph_ms"] = graph_time(over, q, k, v, reps)
                    except Exception as e:  # noqa: BLE001
                        row["call_error"] = f"{type(e).__name__}: {e}"[:300]
                emit(row, rows)
        q = k = v = qs = ks = vs = out = meta = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_tables(rows, tune_rows, out_dir, tag, env)
    return rows


def _fmt(x, nd=2):
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{nd}f}"
    return str(x)


def write_tables(rows, tune_rows, out_dir: Path, tag: str, env: dict) -> None:
    att = [r for r in rows if r["kind"] == "attention"]
    km = [r for r in rows if r["kind"] == "kmeans"]
    lines = [f"# Kernel benchmark ({env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')})", ""]
    lines += ["## Attention (bf16, B=1, D=128)", "",
              "| shape | Cq/Ck | density | dense cuDNN ms | ours ms | speedup | efficiency | tile util | flex ms "
              "| flex eff. | call ms | kmeans | select | perm | meta | attn | call speedup | non-attn % "
              "| ahead call ms | ahead kmeans | ahead attn | ahead speedup | ahead non-attn % | graph ms "
              "| graph speedup | graph non-attn % |",
              "|" + "---|" * 26]
    for r in att:
        lines.append("| " + " | ".join([
            r["shape"], f"{r['cq']}/{r['ck']}", _fmt(r["density"], 3), _fmt(r["dense_ms"]), _fmt(r["ours_ms"]),
            _fmt(r["speedup"]), _fmt(r["efficiency"]), _fmt(r.get("tile_util", float("nan"))),
            _fmt(r.get("flex_ms", float("nan"))),
            _fmt(r.get("flex_efficiency", float("nan"))), _fmt(r.get("call_total_ms", float("nan"))),
            *[_fmt(r.get(f"call_{c}_ms", float("nan"))) for c in
              ("kmeans", "selection", "permutation", "metadata", "attention")],
            _fmt(r.get("call_speedup", float("nan"))), _fmt(100 * r.get("call_nonattn_frac", float("nan")), 1),
            *[_fmt(r.get(f"call_ahead_{c}", float("nan"))) for c in
              ("total_ms", "kmeans_ms", "attention_ms", "speedup")],
            _fmt(100 * r.get("call_ahead_nonattn_frac", float("nan")), 1),
            _fmt(r.get("call_graph_ms", float("nan"))), _fmt(r.get("call_graph_speedup", float("nan"))),
            _fmt(100 * r.get("call_graph_nonattn_frac", float("nan")), 1),
        ]) + " |")
    q8 = [(r, qk) for r in att for qk in ("int8", "fp8") if f"q8_{qk}_ms" in r]
    if q8:
        lines += ["", "## 8-bit attention (QK^T in int8 or e4m3, PV in e4m3; opt-in variants triton_int8_fp8 / "
                  "triton_fp8)", "",
                  "| shape | Cq/Ck | density | QK | bf16 kernel ms | 8-bit ms | vs bf16 kernel | efficiency vs bf16 "
                  "cuDNN | quantize K/V ms | rel. L2 vs bf16 kernel | rel. L2 vs fp32 (head 0; bf16 kernel) "
                  "| max err / same-quant torch (head 0) | call ms | call speedup | graph ms | graph speedup |",
                  "|" + "---|" * 16]
        for r, qk in q8:
            p, nan = f"q8_{qk}_", float("nan")
            lines.append("| " + " | ".join([
                r["shape"], f"{r['cq']}/{r['ck']}", _fmt(r["density"], 3), qk, _fmt(r["ours_ms"]), _fmt(r[p + "ms"]),
                _fmt(r.get(p + "speedup_vs_bf16_kernel", nan)), _fmt(r.get(p + "efficiency", nan)),
                _fmt(r.get(p + "quantize_ms", nan)), _fmt(r.get(p + "relerr_vs_bf16_kernel", nan), 4),
                f"{_fmt(r.get(p + 'relerr_vs_fp32_head0', nan), 4)} "
                f"({_fmt(r.get(p + 'relerr_bf16_kernel_vs_fp32_head0', nan), 4)})",
                f"{_fmt(r.get(p + 'err', nan), 3)} / {_fmt(r.get(p + 'err_torch_same_quant', nan), 3)}",
                _fmt(r.get(f"call_{qk}_total_ms", nan)), _fmt(r.get(f"call_{qk}_speedup", nan)),
                _fmt(r.get(f"call_{qk}_graph_ms", nan)), _fmt(r.get(f"call_{qk}_graph_speedup", nan)),
            ]) + " |")
    lines += ["", "## k-means (2 warm-started iterations; ms)", "",
              "| shape | Cq/Ck | ours Q | ours K | flash-kmeans Q | flash-kmeans K | cold build ms | Q sizes p10/50/90 "
              "| K sizes p10/50/90 |", "|" + "---|" * 9]
    for r in km:
        lines.append("| " + " | ".join([
            r["shape"], f"{r['cq']}/{r['ck']}", _fmt(r["ours_q_ms"]), _fmt(r["ours_k_ms"]),
            _fmt(r.get("flash_q_ms", float("nan"))), _fmt(r.get("flash_k_ms", float("nan"))), _fmt(r["cold_ms"], 0),
            str(r["q_cluster_size_p10_p50_p90"]), str(r["k_cluster_size_p10_p50_p90"]),
        ]) + " |")
    lines += ["", "call = one warm SVG2 call, eager, CUDA events per component (perm = V gather, and K's too "
              "unless K's k-means writes K in cluster order (kmeans_sort_k); the Q gather and output scatter "
              "are fused into attention); the call starts on an idle GPU, so waits for the host count; "
              "ahead = the same call issued while a queued 20 ms GPU sleep keeps the GPU busy, as inside a "
              "model's forward where the projections before the attention do (the events then time GPU work "
              "only); graph = the same call replayed as one CUDA graph, its non-attention share = the graph of "
              "the call without the attention kernel / the whole graph. overlap rows (K's k-means on a second "
              "stream, overlap=true) are in the JSON only.",
              "efficiency = density x dense / ours; tile util = useful pairs / pairs computed by the tiles."]
    if tune_rows:
        lines += ["", "## Tile configs (block_m, block_n, win, warps, stages, block_m_small, warps_small, "
                  "tile_table, key_layout, chunk)", "",
                  "dense_probe rows: the config on a fully dense layout (efficiency = t_dense / t). compile: "
                  "K/V buffers in flight per tile / registers / spills / sync loads in the loop (first launch).", "",
                  "| kind | shape | Cq/Ck | density | config | ms | efficiency | tile util | compile |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in tune_rows:
            if r["kind"] == "kmeans_tune":
                continue
            comp = r.get("compile") or [{}]
            c0 = comp[0]
            ctext = f"{c0.get('kv_buffers')}/{c0.get('n_regs')}/{c0.get('n_spills')}/{c0.get('sync_loads_in_loop')}"
            lines.append(f"| {r['kind']} | {r['shape']} | {r['cq']}/{r['ck']} | {_fmt(r['density'], 3)} | "
                         f"{r['config']} | {_fmt(r['ms'])} | {_fmt(r['efficiency'])} | "
                         f"{_fmt(r.get('tile_util', float('nan')))} | {ctext} |")
    kt = [r for r in tune_rows if r["kind"] == "kmeans_tune"]
    if kt:
        lines += ["", "## k-means assignment tiles (BLOCK_M, BLOCK_C, warps, stages), 2 warm iterations", "",
                  "| shape | Cq/Ck | blocks | Q ms | K ms | K labels equal to default |", "|---|---|---|---|---|---|"]
        for r in kt:
            nan = float("nan")
            lines.append(f"| {r['shape']} | {r['cq']}/{r['ck']} | {r['blocks']} | {_fmt(r.get('q_ms', nan))} "
                         f"| {_fmt(r.get('k_ms', nan))} | {_fmt(r.get('label_agreement_vs_default', nan), 4)} |")
    text = "\n".join(lines) + "\n"
    (out_dir / f"bench_kernels{tag}.md").write_text(text)
    (out_dir / f"bench_kernels{tag}.json").write_text(json.dumps(dict(env=env, rows=rows, tune=tune_rows), indent=1))
    print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Settings (override as key=value):\n" + (ROOT / "conf" / "bench_kernels.yaml").read_text())
        return
    cfg = load_config(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(cfg)


if __name__ == "__main__":
    main()
