"""enable_svg2 on a tiny random WanTransformer3DModel (CPU, fp32): parity, schedule, state, handle."""

from __future__ import annotations

import pytest
import torch

from svg2 import enable_svg2
from svg2.methods import AttentionMethod
from tests.tiny_diffusers import TINY_CFG, tiny_wan, wan_inputs


@pytest.fixture(scope="module")
def model():
    return tiny_wan()


def _run(m, **kw):
    with torch.no_grad():
        return m(**kw)[0]


def _loop(m, steps, branches=("cond", "uncond"), explicit_step=True, inputs=None):
    """A denoising loop the way diffusers' Wan pipeline calls the transformer."""
    inputs = inputs or wan_inputs()
    outs = []
    for i in range(steps):
        for b in branches:
            kw = dict(step_index=i, num_inference_steps=steps) if explicit_step else {}
            with m.cache_context(b, **kw):
                outs.append(_run(m, **inputs))
    return outs


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("fused", [False, True], ids=["qkv", "fused_qkv"])
def test_dense_parity(i2v, fused):
    m = tiny_wan(i2v=i2v)
    if fused:
        m.fuse_qkv_projections()
    inputs = wan_inputs(i2v=i2v)
    ref = _run(m, **inputs)
    stock2 = [b.attn2.processor for b in m.blocks]
    h = enable_svg2(m, method="dense", num_steps=1)
    assert [b.attn2.processor for b in m.blocks] == stock2  # cross-attention (and I2V image context) stays stock
    torch.testing.assert_close(_run(m, **inputs), ref, rtol=0, atol=1e-6)
    assert h.stats()["num_calls"] == len(m.blocks)
    h.remove()


def test_top_p_one_equals_dense_and_defaults_are_sparse(model):
    inputs = wan_inputs()
    ref = _run(model, **inputs)
    with enable_svg2(model, TINY_CFG, num_steps=1, top_p=1.0, min_kc_ratio=1.0) as h:
        torch.testing.assert_close(_run(model, **inputs), ref, rtol=1e-5, atol=1e-5)
        assert h.stats()["mean_sparse_density"] == pytest.approx(1.0)
    with enable_svg2(model, TINY_CFG, num_steps=1) as h:
        out = _run(model, **inputs)
        s = h.stats()
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)
    assert s["num_dense_calls"] == 0 and 0 < s["mean_sparse_density"] < 1
    assert s["kernels"]  # which kernels ran is recorded


def test_warmup_schedule_steps_layers_and_branches(model):
    cfg = TINY_CFG.replace(dense_steps_frac=0.4, dense_layers=1)  # 5 steps: steps 0, 1 dense; block 0 dense
    h = enable_svg2(model, cfg)
    _loop(model, 5)
    rows = h.records()
    assert len(rows) == 5 * 2 * len(model.blocks)
    assert h.num_steps == 5
    for r in rows:
        assert r["dense"] == (r["step"] < 2 or r["layer"] < 1), r
        assert (r["density"] == 1.0) == r["dense"]
    assert {(r["step"], r["branch"]) for r in rows} == {(i, b) for i in range(5) for b in ("cond", "uncond")}
    s = h.stats()
    assert s["density_per_step"][0] == 1.0 and s["density_per_step"][4] < 1.0
    assert s["density_per_layer"][0] == 1.0 and s["density_per_layer"][1] < 1.0
    h.remove()


def test_step_counting_without_step_index(model):
    # Wan I2V and HunyuanVideo pipelines name the branch only; without CFG there is one call per step.
    h = enable_svg2(model, TINY_CFG.replace(dense_steps_frac=0.5), num_steps=4)
    _loop(model, 4, explicit_step=False)
    assert [(r["step"], r["branch"]) for r in h.records() if r["layer"] == 0] == [
        (i, b) for i in range(4) for b in ("cond", "uncond")]
    h.reset()
    inputs = wan_inputs()
    for _ in range(4):
        _run(model, **inputs)  # no cache_context at all
    assert [r["step"] for r in h.records() if r["layer"] == 0] == [0, 1, 2, 3]
    assert [r["dense"] for r in h.records() if r["layer"] == 0] == [True, True, False, False]
    h.remove()


