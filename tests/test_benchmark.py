"""svg2.benchmark and svg2.synthetic: the shared benchmark module times the public call (CPU here)."""

from __future__ import annotations

import json

import torch

from svg2 import SVG2Config
from svg2.benchmark import PHASES, WholeCall, time_ms, write_rows
from svg2.synthetic import SHAPES, VideoShape, clustered_qkv


def test_clustered_qkv_is_deterministic_and_clustered():
    shape = SHAPES["tiny"]
    q, k, v = clustered_qkv(shape, head_dim=32, dtype=torch.float32, seed=3)
    assert q.shape == k.shape == v.shape == (1, shape.heads, shape.seqlen, 32)
    q2, _, _ = clustered_qkv(shape, head_dim=32, dtype=torch.float32, seed=3)
    assert torch.equal(q, q2)
    state = torch.random.get_rng_state()
    clustered_qkv(VideoShape(1, 2, 4, 4), head_dim=16)
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream is untouched
    # queries and keys share component means: each query's nearest key is far closer than a random one
    s = (q[0, 0] @ k[0, 0].T) / 32**0.5
    assert (s.max(-1).values - s.mean(-1)).mean() > 2.0


def test_whole_call_times_svg2_attention_by_phase(tmp_path):
    q, k, v = clustered_qkv(SHAPES["tiny"], head_dim=32, dtype=torch.float32)
    cfg = SVG2Config(num_q_centroids=8, num_k_centroids=16, target_density=0.3, min_kc_ratio=0.0,
                     kmeans_iters_init=5)
    call = WholeCall(q, k, v, cfg)
    assert call.kernels == {"kmeans": "torch", "attention": "torch"}
    ph = call.phases(reps=2)
    assert set(PHASES) <= set(ph) and ph["total"] >= max(ph[p] for p in PHASES) > 0
    assert abs(call.last_layout().density() - 0.3) < 0.1
    assert time_ms(lambda: call(), q.device, budget_ms=1, min_reps=1, max_reps=2) > 0
    md = write_rows([{"shape": "tiny", **ph}], ["shape", "total", "attention"], tmp_path, "bench", "# t")
    assert md.read_text().splitlines()[2].startswith("| shape | total | attention |")
    assert json.loads((tmp_path / "bench.json").read_text())[0]["shape"] == "tiny"
