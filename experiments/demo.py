"""Small CPU demo: SVG2 vs dense attention on structured synthetic Q/K/V.

Prints, per setting, the density SVG2 kept and the relative error of its output against dense attention.
``python -m experiments.demo`` (or ``svg2-demo``). Replaced as the main job by the harness quickstart.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from svg2 import ClusterState, SVG2Config, svg2_attention
from svg2.synthetic import VideoShape, clustered_qkv


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--grid", type=int, nargs=3, default=(4, 32, 32), metavar=("FRAMES", "HEIGHT", "WIDTH"),
                   help="latent token grid (sequence length = their product)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=24, help="true mixture components of the synthetic data")
    args = p.parse_args(argv)
    shape = VideoShape(args.heads, *args.grid)
    q, k, v = clustered_qkv(shape, head_dim=args.head_dim, dtype=torch.float32, components=args.clusters, seed=0)
    t0 = time.perf_counter()
    ref = F.scaled_dot_product_attention(q, k, v)
    t_dense = time.perf_counter() - t0
    print(f"q/k/v: {tuple(q.shape)} float32 on CPU; dense SDPA {t_dense * 1e3:.0f} ms")
    print(f"{'setting':<34} {'density':>8} {'rel. error':>11} {'max abs err':>12}")
    settings = [
        ("top_p=1.0 (must equal dense)", SVG2Config(num_q_centroids=64, num_k_centroids=128, top_p=1.0)),
        ("defaults Cq=100 Ck=500 top_p=0.9", SVG2Config()),
        ("Cq=64 Ck=256 top_p=0.9", SVG2Config(num_q_centroids=64, num_k_centroids=256)),
        ("Cq=64 Ck=256 top_p=0.95", SVG2Config(num_q_centroids=64, num_k_centroids=256, top_p=0.95)),
        ("Cq=64 Ck=256 target_density=0.25", SVG2Config(num_q_centroids=64, num_k_centroids=256,
                                                        target_density=0.25)),
    ]
    for name, cfg in settings:
        state = ClusterState()
        out, layout = svg2_attention(q, k, v, cfg, state)
        out, layout = svg2_attention(q, k, v, cfg, state)  # second call: warm-started k-means
        rel = ((out - ref).norm() / ref.norm()).item()
        print(f"{name:<34} {layout.density():>8.3f} {rel:>11.2e} {(out - ref).abs().max().item():>12.2e}")


if __name__ == "__main__":
    main()
