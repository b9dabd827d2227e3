"""batch_size: several (prompt, seed) pairs per pipeline call on the tiny random Wan pipeline. Rows for every pair,
per-item frames as unbatched (same noise), the method's stats per batch, keys that keep batched and unbatched
results apart (and unchanged at batch_size=1), resume, a failed call failing its whole batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import svg2.harness.runner as runner
from svg2.harness.generation import GenerationResult, generate_batch
from svg2.harness.prompts import Prompt, load_prompts
from svg2.harness.reference import ReferenceCache, reference_key
from svg2.harness.runner import job_identity, method_spec, row_key, run_job
from svg2.harness.schema import register_configs
from svg2.harness.session import RunSession
from svg2.harness.weights_identity import software_stack, weights_identity

ROOT = Path(__file__).resolve().parents[1]
register_configs()

# 2 prompts x 2 seeds = 2 batches of 2. MP4 and LPIPS off: this file tests batching, not metrics.
TINY = ["model=tiny", "prompts.limit=2", "seeds=[0,1]", "model.num_steps=2", "model.num_frames=5",
        "model.height=32", "model.width=32", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4",
        "metrics=fast", "metrics.compare_on=[memory]", "store.save_videos=false", "progress=false"]


def _compose(overrides: list[str], hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


def _rows(store: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((store / "rows").glob("*.json"))]


def _cfg(tmp: Path, *extra: str):
    return _compose([*TINY, f"cache.dir={tmp / 'cache'}", *extra])


def test_config_and_keys():
    assert _compose([]).batch_size == 1
    assert _compose(["experiment=testbed"], hydra_cfg=True).batch_size == 32
    assert _compose(["experiment=compensation"], hydra_cfg=True).batch_size == 16
    one, two = _compose(["method=svg2"]), _compose(["method=svg2", "batch_size=2"])
    # batch_size=1 leaves the job identity (and so every existing row key) as it was; > 1 gets its own keys.
    assert "batch_size" not in job_identity(one, method_spec(one))
    assert job_identity(two, method_spec(two))["batch_size"] == 2
    ids = dict(weights={"kind": "code"}, stack=software_stack("cpu"))
    assert reference_key({}, "cpu", "p", None, 0, **ids) == reference_key({}, "cpu", "p", None, 0, batch_size=1, **ids)
    assert reference_key({}, "cpu", "p", None, 0, **ids) != reference_key({}, "cpu", "p", None, 0, batch_size=2, **ids)
    with pytest.raises(ValueError, match="batch_size=0"):
        job_identity(_compose(["batch_size=0"]), method_spec(one))


def test_invalid_batch_size_fails_the_job_clearly(tmp_path):
    counts = run_job(_cfg(tmp_path, "method=dense", "prompts.limit=1", "seeds=[0]", "batch_size=0"),
                     tmp_path / "results")
    assert counts["failed"] == 1
    (row,) = _rows(tmp_path / "results")
    assert row["failed_stage"] == "config" and "batch_size=0" in row["error"]


def test_batched_dense_and_svg2_rows_match_unbatched(tmp_path):
    session = RunSession()  # one tiny pipeline for every job of this test
    counts = {}
    for bs in (1, 2):
        for m in ("dense", "svg2"):
            counts[m, bs] = run_job(_cfg(tmp_path, f"method={m}", f"batch_size={bs}"), tmp_path / f"bs{bs}",
                                    session=session)
            assert counts[m, bs] == {"total": 4, "skipped": 0, "ok": 4, "failed": 0}
    rows = {bs: _rows(tmp_path / f"bs{bs}") for bs in (1, 2)}
    cfg = _cfg(tmp_path, "batch_size=2")
    pairs = {(p.text, s) for p in load_prompts(cfg.prompts) for s in cfg.seeds}
    for bs in (1, 2):
        assert len(rows[bs]) == 8 and all(r["status"] == "ok" for r in rows[bs])
        for m in ("dense", "svg2"):
            assert {(r["prompt"], r["seed"]) for r in rows[bs] if r["method"] == m} == pairs
            assert all(r["batch_size"] == bs for r in rows[bs])
    assert not {r["key"] for r in rows[1]} & {r["key"] for r in rows[2]}  # batched rows have their own keys
    for r in rows[2]:
        assert r["latency_s"] == pytest.approx(r["batch_latency_s"] / 2)

    # Per item, the batched dense video equals the unbatched one (same noise; float tolerance), and each
    # is stored as a reference of its own (the batched one under its own key).
    cache, model = ReferenceCache(tmp_path / "cache"), OmegaConf.to_container(cfg.model, resolve=True)
    ids = dict(weights=weights_identity(model), stack=software_stack("cpu"))
    for p in load_prompts(cfg.prompts):
        for s in cfg.seeds:
            alone, _ = cache.get(reference_key(model, "cpu", p.text, p.image, s, **ids))
            batched, meta = cache.get(reference_key(model, "cpu", p.text, p.image, s, batch_size=2, **ids))
            assert meta["batch_size"] == 2
            assert np.abs(alone - batched).max() < 2e-3  # float16 frames on disk
    p0 = load_prompts(cfg.prompts)[0]
    a, b = (cache.get(reference_key(model, "cpu", p0.text, None, s, batch_size=2, **ids))[0] for s in (0, 1))
    assert np.abs(a - b).max() > 0.05  # ... and the items of one batch are different videos

    # svg2 rows of a batch get that batch's stats, reset between batches as between single videos: as many
    # attention calls per row as unbatched (layers x steps x branches), and densities that are the batch's.
    svg = {bs: [r for r in rows[bs] if r["method"] == "svg2"] for bs in (1, 2)}
    assert {r["num_attention_calls"] for r in svg[2]} == {r["num_attention_calls"] for r in svg[1]} == {8}
    assert all(r["density"] < 1 for r in svg[2])
    by_batch: dict[float, set] = {}
    for r in svg[2]:
        by_batch.setdefault(r["batch_latency_s"], set()).add(r["density_json"])
    assert len(by_batch) == 2 and all(len(v) == 1 for v in by_batch.values())
    # svg2 compares against the batched references; per (prompt, seed) its video is the unbatched one (each
    # item clusters as it does alone), up to batched float rounding.
    assert all(r["ref_cached"] and r["ref_key"] for r in svg[2])
    psnr = {bs: {(r["prompt"], r["seed"]): r["psnr"] for r in svg[bs]} for bs in (1, 2)}
    for pair, value in psnr[1].items():
        assert psnr[2][pair] == pytest.approx(value, abs=0.5), pair

    # Resume: finished rows are skipped; a lost row is regenerated alone (a batch of one), under its old key.
    again = run_job(_cfg(tmp_path, "method=svg2", "batch_size=2"), tmp_path / "bs2", session=session)
    assert again == {"total": 4, "skipped": 4, "ok": 0, "failed": 0}
    lost = svg[2][0]["key"]
    (tmp_path / "bs2" / "rows" / f"{lost}.json").unlink()
    again = run_job(_cfg(tmp_path, "method=svg2", "batch_size=2"), tmp_path / "bs2", session=session)
    assert again == {"total": 4, "skipped": 3, "ok": 1, "failed": 0}
    redone = json.loads((tmp_path / "bs2" / "rows" / f"{lost}.json").read_text())
    assert redone["status"] == "ok" and redone["batch_size"] == 1


def test_a_failed_call_fails_its_whole_batch_and_the_sweep_goes_on(tmp_path, monkeypatch):
    calls = []

    def flaky(pipe, mcfg, items, device, per_step=True):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return generate_batch(pipe, mcfg, items, device, per_step=per_step)

    monkeypatch.setattr(runner, "generate_batch", flaky)
    cfg = _cfg(tmp_path, "method=dense", "batch_size=2")
    assert run_job(cfg, tmp_path / "results") == {"total": 4, "skipped": 0, "ok": 2, "failed": 2}
    assert calls == [2, 2]
    rows = _rows(tmp_path / "results")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and {r["failed_stage"] for r in failed} == {"generate"}
    assert all("out of memory" in r["error"] and r["batch_size"] == 2 for r in failed)
    ident = job_identity(cfg, method_spec(cfg))
    assert {r["key"] for r in rows} == {row_key(ident, p, s) for p in load_prompts(cfg.prompts) for s in cfg.seeds}
    # A relaunch retries the failed batch only.
    assert run_job(cfg, tmp_path / "results") == {"total": 4, "skipped": 2, "ok": 2, "failed": 0}


def test_generate_batch_refuses_what_it_cannot_batch():
    class OneVideoPipe:  # takes a list of prompts but returns a single video
        def __call__(self, prompt, generator=None, output_type="np", **kw):
            return type("Out", (), {"frames": np.zeros((1, 2, 4, 4, 3), np.float32)})()

    mcfg = _compose(["model=tiny"]).model
    items = [(Prompt("a", "a"), 0), (Prompt("b", "b"), 1)]
    with pytest.raises(ValueError, match="returned 1 videos for a batch of 2.*batch_size=1"):
        generate_batch(OneVideoPipe(), mcfg, items, torch.device("cpu"))
    (single,) = generate_batch(OneVideoPipe(), mcfg, items[:1], torch.device("cpu"))  # a batch of one: generate
    assert isinstance(single, GenerationResult) and single.batch_size == 1
    with pytest.raises(ValueError, match="image-conditioned"):
        generate_batch(OneVideoPipe(), mcfg, [(Prompt("a", "a", image="x.png"), 0), items[1]], torch.device("cpu"))