def test_per_branch_state(model):
    h = enable_svg2(model, TINY_CFG)
    cond, uncond = wan_inputs(seed=1), wan_inputs(seed=2)
    for i in range(3):
        for name, inp in (("cond", cond), ("uncond", uncond)):
            with model.cache_context(name, step_index=i, num_inference_steps=3):
                _run(model, **inp)
    state = h.targets[0].state
    for layer in range(len(model.blocks)):
        c, u = state.cluster_state(layer, "cond"), state.cluster_state(layer, "uncond")
        assert c.calls == 3 and u.calls == 3  # each branch: one cold start, then warm starts
        assert not torch.equal(c.q_centroids, u.q_centroids)
    h.remove()


def test_batch_two(model):
    inputs = wan_inputs(batch=2)
    ref = _run(model, **inputs)
    with enable_svg2(model, TINY_CFG, num_steps=1, top_p=1.0, min_kc_ratio=1.0):
        torch.testing.assert_close(_run(model, **inputs), ref, rtol=1e-5, atol=1e-5)
    with enable_svg2(model, TINY_CFG, num_steps=1) as h:
        out = _run(model, **inputs)
        st = h.targets[0].state.cluster_state(0, "cond")
        assert st.q_centroids.shape[0] == 2 * 2  # centroids per (sample, head)
        assert 0 < h.stats()["mean_density"] < 1
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_reset_manual_and_automatic(model):
    h = enable_svg2(model, TINY_CFG)
    _loop(model, 2)
    assert h.records()
    h.reset()
    assert not h.records() and h.targets[0].state.cluster_state(1, "cond").calls == 0
    _loop(model, 2)
    n = len(h.records())
    # A new video on a bare transformer: the explicit step index goes back to 0 -> state reset.
    with model.cache_context("cond", step_index=0, num_inference_steps=2):
        _run(model, **wan_inputs())
    assert len(h.records()) == len(model.blocks) < n
    h.remove()


def test_remove_restores_stock_bit_identical(model):
    inputs = wan_inputs()
    ref = _run(model, **inputs)
    procs = [(b.attn1.processor, b.attn2.processor) for b in model.blocks]
    h = enable_svg2(model, TINY_CFG, num_steps=1)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_svg2(model, TINY_CFG)
    assert not torch.equal(_run(model, **inputs), ref)
    h.remove()
    h.remove()  # idempotent
    assert [(b.attn1.processor, b.attn2.processor) for b in model.blocks] == procs
    assert "cache_context" not in model.__dict__ and not model._forward_pre_hooks
    assert torch.equal(_run(model, **inputs), ref)
    with pytest.raises(RuntimeError, match="removed"):
        h.reset()


def test_any_registered_method_gets_the_context(model):
    from svg2.methods import register_method

    seen = []

    @register_method("_probe_integration")
    class Probe(AttentionMethod):
        def __init__(self, tag):
            self.tag = tag

        def __call__(self, q, k, v, ctx):
            seen.append((self.tag, ctx.layer_index, ctx.step_index, ctx.num_steps, ctx.branch, tuple(q.shape)))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    h = enable_svg2(model, None, method="_probe_integration", tag="x")
    _loop(model, 2)
    h.remove()
    assert seen[0] == ("x", 0, 0, 2, "cond", (1, 2, 256, 16))
    assert seen[-1][1:5] == (len(model.blocks) - 1, 1, 2, "uncond")


def test_unsupported_model_lists_supported():
    with pytest.raises(TypeError, match="WanTransformer3DModel.*HunyuanVideoTransformer3DModel"):
        enable_svg2(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="number of denoising steps"):
        m = tiny_wan(num_layers=1)
        with enable_svg2(m, TINY_CFG):
            _run(m, **wan_inputs())


def test_torch_compile_matches_eager(model):
    """Under torch.compile the method runs outside the graph (torch.compiler.disable): one graph break per
    attention call, no recompiles across steps."""
    import torch._dynamo

    torch._dynamo.reset()
    inputs = wan_inputs()
    h = enable_svg2(model, TINY_CFG.replace(dense_steps_frac=0.5), num_steps=4)
    eager = _loop(model, 4, branches=("cond",))
    h.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch._dynamo.config.patch(error_on_recompile=False):
        outs = []
        for i in range(4):
            with compiled.cache_context("cond", step_index=i, num_inference_steps=4):
                with torch.no_grad():
                    outs.append(compiled(**inputs)[0])
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [r["dense"] for r in h.records() if r["layer"] == 1] == [True, True, False, False]
    h.remove()
    torch._dynamo.reset()
