"""End to end on the tiny random Wan pipeline: a -m multirun writes the expected rows; a sweep killed after its
first job and relaunched ends with exactly the same rows and no duplicates; a failing job is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from svg2.harness.prompts import load_prompts
from svg2.harness.runner import job_identity, method_spec, row_key, run_job
from svg2.harness.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()

# Tiny and fast: 32x32, 5 frames (8 video tokens), 2 denoising steps, LPIPS with a random AlexNet.
TINY = ["model=tiny", "prompts.limit=2", "model.num_steps=2", "model.num_frames=5", "model.height=32",
        "model.width=32", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4",
        "metrics.lpips_nets=[alex]", "metrics.lpips_random_backbone=true", "progress=false"]
SWEEP = ["method=dense,svg2"]


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


def _expected_keys(tmp: Path) -> set[str]:
    keys = set()
    for m in ("dense", "svg2"):
        cfg = _compose([*TINY, f"method={m}", f"cache.dir={tmp / 'cache'}"])
        ident = job_identity(cfg, method_spec(cfg))
        keys |= {row_key(ident, p, s) for p in load_prompts(cfg.prompts) for s in cfg.seeds}
    return keys


def _svg2_run(args, tmp: Path, check=True, extra_env=None):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'fixtures'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(store: Path) -> pd.DataFrame:
    files = sorted((store / "rows").glob("*.json"))
    return pd.DataFrame([json.loads(f.read_text()) for f in files])


def _svg2_run_in_process(args, monkeypatch):
    from svg2.harness.cli import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["svg2-run", *args])
    main()
    GlobalHydra.instance().clear()


def test_multirun_kill_and_relaunch(tmp_path, monkeypatch):
    expected = _expected_keys(tmp_path)
    assert len(expected) == 4
    common = ["-m", *SWEEP, *TINY, f"cache.dir={tmp_path / 'cache'}"]

    # 1. An uninterrupted sweep (in this process: the same code path as the console script).
    monkeypatch.chdir(tmp_path)
    _svg2_run_in_process([*common, f"hydra.sweep.dir={tmp_path / 'full'}"], monkeypatch)
    full = _rows(tmp_path / "full" / "results")
    assert set(full["key"]) == expected and len(full) == 4 and (full["status"] == "ok").all()
    assert sorted(full["method"]) == ["dense", "dense", "svg2", "svg2"]
    svg2 = full[full["method"] == "svg2"]
    assert (svg2["density"] < 1).all() and svg2["psnr"].between(5, 200).all()
    assert {"psnr", "ssim", "lpips_alex", "psnr_mp4", "ssim_mp4", "lpips_alex_mp4", "latency_s", "git_rev",
            "density_json", "step_times_json"} <= set(full.columns)
    assert len(json.loads(svg2["step_times_json"].iloc[0])) == 2
    pq = pd.read_parquet(tmp_path / "full" / "results" / "results.parquet")
    assert sorted(pq["key"]) == sorted(full["key"])
    assert (tmp_path / "full" / "report" / "table1.md").is_file()

    # 2. The same sweep killed (SIGKILL) right after its first job ...
    killed = [*common, f"hydra.sweep.dir={tmp_path / 'resumed'}"]
    proc = _svg2_run([*killed, "+hydra.callbacks.kill._target_=harness_kill.KillAfterFirstJob"], tmp_path,
                     check=False)
    assert proc.returncode != 0
    part = _rows(tmp_path / "resumed" / "results")
    assert len(part) == 2 and set(part["method"]) == {"dense"}
    # ... and relaunched: finished rows are skipped, the rest run, nothing is duplicated.
    proc = _svg2_run(killed, tmp_path)
    assert "already done" in proc.stdout + proc.stderr  # the per-job line is logged (console and run.log)
    resumed = _rows(tmp_path / "resumed" / "results")
    assert len(resumed) == 4 and set(resumed["key"]) == expected
    a = full.set_index("key").sort_index()
    b = resumed.set_index("key").sort_index()
    for col in ("method", "prompt", "seed", "status"):
        assert (a[col] == b[col]).all()
    assert b["psnr"].to_numpy() == pytest.approx(a["psnr"].to_numpy(), rel=1e-4)
    # Rows written before the kill are untouched by the relaunch.
    first = part.set_index("key")
    assert (b.loc[first.index, "finished_at"] == first["finished_at"]).all()
    pq = pd.read_parquet(tmp_path / "resumed" / "results" / "results.parquet")
    assert len(pq) == 4 and pq["key"].is_unique
    lines = (tmp_path / "resumed" / "results" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_failed_job_is_recorded_and_retried(tmp_path):
    cfg = _compose([*TINY, "prompts.limit=1", "method=svg2", "method.name=no_such_method",
                    f"cache.dir={tmp_path / 'cache'}"])
    counts = run_job(cfg, tmp_path / "results")
    assert counts == {"total": 1, "skipped": 0, "ok": 0, "failed": 1}
    (row,) = _rows(tmp_path / "results").to_dict(orient="records")
    # The class is resolved when the job is planned: a config failure, before any model is loaded.
    assert row["status"] == "failed" and row["failed_stage"] == "config" and "no_such_method" in row["error"]
    assert "available" in row["error"]  # the registry lists the known methods
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    # A fixed config retries the row; a relaunch then skips it.
    cfg_ok = _compose([*TINY, "prompts.limit=1", "method=dense", f"cache.dir={tmp_path / 'cache'}"])
    counts = run_job(cfg_ok, tmp_path / "results")
    assert counts["ok"] == 1
    counts = run_job(cfg_ok, tmp_path / "results")
    assert counts == {"total": 1, "skipped": 1, "ok": 0, "failed": 0}


def test_wandb_logger_path(tmp_path):
    # WANDB_MODE=disabled (tests/conftest.py): the W&B code path runs without writing or sending anything.
    cfg = _compose([*TINY, "prompts.limit=1", "method=dense", "logger=wandb", "metrics=fast",
                    f"cache.dir={tmp_path / 'cache'}"])
    assert cfg.logger.mode == "offline"  # the default when W&B is on
    assert run_job(cfg, tmp_path / "results")["ok"] == 1


def test_missing_weights_give_one_clear_message(tmp_path):
    cfg = _compose(["model=wan2.1-t2v-1.3b", "model.device=cpu", "prompts.limit=2", f"cache.dir={tmp_path / 'c'}"])
    counts = run_job(cfg, tmp_path / "results")
    assert counts["failed"] == 2
    rows = _rows(tmp_path / "results")
    assert set(rows["failed_stage"]) == {"load"} and set(rows["error_type"]) == {"ModelLoadError"}
    # the command is `hf`: huggingface_hub 2.x installs no huggingface-cli
    assert "`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers`" in rows["error"].iloc[0]
    assert "model=tiny" in rows["error"].iloc[0] and "huggingface-cli" not in rows["error"].iloc[0]
