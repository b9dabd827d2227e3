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


def synthetic_qkv(b: int, h: int, s: int, d: int, clusters: int, seed: int):
    """Mixture of Gaussians per head with unequal masses plus a smooth positional component."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, clusters, d, generator=g) * 1.5
    weights = torch.rand(clusters, generator=g) ** 2 + 0.05
    pos = torch.linspace(0, 1, s)[:, None] * torch.randn(1, d, generator=g)

    def draw():
        a = torch.multinomial(weights, b * h * s, replacement=True, generator=g).view(b, h, s)
        x = torch.gather(centers, 2, a.unsqueeze(-1).expand(b, h, s, d))
        return x + pos + 0.4 * torch.randn(b, h, s, d, generator=g)

    return draw(), draw(), torch.randn(b, h, s, d, generator=g)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=24, help="true mixture components of the synthetic data")
    args = p.parse_args(argv)
    q, k, v = synthetic_qkv(1, args.heads, args.seqlen, args.head_dim, args.clusters, seed=0)
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
