"""Every job of an svg2-run invocation is checked before the first starts (issue 20, items 12, 14, 15): bad SVG2
ranges, kernel names, method parameters, edge values and prompt files fail in seconds with one line each and
exit status 2, before any model load; model-load hints name the `hf` command; svg2_attention takes a dict cfg;
svg2-bench refuses without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from svg2 import SVG2Config, svg2_attention
from svg2.attention import build_layout
from svg2.harness.models import load_hint
from svg2.harness.runner import method_spec
from svg2.harness.schema import register_configs
from svg2.harness.validation import check_run_config, sweep_job_overrides
from tests.helpers import run_svg2_cli

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _compose(overrides, hydra_cfg=False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("overrides,expected", [
    (["method.cfg.top_p=1.5"], "SVG2Config.top_p=1.5 is out of range"),
    (["kernel.attention=nope"], "unknown attention kernel 'nope'; known:"),
    (["kernel.kmeans=nope"], "unknown k-means kernel 'nope'"),
    (["+method.cfg.top_pp=0.9"], "takes no parameter top_pp; it takes:"),
    (["prompts.limit=-1"], "prompts.limit=-1: use a whole number >= 1"),
    (["prompts.limit=0"], "prompts.limit=0: use a whole number >= 1"),
    (["seeds=[]"], "seeds=[]: list at least one seed"),
    (["model.num_frames=0"], "model.num_frames=0: use a whole number >= 1"),
    (["model.num_steps=0"], "model.num_steps=0: use a whole number >= 1"),
    (["model.num_frames=8"], "Wan needs 4k+1 frames (e.g. 9, 81)"),
    (["model.height=40"], "model.height=40: Wan needs a multiple of 16"),
    (["batch_size=0"], "batch_size=0"),
    (["prompts=file", "prompts.path=/no/such/prompts.txt"], "prompt file '/no/such/prompts.txt' does not exist"),
    (["prompts.dimensions=[nope]"], "prompts.dimensions ['nope'] not in this set"),
    (["metrics.compare_on=[disk]"], "metrics.compare_on=['disk']: use memory and/or mp4"),
    (["model=wan2.1-t2v-1.3b", "model.repo_id=/no/such/wan"], "local folder that does not exist"),
    (["model=wan2.1-t2v-1.3b", "model.loader=random", "+model.kwargs={transformer: {nope: 1}}"],
     "model.kwargs.transformer: unknown field(s) ['nope']"),
])
def test_bad_values_are_named_with_the_fix(overrides, expected):
    problems = check_run_config(_compose(overrides))
    assert len(problems) == 1 and expected in problems[0], problems


def test_good_configs_have_no_problem():
    assert check_run_config(_compose([])) == []
    assert check_run_config(_compose(["model=wan2.1-t2v-14b", "model.loader=random"])) == []
    for preset in ("quickstart", "testbed"):
        cfg = _compose([f"experiment={preset}"])
        assert check_run_config(cfg) == [], preset


def test_missing_weights_offline_name_hf_download():
    # conftest sets HF_HUB_OFFLINE=1 and no Wan checkpoint is in the test cache
    (msg,) = check_run_config(_compose(["model=wan2.1-t2v-1.3b"]))
    assert "`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers`" in msg and "huggingface-cli" not in msg
    assert "--local-dir <dir>" in msg and "model.loader=random" in msg
    # a local folder is not a Hub id: the hint downloads a Hub id *into* it
    hint = load_hint(OmegaConf.create({"name": "m", "repo_id": "/data/wan14b"}))
    assert "hf download <hub id> --local-dir /data/wan14b" in hint and "hf download /data" not in hint


def test_testbed_preset_lists_the_method_table():
    jobs = sweep_job_overrides(_compose(["experiment=testbed"], hydra_cfg=True))
    methods = {o.split("=", 1)[1] for j in jobs for o in j if o.startswith("method=")}
    assert methods == {"dense", "dense_floor", "svg2", "svg2_compensated", "svg_ear", "positional", "sol_attn",
                       "svg1", "radial", "sliding_tile", "oracle_kmeans"}
    comp = method_spec(_compose(["experiment=testbed", "method=svg2_compensated", "method.cfg.target_density=0.15"]))
    plain = method_spec(_compose(["experiment=testbed", "method=svg2", "method.cfg.target_density=0.15"]))
    assert comp.name == plain.name == "svg2"
    assert comp.cfg.compensate is True and plain.cfg.compensate is False
    # the same rows as method=svg2 method.cfg.compensate=true (experiments/testbed_tables.sh): one row key
    same = method_spec(_compose(["experiment=testbed", "method=svg2", "method.cfg.compensate=true",
                                 "method.cfg.target_density=0.15"]))
    assert comp.identity() == same.identity() != plain.identity()
    for j in jobs:  # every job of the preset passes validation (dense refuses compensate: none asks it to)
        assert check_run_config(_compose(["experiment=testbed", *j])) == [], j


def test_sweep_jobs_are_listed_like_the_basic_sweeper():
    cfg = _compose(["experiment=quickstart", "seeds=[0,1]"], hydra_cfg=True)
    jobs = sweep_job_overrides(cfg)
    assert len(jobs) == 6 and all("seeds=[0,1]" in j for j in jobs)
    top_p = {o for j in jobs for o in j if o.startswith("method.cfg.top_p=")}
    assert top_p == {"method.cfg.top_p=0.5", "method.cfg.top_p=0.75", "method.cfg.top_p=0.9"}
    assert {o for j in jobs for o in j if o.startswith("method=")} == {"method=dense", "method=svg2"}


def test_invalid_sweep_stops_before_any_job(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    code, out = run_svg2_cli(["-m", "model=tiny", "method=dense,svg2", "kernel.attention=auto,nope", "prompts.limit=1",
                           f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          monkeypatch, capfd)
    assert code == 2
    assert "2 of 4 job(s) cannot run; nothing was started" in out
    assert "method=dense kernel.attention=nope:" in out and "unknown attention kernel 'nope'" in out
    assert "Traceback" not in out
    assert not (tmp_path / "sweep" / "results").exists() and not (tmp_path / "cache").exists()


def test_bad_prompt_file_is_one_line_no_traceback(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "prompts.json"
    bad.write_text("{not json")
    code, out = run_svg2_cli(["model=tiny", "prompts=file", f"prompts.path={bad}", f"cache.dir={tmp_path / 'c'}"],
                          monkeypatch, capfd)
    assert code == 2 and "is not valid JSON" in out and "Traceback" not in out
    assert not (tmp_path / "outputs").exists()  # nothing started: no run folder


def test_svg2_attention_takes_a_dict_cfg_like_enable_svg2():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    knobs = dict(num_q_centroids=4, num_k_centroids=8, kmeans_iters_init=3, top_p=0.8)
    out_d, layout_d = svg2_attention(q, k, v, knobs)
    out_c, layout_c = svg2_attention(q, k, v, SVG2Config(**knobs))
    assert torch.equal(out_d, out_c) and layout_d.density() == layout_c.density()
    assert build_layout(q, k, knobs).density() == layout_c.density()
    with pytest.raises(KeyError, match="unknown SVG2Config key"):
        svg2_attention(q, k, v, {"top_pp": 0.8})


def test_kernel_names_are_checked_when_the_config_is_built():
    with pytest.raises(KeyError, match=r"SVG2Config.attention_kernel: unknown attention kernel 'nope'"):
        SVG2Config(attention_kernel="nope")
    with pytest.raises(KeyError, match=r"SVG2Config.kmeans_kernel: unknown k-means kernel"):
        SVG2Config(kmeans_kernel="trion")
    assert SVG2Config(attention_kernel="torch", kmeans_kernel="torch").attention_kernel == "torch"


def test_svg2_bench_refuses_without_a_gpu(monkeypatch, capsys):
    import experiments.bench_kernels as bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run", lambda cfg: pytest.fail("svg2-bench started a run without a GPU"))
    with pytest.raises(SystemExit) as e:
        bench.main([])
    assert "needs an NVIDIA GPU" in str(e.value.code) and "nothing was run" in str(e.value.code)
    assert capsys.readouterr().out == ""  # no rows, no "nan ms"
    with pytest.raises(SystemExit, match=r"unknown shape\(s\) \['wan15b'\]"):
        bench.parse_overrides(["shapes=[wan15b]"])
