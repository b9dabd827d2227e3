import pytest
import torch
import torch.nn.functional as F

from svg2 import AttentionContext, MethodState, SVG2Config, available_methods, build_method
from tests.helpers import clustered_qkv


def test_registry():
    assert {"dense", "svg2"} <= set(available_methods())
    with pytest.raises(KeyError, match="available"):
        build_method("nope")


def test_dense_method_and_schedule():
    q, k, v = clustered_qkv(b=1, h=2, s=120, d=64)
    state = MethodState()
    dense = build_method("dense")
    torch.testing.assert_close(dense(q, k, v, AttentionContext(state=state)), F.scaled_dot_product_attention(q, k, v))
    m = build_method("svg2", cfg=SVG2Config(num_q_centroids=8, num_k_centroids=16, dense_steps_frac=0.5,
                                            dense_layers=1, kmeans_iters_init=5))
    for step in range(4):
        for layer in range(2):
            for branch in ("cond", "uncond"):
                m(q, k, v, AttentionContext(layer_index=layer, step_index=step, num_steps=4, branch=branch,
                                            state=state))
    recs = state.resolved_records()[1:]
    for r in recs:
        expect_dense = r["step"] < 2 or r["layer"] < 1
        assert r["dense"] == expect_dense
        assert (r["density"] == 1.0) if expect_dense else (r["density"] < 1.0)
    # one cluster state per (layer, branch) that ran sparse
    assert state.cluster_state(1, "cond").calls == 2 and state.cluster_state(1, "uncond").calls == 2
    state.reset()
    assert state.records == [] and state.cluster_state(1, "cond").calls == 0


def test_seed_centroids_in_warmup():
    q, k, v = clustered_qkv(b=1, h=2, s=120, d=64)
    state = MethodState()
    m = build_method("svg2", cfg=SVG2Config(num_q_centroids=8, num_k_centroids=16, dense_steps_frac=0.5,
                                            dense_layers=0, seed_centroids_in_warmup=True))
    m(q, k, v, AttentionContext(step_index=1, num_steps=4, state=state))  # last dense step
    assert state.cluster_state(0, "cond").calls == 1
    assert state.resolved_records()[0]["dense"]
