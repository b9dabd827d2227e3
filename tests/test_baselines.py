"""Baselines on the shared variable-block kernel: svg1, positional, radial, sliding_tile, oracle (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.recall import attention_recall, method_layout
from analysis.synthetic import synthetic_qkv
from svg2.attention import dense_attention
from svg2.methods import AttentionContext, MethodState, build_method
from svg2.methods.radial import radial_block_map
from svg2.methods.sliding_tile import sta_block_map, tile_labels
from svg2.methods.svg1 import svg1_block_map

SHAPE = (4, 4, 4)  # frames, height, width in tokens
SV = math.prod(SHAPE)
SPARSE = dict(dense_steps_frac=0.0, dense_layers=0)

CONFIGS = {
    "svg1": dict(block_size=8, num_sampled_rows=16),
    "positional": dict(block_size=8, top_p=0.7),
    "positional_density": dict(block_size=4, target_density=0.3),
    "radial": dict(block_size=4),
    "radial_density": dict(block_size=4, target_density=0.5),
    "sliding_tile": dict(tile_size=(1, 2, 2), window=(3, 1, 1)),
    "oracle_raster": dict(partition="raster", block_size=4, target_density=0.3),
    "oracle_kmeans": dict(partition="kmeans", num_q_centroids=6, num_k_centroids=10, kmeans_iters_init=5),
}


def _method(key: str, **extra):
    name = key.split("_density")[0].replace("oracle_raster", "oracle").replace("oracle_kmeans", "oracle")
    return build_method(name, **SPARSE, **CONFIGS[key], **extra)


def _ctx(text: int = 0, text_mask=None, **kw) -> AttentionContext:
    kw.setdefault("layer_index", 2)
    kw.setdefault("step_index", 7)
    kw.setdefault("num_steps", 10)
    return AttentionContext(num_text_tokens=text, text_mask=text_mask, state=MethodState(),
                            extra={"video_shape": SHAPE}, **kw)


def _inputs(batch=2, heads=2, text=0, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, SV + text, d, generator=g) for _ in range(3))


def _masked_dense(q, k, v, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.double()).float()


@pytest.mark.parametrize("key", list(CONFIGS))
def test_layout_shape_and_density(key):
    q, k, v = _inputs()
    method = _method(key)
    layout = method.layout(q, k, v, _ctx())
    b, h = q.shape[:2]
    assert tuple(layout.q_labels.shape) == (b, h, SV) and tuple(layout.k_labels.shape) == (b, h, SV)
    assert layout.block_map.shape[:2] == (b, h) and layout.block_map.dtype == torch.bool
    assert int(layout.q_sizes.sum(-1).min()) == SV and int(layout.k_sizes.sum(-1).min()) == SV
    mask = layout.to_dense()
    assert tuple(mask.shape) == (b, h, SV, SV)
    torch.testing.assert_close(layout.density_per_head(), mask.double().mean((-1, -2)))
    assert bool((mask.any(-1)).all()), "every query row must attend to at least one key"
    # The recorded density is the same quantity, recorded like SVG2 does.
    ctx = _ctx()
    method(q, k, v, ctx)
    (rec,) = ctx.state.resolved_records()
    assert rec["method"] == method.name and rec["dense"] is False and rec["kernel"]
    assert rec["density"] == pytest.approx(float(mask.double().mean()), abs=1e-6)


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("text", [0, 3])
def test_output_equals_masked_dense(key, text):
    q, k, v = _inputs(text=text)
    text_mask = None
    if text:
        text_mask = torch.tensor([[True, True, False], [True, True, True]])
    layout = _method(key).layout(q, k, v, _ctx(text, text_mask))
    out = _method(key)(q, k, v, _ctx(text, text_mask))
    ref = _masked_dense(q, k, v, layout.to_dense())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_dense_warmup_schedule_is_shared():
    q, k, v = _inputs()
    for name in ("svg1", "positional", "radial", "sliding_tile", "oracle"):
        method = build_method(name, dense_steps_frac=0.3, dense_layers=1)
        for layer, step, dense in ((0, 9, True), (1, 2, True), (1, 3, False)):
            ctx = _ctx(layer_index=layer, step_index=step)
            assert method.is_dense_call(ctx) is dense
        ctx = _ctx(layer_index=0, step_index=5)
        torch.testing.assert_close(method(q, k, v, ctx), dense_attention(q, k, v))
        assert ctx.state.resolved_records()[0]["dense"] is True


def test_positional_one_token_blocks_select_exact_top_p():
    q, k, v = _inputs(batch=1, heads=3, seed=1)
    top_p = 0.8
    layout = build_method("positional", block_size=1, top_p=top_p, min_kc_ratio=0.0, **SPARSE).layout(
        q, k, v, _ctx())
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    sorted_p, order = p.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # shortest prefix reaching top_p
    expect = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    assert torch.equal(layout.to_dense(), expect)


@pytest.mark.parametrize("other", ["svg1", "positional", "radial", "sliding_tile", "svg2"])
def test_oracle_recall_upper_bounds_other_methods(other):
    q, k, v = synthetic_qkv(SHAPE, ("spatial", "temporal", "semantic"), head_dim=16, seed=3)
    kwargs = {"svg2": dict(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, top_p=0.8),
              "svg1": dict(block_size=8, num_sampled_rows=16),
              "positional": dict(block_size=4, top_p=0.8),
              "radial": dict(block_size=4), "sliding_tile": dict(tile_size=(1, 2, 2), window=(3, 1, 1))}[other]
    method = build_method(other, **SPARSE, **kwargs)
    res = attention_recall(q, k, v, method_layout(method, q, k, v, _ctx()), num_rows=None)
    for h in range(q.shape[1]):
        dens = float(res.density[0, h])
        qh, kh, vh = (x[:, h:h + 1] for x in (q, k, v))
        oracle = build_method("oracle", partition="raster", block_size=1, target_density=dens, **SPARSE)
        ores = attention_recall(qh, kh, vh, oracle.layout(qh, kh, vh, _ctx()), num_rows=None)
        assert dens - 1e-9 <= float(ores.density[0, 0]) <= dens + 1.0 / SV  # equal density (greedy overshoot)
        assert float(ores.recall[0, 0]) >= float(res.recall[0, h]) - 1e-9, (other, h)


def test_svg1_classifies_synthetic_spatial_and_temporal_heads():
    shape = (8, 8, 8)
    kinds = ("spatial", "temporal") * 3
    q, k, v = synthetic_qkv(shape, kinds, head_dim=32, seed=1)
    for sink in (True, False):
        method = build_method("svg1", block_size=16, density=0.25, attention_sink=sink, **SPARSE)
        ctx = AttentionContext(extra={"video_shape": shape})
        temporal, mses = method.classify(q, k, v, ctx)
        assert temporal[0].tolist() == [kind == "temporal" for kind in kinds]
        assert tuple(mses.shape) == (2, 1, len(kinds))
        ctx = AttentionContext(extra={"video_shape": shape})
        method(q, k, v, ctx)
        assert ctx.state.resolved_records()[0]["temporal_heads"] == pytest.approx(0.5)


def test_svg1_temporal_layout_is_frame_major_band():
    # A temporal head's blocks group the same spatial positions of consecutive frames (token-major order).
    q, k, v = synthetic_qkv(SHAPE, ("temporal",), head_dim=16, seed=2)
    method = build_method("svg1", block_size=8, density=0.3, attention_sink=False, **SPARSE)
    layout = method.layout(q, k, v, _ctx())
    t, hw = SHAPE[0], SHAPE[1] * SHAPE[2]
    tok = torch.arange(SV)
    assert torch.equal(layout.q_labels[0, 0], ((tok % hw) * t + tok // hw) // 8)
    bm, width = svg1_block_map(SV, hw, 8, 0.3, False)
    assert abs(layout.density() - 0.3) < 0.1 and width >= 1
    assert torch.equal(layout.block_map[0, 0], bm)


def test_radial_mask_structure():
    t, hh, ww = 8, 4, 8
    tpf = hh * ww
    bm, sizes = radial_block_map(t, tpf, 8, 1.0, "wan")
    nc = tpf // 8
    tiles = bm.reshape(t, nc, t, nc).permute(0, 2, 1, 3)  # (query frame, key frame, chunk, chunk)
    assert bool(tiles[:, 0].all()), "first frame is an attention sink"
    assert bool(tiles[torch.arange(t), torch.arange(t)].all()), "own frame is dense"
    kept = tiles.flatten(2).float().mean(-1)  # share of each frame pair
    assert kept[0, 7] <= kept[0, 2] <= kept[0, 1] <= 1.0, "window shrinks with temporal distance"
    # HunyuanVideo keeps the whole neighbouring frame, Wan half of it.
    hy = radial_block_map(t, tpf, 8, 1.0, "hunyuan")[0].reshape(t, nc, t, nc).permute(0, 2, 1, 3)
    assert bool(hy[3, 4].all()) and not bool(tiles[3, 4].all())
    assert int(sizes.sum()) == t * tpf
    # A huge decay factor gives windows covering whole frames (no frame pair is subsampled at T=8 here).
    assert bool(radial_block_map(t, tpf, 8, 1e6, "hunyuan")[0].all())
    # Far frame pairs are subsampled once the undecayed window drops below a block (d % 2 == 0 kept).
    far = radial_block_map(20, tpf, 8, 1.0, "hunyuan")[0].reshape(20, nc, 20, nc).permute(0, 2, 1, 3)
    assert not bool(far[0, 9].any()) and bool(far[0, 10].any())


def test_sliding_tile_window_is_clamped_not_cut():
    shape, tile, window = (6, 8, 8), (2, 2, 2), (3, 3, 1)
    bm, sizes = sta_block_map(shape, tile, window)
    labels, grid = tile_labels(shape, tile)
    assert grid == (3, 4, 4) and int(sizes.sum()) == math.prod(shape) and int(sizes.min()) == 8
    # Every query tile, edge tiles included, sees exactly kt * kh * kw key tiles.
    assert bool((bm.sum(-1) == 3 * 3 * 1).all())
    # Partial edge tiles are kept as smaller tiles.
    _, sizes = sta_block_map((5, 7, 8), tile, window)
    assert int(sizes.sum()) == 5 * 7 * 8 and int(sizes.min()) == 2


def test_target_density_knob_matches_density():
    q, k, v = _inputs(batch=1, heads=1)
    for name, kw in (("sliding_tile", dict(tile_size=(1, 2, 2))), ("svg1", dict(block_size=4)),
                     ("positional", dict(block_size=4, min_kc_ratio=0.0)), ("oracle", dict(block_size=4))):
        for td in (0.25, 0.5):
            layout = build_method(name, target_density=td, **SPARSE, **kw).layout(q, k, v, _ctx())
            assert abs(layout.density() - td) <= 0.13, (name, td, layout.density())


def test_missing_or_wrong_video_shape_is_a_clear_error():
    q, k, v = _inputs()
    for name in ("svg1", "radial", "sliding_tile"):
        with pytest.raises(KeyError, match="video_shape"):
            build_method(name, **SPARSE)(q, k, v, AttentionContext())
        with pytest.raises(ValueError, match="video tokens"):
            build_method(name, **SPARSE)(q, k, v, AttentionContext(extra={"video_shape": (2, 4, 4)}))
    with pytest.raises(ValueError, match="model_type"):
        build_method("radial", model_type="cogvideo")
    with pytest.raises(ValueError, match="odd"):
        build_method("sliding_tile", window=(2, 3, 3))


def test_baselines_experiment_preset_builds_every_method():
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from svg2.harness.runner import method_spec
    from svg2.harness.schema import register_configs

    register_configs()
    conf = os.path.join(os.path.dirname(__file__), os.pardir, "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        preset = OmegaConf.load(os.path.join(conf, "experiment", "baselines.yaml"))
        methods = preset.hydra.sweeper.params.method.split(",")
        expected = {"svg2", "svg1", "positional", "radial", "sliding_tile", "oracle_raster", "oracle_kmeans"}
        assert expected <= set(methods)
        for name in methods:
            cfg = compose("config", overrides=["experiment=baselines", f"method={name}",
                                               "method.cfg.target_density=0.2"])
            spec = method_spec(cfg)
            if spec.stock or spec.name in ("dense", "dense_floor"):  # exact attention: no density knob
                continue
            method = spec.build()
            described = method.describe()
            assert 0.2 in (described.get("target_density"), described.get("density")), name
    GlobalHydra.instance().clear()


def _exact_block_mass_scatter(q, k, q_labels, k_labels, num_q_blocks, num_k_blocks, scale):
    """The definition, in float64: every probability scattered to its (query block, key block)."""
    n, sq, _ = q.shape
    p = torch.softmax(torch.matmul(q.double(), k.double().transpose(1, 2)) * scale, dim=-1)
    per_key_block = torch.zeros(n, sq, num_k_blocks, dtype=torch.float64)
    per_key_block.scatter_add_(2, k_labels[:, None, :].expand(n, sq, -1), p)
    mass = torch.zeros(n, num_q_blocks, num_k_blocks, dtype=torch.float64)
    return mass.scatter_add_(1, q_labels[:, :, None].expand(-1, -1, num_k_blocks), per_key_block)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_block_mass_on_cuda_tensor_cores_is_the_definition(dtype):
    """The CUDA path (fp32-accumulated half-precision matmuls, P split into fp16 high / low parts) against the
    float64 definition on the CPU, at a size where the rows are long."""
    from svg2.methods import oracle as oracle_mod

    g = torch.Generator().manual_seed(4)
    n, sq, sk, d, cq, ck = 6, 300, 1000, 64, 8, 24
    q = (2 * torch.randn(n, sq, d, generator=g)).to(dtype)
    k = torch.randn(n, sk, d, generator=g).to(dtype)
    lq = torch.randint(0, cq, (n, sq), generator=g)
    lk = torch.randint(0, ck, (n, sk), generator=g)
    mass = oracle_mod.exact_block_mass(q.cuda(), k.cuda(), lq.cuda(), lk.cuda(), cq, ck, 0.125).cpu()
    ref = _exact_block_mass_scatter(q, k, lq, lk, cq, ck, 0.125)
    torch.testing.assert_close(mass.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_elems", [1 << 26, 1 << 12, 37])  # one chunk; many row chunks; head groups of one
def test_exact_block_mass_is_the_scatter_definition(monkeypatch, chunk_elems):
    """The matmul form (query blocks reduced first, keys once at the end) equals the definition (every
    probability scattered to its (query block, key block)) in float64, whatever the chunking; rows sum to the
    block sizes; labels need not be contiguous or sorted; Sq != Sk."""
    from svg2.methods import oracle as oracle_mod

    monkeypatch.setattr(oracle_mod, "_CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(3)
    n, sq, sk, d, cq, ck = 5, 37, 29, 8, 4, 6
    q = torch.randn(n, sq, d, generator=g, dtype=torch.bfloat16)
    k = torch.randn(n, sk, d, generator=g, dtype=torch.bfloat16)
    lq = torch.randint(0, cq, (n, sq), generator=g)
    lk = torch.randint(0, ck, (n, sk), generator=g)
    mass = oracle_mod.exact_block_mass(q, k, lq, lk, cq, ck, 0.4)
    ref = _exact_block_mass_scatter(q, k, lq, lk, cq, ck, 0.4)
    assert mass.dtype == torch.float32 and mass.shape == (n, cq, ck)
    torch.testing.assert_close(mass.double(), ref, atol=2e-6, rtol=1e-5)
    sizes = torch.stack([torch.bincount(lq[i], minlength=cq) for i in range(n)]).double()
    torch.testing.assert_close(mass.double().sum(-1), sizes, atol=1e-5, rtol=0)
