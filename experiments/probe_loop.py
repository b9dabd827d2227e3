"""Where does the attention loop lose against cuDNN? Dense-layout variants of one FA2-style Triton loop.

    python experiments/probe_loop.py --out results/kernels/probe_loop.json           # every variant
    python experiments/probe_loop.py --variant desc --shape wan1.3b                    # one (in-process)

Every variant computes full (non-causal) attention over one contiguous key range, so any gap to cuDNN is the
loop's own: how K/V rows are addressed (TMA tensor descriptor, contiguous pointers, or the chunk table of
``triton_chunks``), how padding is masked (none, ``tl.where`` as in ``triton_chunks``, an additive bias), how
the exp2 argument is formed (scale-then-subtract as in ``triton_chunks``, or one FMA), and whether Triton's
warp specialisation is asked for. Each variant runs in its own process (a compiler assertion aborts only that
one) and appends one JSON line. Shapes round S up to a multiple of 128 so that no query tile is partial (the
probe measures the loop).
"""

# ruff: noqa: B023  (the closure is timed inside the loop iteration that made it)
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {"wan1.3b": (12, 32768), "wan14b": (8, 75648), "tiny": (2, 256)}  # heads, tokens (B = 1, D = 128)
#: name -> (load, mask, fma, warp_specialize); load 0 = TMA descriptor, 1 = contiguous pointers, 2 = chunk table
VARIANTS = {
    "desc": (0, 0, 1, False),
    "desc_ws": (0, 0, 1, True),
    "desc_bias": (0, 2, 1, False),
    "ptr": (1, 0, 1, False),
    "ptr_where": (1, 1, 0, False),
    "chunk_v4": (2, 1, 0, False),
    "chunk_bias": (2, 2, 1, False),
    "chunk_nomask": (2, 0, 1, False),
}
CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 4)]  # BM, BN, warps, stages


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe_kernel(
        Q, K, V, Out, desc_k, desc_v, table_ptr, qk_scale,
        stride_h, S, T_ROW,
        LOAD: tl.constexpr, MASK: tl.constexpr, FMA: tl.constexpr, WS: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr,
    ):
        NCH: tl.constexpr = BLOCK_N // CH
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + h * stride_h + offs_m[:, None] * D + offs_d[None, :])
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        n_tiles = S // BLOCK_N
        within = offs_n % CH
        for t in tl.range(0, n_tiles, warp_specialize=WS):
            if LOAD == 0:
                row0 = (h * S + t * BLOCK_N).to(tl.int32)
                k = desc_k.load([row0, 0])
                v = desc_v.load([row0, 0])
                n_valid = offs_n < S - t * BLOCK_N  # always true here: the mask's cost, not its effect
            elif LOAD == 1:
                rows = t * BLOCK_N + offs_n
                k = tl.load(K + h * stride_h + rows[:, None] * D + offs_d[None, :])
                v = tl.load(V + h * stride_h + rows[:, None] * D + offs_d[None, :])
                n_valid = rows < S
            else:
                packed = tl.load(table_ptr + h * T_ROW + t * NCH + offs_n // CH)
                rows = tl.minimum((packed >> 8) + within, S - 1)
                n_valid = within < (packed & 255)
                k = tl.load(K + h * stride_h + rows[:, None] * D + offs_d[None, :])
                v = tl.load(V + h * stride_h + rows[:, None] * D + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k))
            if FMA:  # max on raw scores, exp2 argument as one FMA
                if MASK == 2:
                    qk = qk + tl.where(n_valid, 0.0, float("-inf"))[None, :]
                elif MASK == 1:
                    qk = tl.where(n_valid[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            else:  # as triton_chunks: scale, mask, subtract
                qk = qk * qk_scale
                if MASK != 0:
                    qk = tl.where(n_valid[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, axis=1))
                p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + h * stride_h + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty))

    return probe_kernel


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def run_variant(name: str, shape: str) -> list[dict]:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, s = SHAPES[shape]
    d = 128
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 smoke check at 'tiny'
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    q, k, v = (torch.randn(1, h, s, d, device=dev, dtype=dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    flops = 4.0 * h * s * s * d
    if dev == "cpu":
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    else:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            if name == "cudnn":
                t = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
                return [dict(variant=name, shape=shape, ms=t, tflops=flops / t / 1e9)]
    load, mask, fma, ws = VARIANTS[name]
    kern = _kernel()
    ch = 16
    n_ch = s // ch
    table = ((torch.arange(n_ch, device=dev, dtype=torch.int32) * ch) << 8 | ch).repeat(h, 1).contiguous()
    rows = []
    for bm, bn, warps, stages in CONFIGS:
        row = dict(variant=name, shape=shape, block_m=bm, block_n=bn, warps=warps, stages=stages)
        try:
            out = torch.empty_like(q)
            if load == 0:
                from triton.tools.tensor_descriptor import TensorDescriptor

                dk = TensorDescriptor.from_tensor(k.view(h * s, d), [bn, d])
                dv = TensorDescriptor.from_tensor(v.view(h * s, d), [bn, d])
            else:
                dk = dv = k  # unused: a tensor keeps the signature valid

            def call():
                kern[(s // bm, h)](
                    q, k, v, out, dk, dv, table, scale * 1.4426950408889634, s * d, s, n_ch,
                    LOAD=load, MASK=mask, FMA=fma, WS=ws, D=d, BLOCK_M=bm, BLOCK_N=bn, CH=ch,
                    num_warps=warps, num_stages=stages,
                )

            call()
            err = (out.float() - ref.float()).abs().max().item()
            if dev == "cpu":
                row.update(max_err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            t = _time(call)
            row.update(ms=t, tflops=flops / t / 1e9, max_err=err)
        except Exception as exc:  # noqa: BLE001 - a refusal is a result here
            row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    del triton
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default=None)
    ap.add_argument("--shape", default="wan1.3b")
    ap.add_argument("--shapes", default="wan1.3b")
    ap.add_argument("--variants", default="cudnn," + ",".join(VARIANTS))
    ap.add_argument("--out", default="probe_loop.jsonl")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--table", default=None, help="print the markdown table of an existing .jsonl and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table([json.loads(x) for x in open(args.table)]))
        return
    if args.variant:
        rows = run_variant(args.variant, args.shape)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        for name in args.variants.split(","):
            t0 = time.time()
            cmd = [sys.executable, __file__, "--variant", name, "--shape", shape, "--out", args.out]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
                status = f"rc={p.returncode}"
                if p.returncode != 0:
                    tail = (p.stderr or "")[-600:]
                    with open(args.out, "a") as f:
                        f.write(json.dumps(dict(variant=name, shape=shape, error=f"rc={p.returncode}: {tail}")) + "\n")
            except subprocess.TimeoutExpired:
                status = "timeout"
                with open(args.out, "a") as f:
                    f.write(json.dumps(dict(variant=name, shape=shape, error="timeout")) + "\n")
            print(f"{shape} {name}: {status} in {time.time() - t0:.0f} s", flush=True)
    print(markdown_table([json.loads(x) for x in open(args.out)]))


def markdown_table(rows: list[dict]) -> str:
    """One row per (shape, variant, config): ms, TFLOP/s and the ratio to cuDNN of the same shape."""
    dense = {r["shape"]: r["ms"] for r in rows if r["variant"] == "cudnn" and "ms" in r}
    out = ["| shape | variant | (load, mask, fma, ws) | BM | BN | warps | stages | ms | TFLOP/s | vs cuDNN |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = [str(r.get(k, "")) for k in ("block_m", "block_n", "warps", "stages")]
        what = str(VARIANTS.get(r["variant"], ""))
        if "ms" not in r:
            out.append(f"| {r['shape']} | {r['variant']} | {what} | {' | '.join(cfg)} | {r['error'][:80]} | | |")
            continue
        ratio = dense.get(r["shape"], float("nan")) / r["ms"]
        out.append(f"| {r['shape']} | {r['variant']} | {what} | {' | '.join(cfg)} | {r['ms']:.3f} | "
                   f"{r['tflops']:.0f} | {ratio:.3f} |")
    return "\n".join(out)

if __name__ == "__main__":
    main()
