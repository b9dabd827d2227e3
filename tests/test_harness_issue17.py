"""Issue 17 through the harness and enable_svg2: config composition of svg_ear, sol_attn, compensate and
layout_every; one tiny job per new method/option; the tiny random Wan model with compensate and layout_every."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from svg2 import enable_svg2
from svg2.harness.runner import job_identity, method_spec, run_job
from svg2.harness.schema import register_configs
from tests.tiny_diffusers import TINY_CFG, tiny_wan, wan_inputs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

# As tests/test_harness_run.py: 32x32, 5 frames (8 video tokens), 2 steps, in-memory PSNR/SSIM only.
TINY = ["model=tiny", "prompts.limit=1", "model.num_steps=2", "model.num_frames=5", "model.height=32",
        "model.width=32", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4", "metrics=fast",
        "progress=false", "model.svg2.dense_steps_frac=0.0"]


def _compose(overrides, hydra_cfg=False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


def _build(spec):
    return spec.build()


def test_new_methods_compose_and_build():
    spec = method_spec(_compose(["method=svg_ear", "model=wan2.1-t2v-14b"]))
    assert spec.cfg.compensate and (spec.cfg.num_q_centroids, spec.cfg.num_k_centroids) == (300, 1000)
    assert spec.kwargs == {"gamma": 1.0, "guaranteed_ratio": 0.05}
    assert _build(spec).describe()["top_p"] == 0.9
    spec = method_spec(_compose(["method=sol_attn", "method.cfg.target_density=0.2", "method.cfg.layout_every=2"]))
    assert spec.kwargs["block_size"] == 64 and spec.kwargs["target_density"] == 0.2
    assert spec.kwargs["layout_every"] == 2 and "compensate" not in spec.kwargs
    assert _build(spec).describe()["compensate"] is True


@pytest.mark.parametrize("method", ["svg2", "positional", "svg1", "oracle", "radial", "sliding_tile"])
def test_compensate_is_sweepable_on_every_cluster_or_block_method(method):
    cfg = _compose([f"method={method}", "method.cfg.compensate=true"])
    spec = method_spec(cfg)
    assert (spec.cfg.compensate if spec.cfg else spec.kwargs["compensate"]) is True
    assert _build(spec).describe()["compensate"] is True
    off = _compose([f"method={method}", "method.cfg.compensate=false"])
    assert job_identity(cfg, spec) != job_identity(off, method_spec(off))  # its own row


def test_layout_every_rows_and_static_masks():
    ids = {job_identity(c, method_spec(c)) == job_identity(c2, method_spec(c2))
           for c, c2 in [(_compose(["method=svg2", "method.cfg.layout_every=1"]),
                          _compose(["method=svg2", "method.cfg.layout_every=2"]))]}
    assert ids == {False}
    # A static mask does not take layout_every: the knob stays out of its row key (a sweep runs it once).
    r1, r2 = _compose(["method=radial", "method.cfg.layout_every=1"]), _compose(["method=radial",
                                                                                 "method.cfg.layout_every=4"])
    assert job_identity(r1, method_spec(r1)) == job_identity(r2, method_spec(r2))
    with pytest.raises(Exception, match="layout_every"):
        method_spec(_compose(["method=svg2", "method.cfg.layout_every=0"]))


def test_layout_every_sweep_and_compensation_preset():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from svg2.harness.callbacks import count_sweep_jobs

    # `-m method=svg2,svg_ear method.cfg.layout_every=1,2,4`: every swept value composes into its own row.
    keys = set()
    for ov in OverridesParser.create().parse_overrides(["method=svg2,svg_ear", "method.cfg.layout_every=1,2,4"]):
        assert ov.is_sweep_override()
    for method in ("svg2", "svg_ear"):
        for every in (1, 2, 4):
            cfg = _compose([f"method={method}", f"method.cfg.layout_every={every}"])
            spec = method_spec(cfg)
            assert spec.cfg.layout_every == every
            keys.add(str(job_identity(cfg, spec)))
    assert len(keys) == 6
    cfg = _compose(["experiment=compensation"], hydra_cfg=True)
    assert count_sweep_jobs(cfg) == 12  # {positional, svg2} x compensate {false, true} x 3 densities


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_cache")  # one dense reference video serves every job


@pytest.mark.parametrize("overrides", [
    ["method=svg_ear"],
    ["method=sol_attn", "method.cfg.block_size=2"],
    ["method=svg2", "method.cfg.compensate=true", "method.cfg.layout_every=2"],
    ["method=positional", "method.cfg.compensate=true", "method.cfg.block_size=2"],
], ids=["svg_ear", "sol_attn", "svg2_compensate_layout_every", "positional_compensate"])
def test_one_tiny_job_per_new_method_or_option(tmp_path, cache_dir, overrides):
    cfg = _compose([*TINY, *overrides, f"cache.dir={cache_dir}"])
    counts = run_job(cfg, tmp_path / "results")
    assert counts == {"total": 1, "skipped": 0, "ok": 1, "failed": 0}


def _loop(m, steps, inputs):
    outs = []
    for i in range(steps):
        for b in ("cond", "uncond"):
            with m.cache_context(b, step_index=i, num_inference_steps=steps), torch.no_grad():
                outs.append(m(**inputs)[0])
    return outs


def test_enable_svg2_tiny_wan_with_compensation_and_layout_reuse(monkeypatch):
    import svg2.attention as attention_mod

    model = tiny_wan()
    inputs = wan_inputs()
    with torch.no_grad():
        ref = model(**inputs)[0]
    # Nothing skipped: the compensated path reproduces the dense model.
    with enable_svg2(model, TINY_CFG.replace(compensate=True), num_steps=1, top_p=1.0, min_kc_ratio=1.0):
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs)[0], ref, rtol=1e-5, atol=1e-5)
    calls = []
    real = attention_mod.kmeans
    monkeypatch.setattr(attention_mod, "kmeans", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = TINY_CFG.replace(compensate=True, layout_every=2, top_p=0.5)
    with enable_svg2(model, cfg) as h:
        outs = _loop(model, 4, inputs)
        rows = h.records()
    assert all(torch.isfinite(o).all() for o in outs)
    sites = len(model.blocks) * 2  # layers x CFG branches
    assert len(calls) == 2 * sites * 2  # k-means on Q and K, every site, at steps 0 and 2 only
    for r in rows:
        assert r["layout_reused"] == (r["step"] % 2 == 1), r
        assert r["lse"] == "torch" and r["compensation"] == "torch"
    assert 0 < h.stats()["mean_sparse_density"] < 1
    # The same run with svg_ear through enable_svg2.
    with enable_svg2(model, cfg, method="svg_ear") as h:
        outs = _loop(model, 2, inputs)
        assert {r["method"] for r in h.records()} == {"svg_ear"}
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("method", ["svg2", "svg_ear"])
def test_enable_svg2_tiny_hunyuan_compensated_text_stays_exact(method):
    from tests.tiny_diffusers import hunyuan_inputs, tiny_hunyuan

    model = tiny_hunyuan()
    inputs = hunyuan_inputs()  # batch 2, padded text (12 and 5 real tokens)
    with torch.no_grad():
        ref = model(**inputs)[0]
    cfg = TINY_CFG.replace(compensate=True)
    with enable_svg2(model, cfg, method=method, num_steps=1, top_p=1.0, min_kc_ratio=1.0):
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs)[0], ref, rtol=1e-5, atol=1e-5)
    # Padded text positions cannot leak into the video through compensation either.
    other = dict(inputs)
    ehs = inputs["encoder_hidden_states"].clone()
    ehs[1, 5:] = 100.0 * torch.randn_like(ehs[1, 5:])
    other["encoder_hidden_states"] = ehs
    with enable_svg2(model, cfg, method=method, num_steps=1, top_p=0.5) as h, torch.no_grad():
        a = model(**inputs)[0]
        h.reset()
        b = model(**other)[0]
        assert {r["lse"] for r in h.records()} == {"torch"}
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
