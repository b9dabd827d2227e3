"""Ulysses sequence parallelism on CPU: two gloo processes run a tiny Wan transformer under diffusers' context
parallelism and must reproduce the single-process output (fp32), dense and SVG2 (top_p = 1 and defaults).

One spawn (two processes) computes every scenario; the tests below check its results.
"""

from __future__ import annotations

import pytest
import torch

from svg2 import SVG2Config, enable_svg2
from svg2.parallel import check_ulysses_support, run_on_ranks
from svg2.parallel.ulysses import UlyssesGroup, ulysses_attention
from tests.tiny_diffusers import TINY_CFG, tiny_hunyuan, wan_inputs

HEADS = 4  # two local heads per rank: checks the head order of the exchange
STEPS = 3
SCENARIOS = {
    # name: (method, cfg, method kwargs)
    "dense": ("dense", None, {}),
    "svg2_top_p_1": ("svg2", TINY_CFG, dict(top_p=1.0, min_kc_ratio=1.0)),
    "svg2_tiny_defaults": ("svg2", TINY_CFG, {}),
    "svg2_target_density": ("svg2", TINY_CFG, dict(target_density=0.25)),
    # SVG2Config() defaults: dense warm-up step and layer, 100 / 500 centroids (capped at 256 tokens)
    "svg2_defaults": ("svg2", SVG2Config(kmeans_iters_init=10), {}),
}


def wan(heads: int = HEADS, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    ).eval()


def _loop(model, inputs, steps=STEPS):
    """The transformer calls of a CFG denoising loop (cond, uncond per step), as Wan's pipeline makes them."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for branch in ("cond", "uncond"):
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    outs.append(model(**inputs)[0])
    return torch.stack(outs)


def _scenario(model, inputs, name):
    method, cfg, kw = SCENARIOS[name]
    h = enable_svg2(model, cfg, method=method, num_steps=STEPS, **kw)
    out = _loop(model, inputs)
    records = h.records()
    return h, out, records


def _worker(rank, world, path):
    from svg2.parallel import enable_ulysses, gather_rank_records
    from svg2.parallel.ulysses import _dim_exchange_fallback, global_stats, heads_to_seq, seq_to_heads, ulysses_group

    inputs = wan_inputs(batch=2, seed=3)
    model = wan()
    ref = {"stock": _loop(model, inputs, steps=1)}
    ref_density, ref_stats = {}, {}
    for name in SCENARIOS:
        h, ref[name], recs = _scenario(model, inputs, name)
        ref_density[name] = [r["density"] for r in recs]
        ref_stats[name] = h.stats()
        h.remove()

    # svg2 enabled after the sequence is sharded: our processors inherit the stock processors' config.
    config = enable_ulysses(model, world)
    got = {"stock": _loop(model, inputs, steps=1)}
    got_density, got_stats = {}, {}
    for name in SCENARIOS:
        h, got[name], _ = _scenario(model, inputs, name)
        got_stats[name] = global_stats(h)
        by_call: dict[tuple, list[float]] = {}
        for r in gather_rank_records(h):
            by_call.setdefault((r["layer"], r["step"], r["branch"]), []).append(r["density"])
        got_density[name] = [sum(v) / len(v) for v in by_call.values()]
        h.remove()

    # svg2 enabled first, then the sharding: diffusers hands its config to our processors.
    model2 = wan()
    h = enable_svg2(model2, TINY_CFG, num_steps=STEPS)
    enable_ulysses(model2, world)
    got["svg2_enabled_first"] = _loop(model2, inputs)
    h.remove()

    # The exchange itself: a round trip, and diffusers' helper against the torch.distributed fallback.
    g = ulysses_group(config)
    x = torch.randn(2, 8, HEADS, 4, generator=torch.Generator().manual_seed(rank))
    y = seq_to_heads(x, g)
    exchange = dict(roundtrip=torch.equal(heads_to_seq(y, g), x), shape=tuple(y.shape),
                    fallback=torch.equal(_dim_exchange_fallback(x, 2, 1, g.group), y),
                    fallback_back=torch.equal(_dim_exchange_fallback(y, 1, 2, g.group), x), local_rank=g.rank)
    torch.save(dict(ref=ref, got=got, ref_density=ref_density, got_density=got_density, exchange=exchange,
                    ref_stats=ref_stats, got_stats=got_stats),
               f"{path}/rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("ulysses")
    run_on_ranks(_worker, 2, str(path))
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_exchange_roundtrip_and_fallback(results):
    for rank, res in enumerate(results):
        ex = res["exchange"]
        assert ex["roundtrip"] and ex["fallback"] and ex["fallback_back"]
        assert ex["shape"] == (2, 16, HEADS // 2, 4) and ex["local_rank"] == rank


def test_stock_context_parallel_matches(results):
    for res in results:
        torch.testing.assert_close(res["got"]["stock"], res["ref"]["stock"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(results, name):
    for res in results:  # proj_out gathers the sequence: every rank holds the full output
        ref, got = res["ref"][name], res["got"][name]
        assert got.shape == ref.shape == (2 * STEPS, 2, 4, 4, 16, 16)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if name != "dense":  # the per-rank densities (local heads) average to the single-process ones
        assert results[0]["got_density"][name] == pytest.approx(results[0]["ref_density"][name], abs=1e-6)
    for res in results:  # global_stats: the handle's summary over all ranks' heads
        for k in ("mean_density", "num_calls", "num_dense_calls", "density_per_layer"):
            assert res["got_stats"][name][k] == pytest.approx(res["ref_stats"][name][k], abs=1e-6), k


def test_svg2_enabled_before_sharding(results):
    for res in results:
        torch.testing.assert_close(res["got"]["svg2_enabled_first"], res["ref"]["svg2_tiny_defaults"],
                                   rtol=1e-5, atol=1e-5)


def test_sparse_scenarios_are_really_sparse(results):
    dens = results[0]["ref_density"]
    assert min(dens["svg2_tiny_defaults"]) < 0.9
    assert max(dens["svg2_top_p_1"]) == pytest.approx(1.0)


# -- errors (no process group needed) -----------------------------------------------------------------------

def test_heads_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3 attention heads.*ulysses_degree=2.*\[1, 3\]"):
        check_ulysses_support(wan(heads=3), 2)
    q = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="3 heads do not divide by ulysses_degree=2"):
        ulysses_attention(lambda *a: a[0], q, q, q, UlyssesGroup(group=None, size=2, rank=0))


def test_hunyuan_names_the_missing_plan():
    with pytest.raises(NotImplementedError, match=r"HunyuanVideoTransformer3DModel has no context-parallel plan"):
        check_ulysses_support(tiny_hunyuan(), 2)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="HunyuanVideo"):
        ulysses_attention(lambda *a: a[0], q, q, q, UlyssesGroup(group=None, size=2, rank=0), num_text_tokens=4)


def test_ring_degree_is_refused():
    from types import SimpleNamespace

    from svg2.parallel.ulysses import ulysses_group

    cp = SimpleNamespace(_world_size=2, ring_degree=2, ulysses_degree=1, ulysses_anything=False)
    with pytest.raises(NotImplementedError, match="k-means needs every key"):
        ulysses_group(SimpleNamespace(context_parallel_config=cp))
    assert ulysses_group(None) is None
