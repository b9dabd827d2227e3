"""Prompt sharding and the harness under torchrun (CPU, gloo), plus the launcher configs.

* shares of a sweep's rows: disjoint, complete, stable; resume skips finished rows; stores merge.
* ``torchrun --nproc-per-node 2 -m experiments.run -m launcher=torchrun ...`` writes exactly the rows (keys and
  values) of the single-process sweep; ``parallel.mode=ulysses`` writes them from rank 0 only.
* ``launcher=torchrun`` / ``launcher=slurm`` compose (no cluster here: the SLURM test stops at composition).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from svg2.harness.ranks import mode_of
from svg2.harness.schema import register_configs
from svg2.harness.store import ResultsStore
from svg2.parallel import merge_stores, my_rows, shard_keys
from svg2.parallel.dist import DistInfo

ROOT = Path(__file__).resolve().parents[1]
register_configs()

# The tiny random Wan pipeline: 32x32, 5 frames (8 video tokens), 2 steps, PSNR/SSIM only.
TINY = ["model=tiny", "prompts.limit=2", "model.num_steps=2", "model.num_frames=5", "model.height=32",
        "model.width=32", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4", "metrics=fast",
        "progress=false", "report=false"]


# -- shares -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_and_complete(world):
    keys = [f"k{i}" for i in range(11)]
    shares = [shard_keys(keys, r, world) for r in range(world)]
    assert sorted(k for s in shares for k in s) == sorted(keys)
    assert sum(len(s) for s in shares) == len(keys)
    assert all(s == sorted(s, key=keys.index) for s in shares)  # sweep order kept
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="duplicate"):
        shard_keys(["a", "b", "a"], 0, world)


def test_my_rows_resume_and_merge(tmp_path):
    store = ResultsStore(tmp_path / "one")
    rows = [(p, s) for p in ("cat", "dog", "owl") for s in (0, 1)]
    key = lambda r: f"{r[0]}-{r[1]}"
    shares = [my_rows(rows, key, store, info=DistInfo(r, 2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(rows) and not set(shares[0]) & set(shares[1])
    # rank 0 finishes one row, rank 1 fails one: a relaunch runs the rest (failed included), each once
    store.write({"key": key(shares[0][0]), "status": "ok"}, consolidate=False)
    store.write({"key": key(shares[1][0]), "status": "failed"}, consolidate=False)
    again = [my_rows(rows, key, store, info=DistInfo(r, 2)) for r in range(2)]
    assert again[0] == shares[0][1:] and again[1] == shares[1]
    assert my_rows(rows, key, store, info=DistInfo(1, 2), retry_failed=False) == shares[1][1:]
    # stores written apart merge into one; a finished row wins over a failed one
    other = ResultsStore(tmp_path / "two")
    other.write({"key": key(shares[1][0]), "status": "ok", "finished_at": 2.0}, consolidate=False)
    other.write({"key": "extra", "status": "ok"}, consolidate=False)
    assert merge_stores(store, other.root) == 2
    df = store.load()
    assert sorted(df["key"]) == sorted([key(shares[0][0]), key(shares[1][0]), "extra"])
    assert (df["status"] == "ok").all() and (store.root / "results.parquet").is_file()
    assert merge_stores(store, other.root) == 0  # idempotent


# -- launcher configs ---------------------------------------------------------------------------------------

def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_torchrun_launcher_composes():
    cfg = _compose(["launcher=torchrun"])
    assert mode_of(cfg) == "shard" and "BasicLauncher" in cfg.hydra.launcher._target_
    assert mode_of(_compose(["launcher=torchrun", "parallel.mode=ulysses", "parallel.ulysses_degree=2"])) == "ulysses"
    assert mode_of(_compose([])) == "none"
    with pytest.raises(ValueError, match="parallel.mode='ring'"):
        mode_of(_compose(["parallel.mode=ring"]))


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.tasks_per_node=8",
                    "hydra.launcher.timeout_min=60", "hydra.launcher.array_parallelism=4", "parallel.mode=ulysses"])
    la = cfg.hydra.launcher
    assert "SlurmLauncher" in la._target_
    assert (la.partition, la.timeout_min, la.array_parallelism, la.tasks_per_node) == ("gpu", 60, 4, 8)
    assert la.gpus_per_node == 8 and la.nodes == 1  # one GPU per task (rank)
    assert mode_of(cfg) == "ulysses"
    assert mode_of(_compose(["launcher=slurm"])) == "shard"
    assert "SlurmLauncher" in _compose(["launcher=submitit-slurm"]).hydra.launcher._target_  # one GPU per job


# -- the harness under torchrun (CPU, gloo) -----------------------------------------------------------------

def _svg2_run(args, cwd: Path, nproc: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launch = [sys.executable, "-m", "experiments.run"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                  "-m", "experiments.run"]
    proc = subprocess.run([*launch, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(store: Path) -> dict[str, dict]:
    rows = [json.loads(f.read_text()) for f in sorted((store / "rows").glob("*.json"))]
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    common = ["-m", "method=dense,svg2", *TINY]
    _svg2_run([*common, f"cache.dir={tmp / 'c1'}", f"hydra.sweep.dir={tmp / 'single'}"], tmp)
    _svg2_run([*common, "launcher=torchrun", f"cache.dir={tmp / 'c2'}", f"hydra.sweep.dir={tmp / 'shard'}"], tmp, 2)
    _svg2_run([*common, "launcher=torchrun", "parallel.mode=ulysses", f"cache.dir={tmp / 'c3'}",
               f"hydra.sweep.dir={tmp / 'ulysses'}"], tmp, 2)
    return {name: _rows(tmp / name / "results") for name in ("single", "shard", "ulysses")} | {"tmp": tmp}


_NUMBERS = ("psnr", "ssim", "density", "num_attention_calls", "seed")
_LABELS = ("status", "method", "prompt")


def _same(row: dict, ref: dict, abs_tol: float | None = None) -> None:
    assert {c: row.get(c) for c in _LABELS} == {c: ref.get(c) for c in _LABELS}
    assert [row.get(c) for c in _NUMBERS] == pytest.approx([ref.get(c) for c in _NUMBERS], abs=abs_tol)


def test_sharded_sweep_writes_exactly_the_single_process_rows(runs):
    single, shard = runs["single"], runs["shard"]
    assert len(single) == 4 and set(shard) == set(single)  # same keys: no row lost, none twice
    for k, row in single.items():
        _same(shard[k], row)
    assert {r["parallel_mode"] for r in shard.values()} == {"shard"}
    parquet = __import__("pandas").read_parquet(runs["tmp"] / "shard" / "results" / "results.parquet")
    assert sorted(parquet["key"]) == sorted(single)


def test_ulysses_sweep_rank0_writes_the_single_process_rows(runs):
    single, uly = runs["single"], runs["ulysses"]
    assert len(uly) == 4  # rank 0 alone wrote; the follower's writes went to its scratch folder
    by_job = {(r["method"], r["prompt"], r["seed"]): r for r in single.values()}
    for row in uly.values():
        ref = by_job[(row["method"], row["prompt"], row["seed"])]
        assert row["key"] not in single  # a Ulysses row (latency on 2 GPUs) is its own row
        assert (row["parallel_mode"], row["num_gpus_per_video"]) == ("ulysses", 2)
        # density over all heads (both ranks), output as on one process
        _same(row, ref, abs_tol=1e-4)
    assert not list((runs["tmp"] / "ulysses" / "results" / "rows").glob(".*"))
