"""Test helpers: structured synthetic Q/K/V (clustered, like real video attention)."""

from __future__ import annotations

import torch


def clustered_qkv(b=1, h=2, s=257, d=64, clusters=6, spread=0.3, seed=0, dtype=torch.float32):
    """Q and K drawn from a shared mixture of Gaussians per head (unequal masses), V random."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, clusters, d, generator=g) * 2.0
    weights = torch.rand(clusters, generator=g) + 0.2
    assign_q = torch.multinomial(weights, b * h * s, replacement=True, generator=g).view(b, h, s)
    assign_k = torch.multinomial(weights, b * h * s, replacement=True, generator=g).view(b, h, s)
    pick = lambda a: torch.gather(centers, 2, a.unsqueeze(-1).expand(b, h, s, d))
    q = pick(assign_q) + spread * torch.randn(b, h, s, d, generator=g)
    k = pick(assign_k) + spread * torch.randn(b, h, s, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def masked_reference(q, k, v, mask, scale=None):
    """float64 dense attention under a boolean token mask (B, H, Sq, Sk)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ vd


def assert_fa_rule(out, q, k, v, mask, scale=None, floor=1e-6):
    """FlashAttention's test rule: error vs a float64 reference at most 2x that of the same-precision torch
    path (SDPA with the same token mask in the inputs' dtype), plus a tiny floor for 0-vs-0 cases."""
    import torch.nn.functional as F

    ref = masked_reference(q, k, v, mask, scale)
    same = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    err = (out.double() - ref).abs().max().item()
    err_torch = (same.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + floor, f"error {err:.3g} > 2 x same-precision torch error {err_torch:.3g}"
    return err, err_torch


def compensated_reference(q, k, v, layout, scale=None, text_mask=None, dtype=torch.float64):
    """The compensated output of a ClusterLayout computed directly from the formula (one softmax over the selected
    token keys plus one pseudo-key per skipped non-empty key cluster: logit ``q . c_j * scale + log n_j``, value
    ``mean(v_j)``, centroids and means of these K and V), in ``dtype`` (float64: the reference; the
    inputs' dtype: the same-precision torch path of the FlashAttention error rule)."""
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    b, h, s, d = q.shape
    t = layout.num_text_tokens
    sv = s - t
    scale = d**-0.5 if scale is None else scale
    ck = layout.num_k_clusters
    onehot = torch.nn.functional.one_hot(layout.k_labels, ck).to(dtype)  # (B, H, Sv, Ck)
    n = onehot.sum(2)  # (B, H, Ck)
    cent = onehot.transpose(-1, -2) @ kd[:, :, :sv] / n.clamp_min(1)[..., None]
    vbar = onehot.transpose(-1, -2) @ vd[:, :, :sv] / n.clamp_min(1)[..., None]
    mask = layout.to_dense() if t == 0 else _dense_mask_with_text(layout, text_mask)
    s_tok = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    skipped = ~torch.gather(layout.block_map, 2, layout.q_labels[..., None].expand(b, h, sv, ck))
    s_cen = qd[:, :, :sv] @ cent.transpose(-1, -2) * scale + torch.log(n)[:, :, None, :]
    s_cen = s_cen.masked_fill(~(skipped & (n > 0)[:, :, None, :]), float("-inf"))
    s_cen = torch.cat([s_cen, torch.full((b, h, t, ck), float("-inf"), dtype=dtype, device=q.device)], 2)  # text: none
    p = torch.softmax(torch.cat([s_tok, s_cen], -1), -1)
    return p[..., :s] @ vd + p[..., s:] @ vbar


def _dense_mask_with_text(layout, text_mask):
    m = layout.to_dense()
    if text_mask is not None:
        m = m.clone()
        m[:, :, :, -layout.num_text_tokens:] &= text_mask[:, None, None, :]
    return m


def run_svg2_cli(args, monkeypatch, capfd) -> tuple[int, str]:
    """``svg2-run args`` in this process (the console script's code path): (exit status, stdout + stderr)."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from svg2.harness.cli import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["svg2-run", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        GlobalHydra.instance().clear()
    out = capfd.readouterr()
    return code, out.out + out.err


def interp_worker(cases: dict) -> None:
    """Body of a test module's ``__main__`` under Triton's interpreter: run every case (each returns
    ``(result, ok, detail)``), report each failure without stopping the others, print one ``RESULTS`` JSON line."""
    import json
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    results = {}
    for name, job in cases.items():
        try:
            _, ok, detail = job()
        except Exception as e:  # report, don't stop the other cases
            ok, detail = False, f"{type(e).__name__}: {e}"
        results[name] = {"ok": bool(ok), "detail": detail}
    print("RESULTS " + json.dumps(results))


def interp_results_of(module: str) -> dict:
    """Run ``python -m <module>`` (a test module whose ``__main__`` calls :func:`interp_worker`) with
    TRITON_INTERPRET=1 in a fresh process (the interpreter must be chosen before Triton is imported)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(root))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS "):])
