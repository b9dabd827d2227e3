"""launcher=lanes: a multirun's jobs in concurrent local worker processes sharing one store and reference cache.

What must hold with jobs at once: a row set with the same keys (dense at two densities) runs once, a dense
reference is made once (the others wait on its lock and read it), every job's rows land in the one store, the
launching process counts the workers' rows (exit status), and a relaunch reports every row as already done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from svg2.harness.locks import file_locks
from svg2.harness.schema import register_configs
from svg2.harness.store import ResultsStore
from tests.helpers import run_svg2_cli

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["model=tiny", "model.num_steps=2", "model.num_frames=5", "model.height=32", "model.width=32",
        "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4", "metrics.lpips_nets=[alex]",
        "metrics.lpips_random_backbone=true", "progress=false", "report=false", "prompts.limit=1", "seeds=[0]"]


def _need_submitit() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="launcher=lanes needs hydra-submitit-launcher: pip install -e '.[dist]'")


def _compose(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_testbed_runs_in_four_lanes_on_gpu_0_and_in_one_lane_with_launcher_local():
    _need_submitit()
    cfg = _compose(["experiment=testbed"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert cfg.hydra.sweeper.max_batch_size == 4
    assert cfg.hydra.launcher.gpus_per_node == 1  # CUDA_VISIBLE_DEVICES=0 in every worker; 0 would hide the GPU
    assert list(cfg.hydra.sweeper.params)[0] == "method.cfg.target_density"  # batches mix methods
    cfg = _compose(["experiment=testbed", "launcher=lanes", "hydra.sweeper.max_batch_size=2"])
    assert cfg.hydra.sweeper.max_batch_size == 2
    local = _compose(["experiment=testbed", "launcher=local"])
    assert local.hydra.launcher._target_.endswith("BasicLauncher") and local.hydra.sweeper.max_batch_size is None
    assert local.batch_size == 32 and local.model.name == "testbed"


def test_file_locks_make_another_process_wait(tmp_path):
    lock = tmp_path / "locks" / "k.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (  # a plain flock in another process (no svg2 import: fast)
        f"import fcntl, time\nf = open({str(lock)!r}, 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\ntime.sleep(1.0)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.perf_counter()
    with file_locks([lock, tmp_path / "locks" / "a.lock"]) as waited:
        assert time.perf_counter() - t0 > 0.5 and waited > 0.5
    holder.wait(timeout=30)
    with file_locks([lock]) as waited:  # free now: no wait
        assert waited == 0.0


def test_lanes_share_one_store_and_make_the_reference_once(tmp_path, monkeypatch, capfd):
    """Four jobs at once (one batch of 4 lanes): dense at two densities has one row set (one job runs it, the
    other skips it), svg2 at two densities has two; all three rows compare against the one dense reference."""
    _need_submitit()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = ["-m", "launcher=lanes", "hydra.sweeper.max_batch_size=4", *TINY, f"cache.dir={cache}",
            f"hydra.sweep.dir={sweep}", "method=dense,svg2", "method.cfg.target_density=0.1,0.15"]
    code, out = run_svg2_cli(args, monkeypatch, capfd)
    assert code == 0, out
    assert "[svg2-run] 4 job(s): 3 ok, 0 failed, 1 already done" in out, out  # the workers' counts came back
    rows = ResultsStore(sweep / "results").rows()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows
    assert sorted(r["method"] for r in rows) == ["dense", "svg2", "svg2"]
    assert len({r["ref_key"] for r in rows}) == 1
    assert sorted(r["ref_cached"] for r in rows) == [False, True, True]  # made by one job, read by two
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert json.loads((entry / "meta.json").read_text())["key"] == rows[0]["ref_key"]
    code, out = run_svg2_cli(args, monkeypatch, capfd)  # the same command again: every row is done
    assert code == 0 and "[svg2-run] 4 job(s): 0 ok, 0 failed, 4 already done" in out, out
    assert len(ResultsStore(sweep / "results").rows()) == 3


def test_a_failed_row_in_a_lane_fails_the_launch(tmp_path, monkeypatch, capfd):
    """A row that fails inside a worker process is counted by the launching process (exit status 1). The worker
    finds the failing method through the PYTHONPATH it inherited."""
    _need_submitit()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests' / 'fixtures'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures"))  # the launching process validates the config
    sweep = tmp_path / "sweep"
    failing = ["method=dense", "method.target=harness_failing:FailingMethod", "method.label=failing"]
    code, out = run_svg2_cli(["-m", "launcher=lanes", *TINY, *failing, f"cache.dir={tmp_path / 'cache'}",
                              f"hydra.sweep.dir={sweep}"], monkeypatch, capfd)
    assert code == 1, out
    assert "[svg2-run] 1 job(s): 0 ok, 1 failed, 0 already done" in out, out
    (row,) = ResultsStore(sweep / "results").rows()
    assert row["status"] == "failed" and "FailingMethod" in row["error"]
