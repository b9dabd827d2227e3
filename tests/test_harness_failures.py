"""What svg2-run says and leaves when rows fail or the user stops it (issue 20, items 11, 13, 15, 17): a failed
row makes the exit status 1 with a summary that says how to retry or drop it; Ctrl-C exits 130 with the rows
saved and "relaunch the same command to resume", no traceback; every job's run.log holds its job and row lines;
a relaunch keeps the earlier launch's .hydra/; store files are readable by the group and others (umask)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from svg2.harness.store import ResultsStore
from tests.helpers import run_svg2_cli

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fast: 32x32, 5 frames, 2 denoising steps, LPIPS with a random AlexNet, one prompt.
TINY = ["model=tiny", "prompts.limit=1", "model.num_steps=2", "model.num_frames=5", "model.height=32",
        "model.width=32", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4",
        "metrics.lpips_nets=[alex]", "metrics.lpips_random_backbone=true", "progress=false"]
FAILING = ["method=dense", "method.target=harness_failing:FailingMethod", "method.label=failing"]


@pytest.fixture
def fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures"))


def test_failed_rows_exit_1_with_a_summary_and_keep_each_launch(tmp_path, monkeypatch, capfd, fixtures_on_path):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, *FAILING, f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    code, out = run_svg2_cli(args, monkeypatch, capfd)
    assert code == 1, out
    store = sweep / "results"
    (row,) = ResultsStore(store).rows()
    assert row["status"] == "failed" and row["failed_stage"] == "generate" and "FailingMethod" in row["error"]
    assert "[svg2-run] 1 job(s): 0 ok, 1 failed, 0 already done" in out
    assert "FAILED: 1 row(s) in 1 job(s)" in out
    assert "Relaunch the same command to retry them (store.retry_failed=true" in out
    assert f"svg2-report --drop-failed {store}" in out
    assert "Traceback" not in out
    # run.log of the job: its start, its row and its outcome (it was empty for jobs that ran)
    (log,) = sweep.glob("0/*/run.log")
    text = log.read_text()
    assert "[svg2-run] job " in text and "0 ok, 1 failed" in text
    assert "FailingMethod fails" in text  # the row's error, logged by the runner

    code, out = run_svg2_cli(args, monkeypatch, capfd)  # a relaunch retries the failed row (and fails again)
    assert code == 1 and "0 ok, 1 failed, 0 already done" in out
    launches = sorted(p.parent.name for p in sweep.glob("0/*/.hydra/config.yaml"))
    assert len(launches) == 2, launches  # the first launch's .hydra/ is still there
    code, out = run_svg2_cli([*args, "store.retry_failed=false"], monkeypatch, capfd)
    assert code == 0 and "0 ok, 0 failed, 1 already done" in out  # kept, not retried: nothing failed now


def test_ctrl_c_says_rows_saved_and_how_to_resume(tmp_path, monkeypatch, capfd, fixtures_on_path):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=dense,svg2", f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    code, out = run_svg2_cli([*args, "+hydra.callbacks.stop._target_=harness_kill.InterruptAfterFirstJob"],
                          monkeypatch, capfd)
    assert code == 130
    assert "interrupted: 1 row(s) saved by this launch (0 failed)" in out
    assert "Relaunch the same command to resume" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    (row,) = ResultsStore(sweep / "results").rows()
    assert row["method"] == "dense" and row["status"] == "ok"
    (log,) = sweep.glob("0/*/run.log")
    assert f"row {row['key']} (" in log.read_text()  # one line per finished row
    code, out = run_svg2_cli(args, monkeypatch, capfd)  # the relaunch resumes
    assert code == 0 and "2 job(s): 1 ok, 0 failed, 1 already done" in out


def test_store_files_follow_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        store = ResultsStore(tmp_path / "s")
        store.write({"key": "k1", "status": "ok", "finished_at": 1.0})
    finally:
        os.umask(old)
    for p in (store.rows_dir / "k1.json", store.parquet_path, store.jsonl_path):
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    assert json.loads((store.rows_dir / "k1.json").read_text())["status"] == "ok"
    old = os.umask(0o027)  # a group-shared cluster setting: the group reads, others do not
    try:
        store.write({"key": "k2", "status": "ok", "finished_at": 2.0})
    finally:
        os.umask(old)
    assert (store.rows_dir / "k2.json").stat().st_mode & 0o777 == 0o640


def test_run_job_records_bad_model_values_as_config_failures(tmp_path):
    from hydra import compose, initialize_config_dir

    from svg2.harness.runner import run_job
    from svg2.harness.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[*TINY, "model.num_steps=0", f"cache.dir={tmp_path / 'cache'}"])
    GlobalHydra.instance().clear()
    assert run_job(cfg, tmp_path / "results") == {"total": 1, "skipped": 0, "ok": 0, "failed": 1}
    (row,) = ResultsStore(tmp_path / "results").rows()  # was an IndexError at the first step, after a model load
    assert row["failed_stage"] == "config" and "model.num_steps=0: use a whole number >= 1" in row["error"]
