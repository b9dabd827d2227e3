"""Every config of conf/ composes (every option of every group, every experiment preset)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from svg2.config import SVG2Config
from svg2.harness.runner import job_identity, method_spec
from svg2.harness.schema import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "method", "kernel", "prompts", "metrics", "logger", "launcher"]
register_configs()


def _compose(overrides: list[str], hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    if group == "launcher" and ("slurm" in option or option == "lanes"):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                            reason="submitit launchers (SLURM, lanes) need the 'dist' extra: pip install -e '.[dist]'")
    cfg = _compose([f"{group}={option}"], hydra_cfg=(group == "launcher"))
    OmegaConf.to_container(cfg, resolve=False)  # the whole tree is valid
    if group == "model":
        assert cfg.model.name == option
        SVG2Config.from_dict({k: v for k, v in OmegaConf.to_container(cfg.model.svg2).items() if v is not None})
    if group == "method":
        spec = method_spec(cfg)
        assert spec.name == cfg.method.name


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes(preset):
    if "/launcher: lanes" in (CONF / "experiment" / f"{preset}.yaml").read_text():
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                            reason=f"experiment={preset} runs in lanes (submitit): pip install -e '.[dist]'")
    cfg = _compose([f"experiment={preset}"], hydra_cfg=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN, "presets sweep without -m"
    params = cfg.hydra.sweeper.params
    assert params, f"experiment={preset} has no hydra.sweeper.params"
    # Every swept value composes too (first value of each parameter on top of the preset).
    firsts = [f"{k}={str(v).split(',')[0]}" for k, v in params.items()]
    cfg2 = _compose([f"experiment={preset}", *firsts])
    method_spec(cfg2)


def test_paper_presets_carry_the_authors_settings():
    cfg = _compose(["model=wan2.1-t2v-14b"])
    assert (cfg.model.svg2.num_q_centroids, cfg.model.svg2.num_k_centroids) == (300, 1000)
    assert cfg.model.num_steps == 50 and cfg.model.svg2.dense_steps_frac == 0.2
    cfg = _compose(["model=hunyuanvideo-t2v-720p"])
    assert cfg.model.svg2.num_q_centroids == 400 and cfg.model.num_frames == 129


def test_typos_and_bad_types_fail_at_composition():
    with pytest.raises(Exception, match="top_p"):
        _compose(["method.cfg.top_p=high"])  # SVG2 knobs are typed in method.cfg
    with pytest.raises(Exception, match="nonsense"):
        _compose(["model.nonsense=1"])
    with pytest.raises(Exception, match="kwargs"):
        _compose(["method.kwargs.block_size=2"])  # gone: a method's parameters live in method.cfg only


def test_unknown_method_parameter_names_the_accepted_ones():
    # method.cfg also holds a method's own parameters (an open node: no `+` needed), so a typo composes and
    # method_spec rejects it, naming what the method's class takes.
    with pytest.raises(ValueError, match=r"top_pp.*it takes: .*top_p") as e:
        method_spec(_compose(["method.cfg.top_pp=0.5"]))
    assert "dense_steps_frac" in str(e.value) and "num_q_centroids" in str(e.value)
    with pytest.raises(ValueError, match=r"positional.*threshold.*it takes: .*block_size.*min_kc_ratio"):
        method_spec(_compose(["method=positional", "method.cfg.threshold=2.0"]))
    with pytest.raises(ValueError, match=r"block_size.*it takes: none"):
        method_spec(_compose(["method=dense", "method.cfg.block_size=32"]))
    with pytest.raises(ValueError, match="kernel group"):
        method_spec(_compose(["method=positional", "+method.cfg.attention_kernel=torch"]))
    # A method's own parameter not in its YAML is set without `+`.
    spec = method_spec(_compose(["method=sol_attn", "method.cfg.threshold=2.0"]))
    assert spec.kwargs["threshold"] == 2.0


@pytest.mark.parametrize("option", _options("method"))
def test_every_method_config_builds_its_method(option):
    spec = method_spec(_compose([f"method={option}", "model=wan2.1-t2v-14b"]))
    cls = spec.method_cls
    assert cls is not None and spec.stock == cls.stock
    if spec.stock:
        with pytest.raises(ValueError, match="stock"):
            spec.build()
        return
    method = spec.build()
    assert isinstance(method, cls)
    described = method.describe()
    # The shared schedule comes from the model preset, one place for it.
    assert described.get("dense_steps_frac", 0.2) == 0.2
    own = {k: v for k, v in OmegaConf.to_container(_compose([f"method={option}"]).method.cfg).items()
           if v is not None}
    assert set(own) <= cls.parameters()


def test_stock_is_a_property_of_the_class():
    from svg2.methods import AttentionMethod, method_class
    from svg2.methods.dense import DenseMethod, StockAttention

    cfg = _compose(["method=dense"])
    assert "stock" not in cfg.method  # no routing keys left in a method config
    assert method_class(cfg.method.target) is StockAttention and StockAttention.stock
    spec = method_spec(cfg)
    assert spec.stock and spec.cfg is None and spec.kwargs == {}
    # Any class can be stock: the harness asks the class, not the YAML.
    mod = type("MyStock", (AttentionMethod,), {"stock": True})
    import sys
    import types

    sys.modules["_svg2_test_stock"] = types.SimpleNamespace(MyStock=mod)  # type: ignore[assignment]
    try:
        spec = method_spec(_compose(["method=svg2", "method.target=_svg2_test_stock:MyStock"]))
        assert spec.stock and spec.kwargs == {} and spec.cfg is None
    finally:
        del sys.modules["_svg2_test_stock"]
    spec = method_spec(_compose(["method=dense_svg2"]))  # the same name through svg2's processors
    assert not spec.stock and spec.method_cls is DenseMethod and spec.name == "dense"
    # enable_svg2 has nothing to install for a stock method, and says so.
    from svg2 import enable_svg2
    from tests.tiny_diffusers import tiny_wan

    with pytest.raises(ValueError, match="nothing to install"):
        enable_svg2(tiny_wan(num_layers=1), method=StockAttention(), num_steps=1)


def test_method_spec_merges_model_defaults_method_cfg_and_kernel():
    cfg = _compose(["model=wan2.1-t2v-14b", "method=svg2", "method.cfg.top_p=0.7", "kernel=torch"])
    spec = method_spec(cfg)
    assert spec.cfg.top_p == 0.7 and spec.cfg.num_q_centroids == 300
    assert spec.cfg.attention_kernel == "torch" and spec.cfg.kmeans_kernel == "torch"
    # Baselines get the SVG2 knobs they take; dense gets nothing, so svg2 knobs do not change its row key.
    svg1 = method_spec(_compose(["method=svg1", "model=wan2.1-t2v-14b", "method.cfg.dense_steps_frac=0.3"]))
    assert svg1.cfg is None and svg1.kwargs["dense_steps_frac"] == 0.3 and "top_p" not in svg1.kwargs
    assert svg1.kwargs["dense_layers"] == 1 and svg1.kwargs["density"] == 0.25  # preset, and svg1's own
    pos = method_spec(_compose(["method=positional", "model.svg2.dense_steps_frac=0.4", "method.cfg.top_p=0.5"]))
    assert pos.kwargs["dense_steps_frac"] == 0.4 and pos.kwargs["top_p"] == 0.5  # top_p: positional's own
    d1 = _compose(["method=dense", "method.cfg.top_p=0.5"])
    d2 = _compose(["method=dense", "method.cfg.top_p=0.9"])
    assert job_identity(d1, method_spec(d1)) == job_identity(d2, method_spec(d2))
    s1 = _compose(["method=svg2", "method.cfg.top_p=0.5"])
    s2 = _compose(["method=svg2", "method.cfg.top_p=0.9"])
    assert job_identity(s1, method_spec(s1)) != job_identity(s2, method_spec(s2))


def test_out_of_range_knob_is_a_clear_error():
    with pytest.raises(ValueError, match="top_p"):
        method_spec(_compose(["method.cfg.top_p=1.5"]))


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["experiment=quickstart"], 6),  # method: dense,svg2 x top_p: 3 values
        (["experiment=quickstart", "method.cfg.top_p=0.5"], 2),  # the command line wins over the preset
        (["experiment=baselines"], 27),  # 9 methods (dense_floor the noise floor) x 3 target densities
        (["experiment=pareto"], 32),  # 2 methods x 4 top_p x 2 Cq x 2 Ck (dense rows repeat: skipped by key)
    ],
)
def test_count_sweep_jobs(overrides, expected):
    from svg2.harness.callbacks import count_sweep_jobs

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert count_sweep_jobs(cfg) == expected


def test_kernel_tiles_are_set_from_the_command_line():
    spec = method_spec(_compose(["kernel=triton_tma", "kernel.tiles.block_m=64", "kernel.tiles.num_warps=4"]))
    assert (spec.cfg.attention_tiles.block_m, spec.cfg.attention_tiles.num_warps) == (64, 4)
    pos = method_spec(_compose(["method=positional", "kernel.tiles.block_n=32"]))
    assert pos.kwargs["attention_tiles"] == {"block_n": 32} and pos.kwargs["attention_kernel"] == "auto"
    with pytest.raises(Exception, match="block_mm"):
        _compose(["kernel.tiles.block_mm=64"])
