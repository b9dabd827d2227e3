"""Which V layout the 8-bit attention kernel runs fastest with, and whether it runs (H100/H200).

python experiments/probe_8bit.py --out results/kernels --tag _r23

Each (QK format, V layout) runs in its own subprocess (a kernel fault poisons the CUDA context) on a
Wan 1.3B-sized head set (B=1, H=12, S=32760, D=128, bf16) with a random layout at density ~0.25 and is compared,
on head 0, with the torch path that quantizes the same way; the bf16 kernel and cuDNN dense run in the same
process. V layouts: rows (TMA boxes of V, transposed in shared memory by Triton), t_tma (V^T by TMA at
unaligned key offsets), t_ptr (V^T by pointer loads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMBOS = [(qk, vl) for qk in ("int8", "fp8") for vl in ("rows", "t_tma", "t_ptr")]


def child(qk: str, vl: str, tiles: str = "", pv: str = "fp8") -> dict:
    import torch
    import torch.nn.functional as F
    from svg2_kernels.reference import varblock_attention_fp8_reference, varblock_attention_reference
    from svg2_kernels.varblock_attention import build_varblock_metadata, default_config
    from svg2_kernels.varblock_attention import varblock_attention_with_metadata as run_bf16
    from svg2_kernels.varblock_fp8 import quantize_kv_fp8, varblock_attention_fp8_with_metadata
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bench(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps

    g = torch.Generator().manual_seed(0)
    b, h, s, d, cq, ck = 1, 12, 32760, 128, 100, 500

    def offsets(c):
        rows = []
        for _ in range(b * h):
            w = torch.rand(c, generator=g) ** 2 + 0.05
            sizes = torch.floor(w / w.sum() * s).long()
            sizes[0] += s - sizes.sum()
            rows.append(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]))
        return torch.stack(rows).reshape(b, h, c + 1).cuda()

    qo, ko = offsets(cq), offsets(ck)
    bm = (torch.rand(b, h, cq, ck, generator=g) < 0.25).cuda()
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    k = k + 1.0
    cfg = default_config("cuda", d, torch.cuda.get_device_capability(), s)
    bf16_cfg = cfg
    if tiles:  # block_m, block_n, warps[, block_m_small]: the 8-bit kernel's tiles (the bf16 one keeps its own)
        import dataclasses

        t = [int(x) for x in tiles.split(",")]
        cfg = dataclasses.replace(cfg, block_m=t[0], block_n=t[1], num_warps=t[2],
                                  block_m_small=t[3] if len(t) > 3 else 0)
    meta_bf16 = build_varblock_metadata(qo, ko, bm, s, s, bf16_cfg)
    meta = build_varblock_metadata(qo, ko, bm, s, s, cfg)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_dense = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    t_bf16 = bench(lambda: run_bf16(q, k, v, meta_bf16))
    kv = quantize_kv_fp8(k, v, qk, v_transposed=vl != "rows", pv=pv)
    info = []
    out = varblock_attention_fp8_with_metadata(q, kv, meta, vt_pointers=vl == "t_ptr", compile_info=info)
    torch.cuda.synchronize()
    t8 = bench(lambda: varblock_attention_fp8_with_metadata(q, kv, meta, vt_pointers=vl == "t_ptr"))
    t_quant = bench(lambda: quantize_kv_fp8(k, v, qk, v_transposed=vl != "rows", pv=pv))
    hh = slice(0, 1)
    args = (q[:, hh], k[:, hh], v[:, hh], qo[:, hh], ko[:, hh], bm[:, hh])
    ref = varblock_attention_reference(*args).float()
    emu = varblock_attention_fp8_reference(*args, qk=qk, pv=pv).float()
    pairs = (bm * (qo.diff(dim=-1)[..., :, None] * ko.diff(dim=-1)[..., None, :])).sum().item()
    density = pairs / (b * h * s * s)
    return dict(qk=qk, pv=pv, v_layout=vl, tiles=tiles or "default", dense_ms=t_dense, bf16_ms=t_bf16, q8_ms=t8,
                quantize_ms=t_quant,
                density=density, speedup_vs_bf16_kernel=t_bf16 / t8, efficiency_bf16=density * t_dense / t_bf16,
                efficiency_8bit=density * t_dense / t8, err=(out[:, hh].float() - ref).abs().max().item(),
                err_torch_same_quant=(emu - ref).abs().max().item(),
                relerr_vs_fp32=((out[:, hh].float() - ref).norm() / ref.norm()).item(),
                compile=[{k_: c.get(k_) for k_ in ("block_m", "n_regs", "n_spills", "shared")} for c in info])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--tag", default="")
    ap.add_argument("--layouts", default="rows,t_tma,t_ptr", help="V layouts to run, comma-separated")
    ap.add_argument("--tiles", default="", help="';'-separated block_m,block_n,warps[,block_m_small] to try")
    ap.add_argument("--pv", default="fp8", help="fp8, bf16 (QK^T alone in 8 bits), or both: fp8,bf16")
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        print("ROW " + json.dumps(child(*a.child)), flush=True)
        return
    rows = []
    jobs = [(qk, vl, t, pv) for qk, vl in COMBOS if vl in a.layouts.split(",") for t in (a.tiles or "").split(";")
            for pv in a.pv.split(",")]
    for qk, vl, t, pv in jobs:
        proc = subprocess.run([sys.executable, __file__, "--child", qk, vl, t, pv], capture_output=True, text=True,
                              timeout=240)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        row = json.loads(found[-1][4:]) if found else dict(qk=qk, pv=pv, v_layout=vl, tiles=t,
                                                           error=(proc.stderr or "")[-600:])
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| QK | PV | V layout | tiles (M, N, warps, small M) | regs/spills | density | cuDNN dense ms "
             "| bf16 kernel ms | 8-bit ms | vs bf16 kernel | eff. bf16 "
             "| eff. 8-bit | quantize ms | rel. L2 vs fp32 (head 0) | max err / same-quant torch |",
             "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['qk']} | {r['pv']} | {r['v_layout']} | {r['tiles']} | "
                         f"failed: {r['error'][-160:]!r} |" + " |" * 10)
            continue
        regs = ", ".join(f"{c['n_regs']}/{c['n_spills']}" for c in r.get("compile", []))
        lines.append(f"| {r['qk']} | {r['pv']} | {r['v_layout']} | {r['tiles']} | {regs} | {r['density']:.3f} "
                     f"| {r['dense_ms']:.2f} | {r['bf16_ms']:.2f} "
                     f"| {r['q8_ms']:.2f} | {r['speedup_vs_bf16_kernel']:.2f} | {r['efficiency_bf16']:.2f} "
                     f"| {r['efficiency_8bit']:.2f} | {r['quantize_ms']:.2f} | {r['relerr_vs_fp32']:.4f} "
                     f"| {r['err']:.3f} / {r['err_torch_same_quant']:.3f} |")
    text = "\n".join(lines) + "\n"
    (out / f"probe_8bit{a.tag}.md").write_text(text)
    (out / f"probe_8bit{a.tag}.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
