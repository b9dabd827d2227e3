"""enable_svg2 on a tiny random HunyuanVideoTransformer3DModel: joint video+text attention, padded text."""

from __future__ import annotations

import pytest
import torch

from svg2 import enable_svg2
from tests.tiny_diffusers import TINY_CFG, hunyuan_inputs, tiny_hunyuan


@pytest.fixture(scope="module")
def model():
    return tiny_hunyuan()


def _run(m, **kw):
    with torch.no_grad():
        return m(**kw)[0]


def test_dense_parity_padded_text(model):
    inputs = hunyuan_inputs()  # batch 2: 12 and 5 real text tokens out of 12
    ref = _run(model, **inputs)
    refiner = [b.attn.processor for b in model.context_embedder.token_refiner.refiner_blocks]
    h = enable_svg2(model, method="dense", num_steps=1)
    assert [b.attn.processor for b in model.context_embedder.token_refiner.refiner_blocks] == refiner
    torch.testing.assert_close(_run(model, **inputs), ref, rtol=0, atol=1e-6)
    assert h.stats()["num_calls"] == 4  # 2 dual-stream + 2 single-stream blocks
    h.remove()
    assert torch.equal(_run(model, **inputs), ref)


def test_top_p_one_equals_dense(model):
    inputs = hunyuan_inputs()
    ref = _run(model, **inputs)
    with enable_svg2(model, TINY_CFG, num_steps=1, top_p=1.0, min_kc_ratio=1.0):
        torch.testing.assert_close(_run(model, **inputs), ref, rtol=1e-5, atol=1e-5)


def test_sparse_respects_text_padding(model):
    """Video tokens clustered, text dense, padded text keys masked: the content of padded text positions
    cannot change the video output, dense or sparse."""
    inputs = hunyuan_inputs()
    other = dict(inputs)
    ehs = inputs["encoder_hidden_states"].clone()
    ehs[1, 5:] = 100.0 * torch.randn_like(ehs[1, 5:])  # sample 1 has 5 real tokens
    other["encoder_hidden_states"] = ehs
    with enable_svg2(model, TINY_CFG, num_steps=1) as h:
        a = _run(model, **inputs)
        h.reset()  # same cold start for both calls
        b = _run(model, **other)
        s = h.stats()
    assert 0 < s["mean_sparse_density"] < 1
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_schedule_steps_and_branches(model):
    # The HunyuanVideo pipeline names the branch but gives no step index: calls are counted.
    h = enable_svg2(model, TINY_CFG.replace(dense_steps_frac=0.5, dense_layers=1), num_steps=4)
    inputs = hunyuan_inputs(batch=1, real=(7,))
    for _ in range(4):
        for name in ("cond", "uncond"):
            with model.cache_context(name):
                _run(model, **inputs)
    rows = h.records()
    h.remove()
    for r in rows:
        assert r["dense"] == (r["step"] < 2 or r["layer"] < 1), r
    assert {(r["step"], r["branch"]) for r in rows} == {(i, b) for i in range(4) for b in ("cond", "uncond")}
    layers = {r["layer"] for r in rows}
    assert layers == {0, 1, 2, 3}  # dual-stream blocks 0-1, single-stream blocks 2-3
