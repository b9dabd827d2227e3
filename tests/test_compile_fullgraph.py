"""torch.compile with SVG2 enabled: a transformer block compiles with ``fullgraph=True`` (the attention core is one
opaque custom op, ``torch.ops.svg2.attention_site``), compiled output equals eager, and regional compilation of a
whole model needs one graph per block class across the dense -> sparse steps (no recompile per step or block)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from svg2 import enable_svg2
from svg2.integrations.opaque import register_site, site_of
from tests.tiny_diffusers import TINY_CFG, hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _block_inputs(model: torch.nn.Module, block: torch.nn.Module, inputs: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) ``block`` receives in one forward of ``model``."""
    seen: dict = {}

    def hook(mod, args, kwargs):
        seen["call"] = (args, kwargs)

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["call"]


def _out(x):
    return x[0] if isinstance(x, tuple) else x


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("family", ["wan", "hunyuan_dual", "hunyuan_single"])
def test_block_fullgraph_equals_eager(family, backend):
    model = tiny_wan() if family == "wan" else tiny_hunyuan()
    inputs = wan_inputs() if family == "wan" else hunyuan_inputs()
    block = {"wan": lambda: model.blocks[1], "hunyuan_dual": lambda: model.transformer_blocks[1],
             "hunyuan_single": lambda: model.single_transformer_blocks[0]}[family]()
    handle = enable_svg2(model, TINY_CFG, num_steps=1)
    handle.set_step(0, num_steps=1)
    args, kwargs = _block_inputs(model, block, inputs)
    handle.reset()
    handle.set_step(0, num_steps=1)
    with torch.no_grad():
        ref = _out(block(*args, **kwargs))
    ref_records = handle.records()
    handle.reset()  # the compiled call starts from the same (cold) cluster state
    handle.set_step(0, num_steps=1)
    compiled = torch.compile(block, fullgraph=True, backend=backend)  # raises on any graph break
    with torch.no_grad():
        out = _out(compiled(*args, **kwargs))
    assert not counters["graph_break"]
    rows = handle.records()
    assert len(rows) == len(ref_records) == 1 and not rows[0]["dense"]  # the sparse path ran inside the graph
    assert rows[0]["density"] == pytest.approx(ref_records[0]["density"])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    handle.remove()


def test_regional_compile_one_graph_across_steps_and_blocks():
    """compile_repeated_blocks (what bench_e2e --compile uses): dense warm-up steps then sparse steps, every block
    through one graph, equal to eager at every step."""
    model = tiny_wan()
    inputs = wan_inputs()
    handle = enable_svg2(model, TINY_CFG.replace(dense_steps_frac=0.5), num_steps=4)

    def loop() -> list[torch.Tensor]:
        handle.reset()
        outs = []
        for step in range(4):
            handle.set_step(step, num_steps=4)
            with torch.no_grad():
                outs.append(model(**inputs)[0])
        return outs

    eager = loop()
    eager_rows = handle.records()
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    compiled = loop()
    rows = handle.records()
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every block, dense and sparse steps alike
    assert not counters["graph_break"]
    assert [(r["layer"], r["step"], r["dense"]) for r in rows] == [(r["layer"], r["step"], r["dense"])
                                                                  for r in eager_rows]
    assert {r["dense"] for r in rows} == {True, False}
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    handle.remove()


def test_inductor_block_matches_eager():
    model = tiny_wan()
    handle = enable_svg2(model, TINY_CFG, num_steps=1)
    handle.set_step(0, num_steps=1)
    args, kwargs = _block_inputs(model, model.blocks[1], wan_inputs())
    handle.reset()
    handle.set_step(0, num_steps=1)
    with torch.no_grad():
        ref = model.blocks[1](*args, **kwargs)
    handle.reset()
    handle.set_step(0, num_steps=1)
    with torch.no_grad():
        out = torch.compile(model.blocks[1], fullgraph=True, backend="inductor")(*args, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    handle.remove()


def test_custom_op_opcheck():
    """The op's registration (schema, fake implementation, no aliasing) passes torch.library.opcheck."""
    model = tiny_wan()
    handle = enable_svg2(model, method="dense", num_steps=1)
    core = model.blocks[0].attn1.processor.core
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    torch.library.opcheck(torch.ops.svg2.attention_site.default, (q, k, v, core._site, 0, None))
    handle.remove()


def test_site_registry_is_weak_and_explains_a_stale_graph():
    class Core:
        def _run_impl(self, q, k, v, num_text_tokens, text_mask, heads):
            return q

    core = Core()
    site = register_site(core)
    assert site_of(site) is core
    del core
    with pytest.raises(RuntimeError, match="torch._dynamo.reset"):
        site_of(site)
