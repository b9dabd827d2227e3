"""model.loader=random (issue 20, item 19): the Wan 2.1 T2V pipelines built from the configs shipped in svg2 with
random weights, nothing downloaded. The shipped configs are the full-size models (parameter counts on the meta
device); a tiny version of the same path runs a dense and an SVG2 job offline with the network cut, and the rows
carry the stage times a dry run is for (text encoding, steps, decode, metrics, pipeline build)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from svg2.harness.random_weights import ARCHS, component_configs
from svg2.harness.runner import run_job
from svg2.harness.schema import register_configs
from svg2.harness.session import RunSession
from svg2.harness.store import ResultsStore

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

# The same components at a tiny size: what the test changes is the size, not the code path.
TINY_KWARGS = ("+model.kwargs={transformer: {num_layers: 1, num_attention_heads: 2, attention_head_dim: 16, "
               "ffn_dim: 64, text_dim: 32, freq_dim: 32}, text_encoder: {d_model: 32, d_kv: 8, d_ff: 64, "
               "num_layers: 1, num_heads: 2}, vae: {base_dim: 8}}")


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("repo,transformer_b", [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 1.42),
                                                ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 14.29)])
def test_shipped_configs_are_the_full_size_models(repo, transformer_b):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfgs = component_configs(repo)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        sizes = {name: sum(p.numel() for p in make().parameters()) / 1e9 for name, make in (
            ("transformer", lambda: WanTransformer3DModel(**cfgs["transformer"])),
            ("text_encoder", lambda: UMT5EncoderModel(UMT5Config(**cfgs["text_encoder"]))),
            ("vae", lambda: AutoencoderKLWan(**cfgs["vae"])))}
    assert sizes["transformer"] == pytest.approx(transformer_b, abs=0.01)
    assert sizes["text_encoder"] == pytest.approx(5.68, abs=0.01)  # UMT5-XXL encoder
    assert sizes["vae"] == pytest.approx(0.127, abs=0.001)
    assert cfgs["scheduler"]["prediction_type"] == "flow_prediction" and cfgs["scheduler"]["use_flow_sigmas"]


def test_every_shipped_arch_has_a_preset():
    presets = {_compose([f"model={p.stem}"]).model.repo_id for p in (CONF / "model").glob("*.yaml")}
    assert set(ARCHS) <= presets


def test_dtypes_are_those_of_a_loaded_checkpoint():
    from svg2.harness.random_weights import random_pipeline

    tiny = {"transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64,
                            "text_dim": 32, "freq_dim": 32},
            "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2},
            "vae": {"base_dim": 8}}
    pipe = random_pipeline("Wan-AI/Wan2.1-T2V-14B-Diffusers", torch.device("cpu"), torch.bfloat16, tiny)
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    t = dict(pipe.transformer.named_parameters())
    # diffusers keeps the Wan transformer's norms, time embedder and scale-shift tables in float32 at bf16 ...
    assert t["scale_shift_table"].dtype == torch.float32 and t["blocks.0.scale_shift_table"].dtype == torch.float32
    assert t["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
    assert t["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    # ... transformers keeps UMT5's `wo` in float32 only at float16: at bf16 all of it is bf16
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert pipe.text_encoder.config.vocab_size == 256384 and pipe._svg2_max_sequence_length == 512


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (HF_HUB_OFFLINE=1 is set by conftest as well)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_random_weights_generate_offline(tmp_path, no_network):
    common = ["model=wan2.1-t2v-1.3b", "model.loader=random", TINY_KWARGS, "model.device=cpu", "model.dtype=float32",
              "model.height=32", "model.width=32", "model.num_frames=5", "model.num_steps=2", "prompts.limit=1",
              "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4", "method.cfg.dense_steps_frac=0.5",
              "method.cfg.dense_layers=0",
              "metrics.lpips_nets=[alex]", "metrics.lpips_random_backbone=true", "progress=false",
              f"cache.dir={tmp_path / 'cache'}"]
    session = RunSession()
    for method in ("dense", "svg2"):
        counts = run_job(_compose([*common, f"method={method}"]), tmp_path / "results", session=session)
        assert counts["ok"] == 1, ResultsStore(tmp_path / "results").rows()
    pipe = session.pipeline(_compose([*common, "method=svg2"])).pipe  # the session's: no second build
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel" and pipe.text_encoder.config.vocab_size == 256384
    assert type(pipe.vae).__name__ == "AutoencoderKLWan" and pipe.transformer.config.num_layers == 1
    assert pipe.scheduler.config.flow_shift == 3.0  # the preset's model.flow_shift
    rows = {r["method"]: r for r in ResultsStore(tmp_path / "results").rows()}
    assert set(rows) == {"dense", "svg2"}
    for r in rows.values():
        assert r["status"] == "ok" and '"loader": "random"' in r["config_json"]
        for col in ("text_encode_s", "decode_s", "metrics_s", "pipeline_load_s", "median_step_s", "latency_s"):
            assert math.isfinite(r[col]) and r[col] > 0, (col, r[col])
        assert r["text_encode_s"] + r["decode_s"] < r["latency_s"]
    assert rows["svg2"]["density"] < 1.0 and rows["svg2"]["ref_cached"]  # compared with the dense video

    from experiments.dry_run import table

    md = table(tmp_path / "results")  # the table a GPU dry run commits
    assert "| wan2.1-t2v-1.3b | dense | 32x32x5 | 2 |" in md and "| wan2.1-t2v-1.3b | svg2 | 32x32x5 | 2 |" in md
