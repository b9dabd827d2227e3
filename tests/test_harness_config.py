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
    if group == "launcher" and "slurm" in option:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                            reason="SLURM launchers need the 'dist' extra: pip install -e '.[dist]'")
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
    with pytest.raises(Exception, match="top_pp"):
        _compose(["method.cfg.top_pp=0.5"])
    with pytest.raises(Exception, match="top_p"):
        _compose(["method.cfg.top_p=high"])
    with pytest.raises(Exception, match="nonsense"):
        _compose(["model.nonsense=1"])


def test_method_spec_merges_model_defaults_method_cfg_and_kernel():
    cfg = _compose(["model=wan2.1-t2v-14b", "method=svg2", "method.cfg.top_p=0.7", "kernel=torch"])
    spec = method_spec(cfg)
    assert spec.cfg.top_p == 0.7 and spec.cfg.num_q_centroids == 300
    assert spec.cfg.attention_kernel == "torch" and spec.cfg.kmeans_kernel == "torch"
    # Baselines get only the shared fields; dense gets nothing, so svg2 knobs do not change its row key.
    svg1 = method_spec(_compose(["method=svg1", "method.cfg.dense_steps_frac=0.3"]))
    assert svg1.cfg is None and svg1.kwargs["dense_steps_frac"] == 0.3 and "top_p" not in svg1.kwargs
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
        (["experiment=baselines"], 21),
        (["experiment=pareto"], 32),  # 2 methods x 4 top_p x 2 Cq x 2 Ck (dense rows repeat: skipped by key)
    ],
)
def test_count_sweep_jobs(overrides, expected):
    from svg2.harness.callbacks import count_sweep_jobs

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert count_sweep_jobs(cfg) == expected
