"""What one svg2-run launch checks and leaves behind (issue 20, items 12 and 17).

Item 12: a bad kernel name (checked against the kernel registry), a named kernel that cannot run on the job's
device, a bad method argument and an unknown ``method.cfg`` key all fail before any model is built, with exit
status 2 and one line per problem that names the valid choices; in a multirun every job is checked before the
first starts. Item 17: every launch gets its own job folders (``${svg2_launch:}``), so two launches under one name
keep both ``.hydra/`` folders even within one second; ``run.log`` holds the job's lines; store and reference files
follow the umask; a single run's store is stable (``outputs/<name>/results``), so a run killed mid-job resumes
with no row lost or duplicated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from svg2.harness.launch import LAUNCH_ENV, new_launch_id, single_run_store
from svg2.harness.store import ResultsStore
from svg2_kernels.registry import available_attention_variants, available_kmeans_variants, triton_interpreting
from tests.helpers import run_svg2_cli

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fast: 32x32, 5 frames, 2 denoising steps, LPIPS with a random AlexNet, MP4 comparison off.
TINY = ["model=tiny", "model.num_steps=2", "model.num_frames=5", "model.height=32", "model.width=32",
        "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4", "metrics.lpips_nets=[alex]",
        "metrics.lpips_random_backbone=true", "progress=false", "report=false"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any pipeline is loaded or any job starts."""
    import svg2.harness.cli as cli
    import svg2.harness.models as models
    import svg2.harness.session as session

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or a job started although the config cannot run")

    for mod, name in ((session, "load_pipeline"), (models, "load_pipeline"), (models, "tiny_wan_pipeline"),
                      (cli, "run_job")):
        monkeypatch.setattr(mod, name, refuse)


def _problem_lines(out: str) -> list[str]:
    return [ln.strip()[2:] for ln in out.splitlines() if ln.startswith("    - ")]


def test_bad_kernel_names_exit_2_before_any_model_is_built(tmp_path, monkeypatch, capfd, no_model):
    monkeypatch.chdir(tmp_path)
    code, out = run_svg2_cli([*TINY, "kernel.attention=nope", "kernel.kmeans=trion", "method.cfg.top_p=1.5",
                              f"cache.dir={tmp_path / 'c'}"], monkeypatch, capfd)
    assert code == 2, out
    assert "1 of 1 job(s) cannot run; nothing was started" in out and "Traceback" not in out
    lines = _problem_lines(out)
    assert len(lines) == 3, lines  # one line per problem (SVG2Config alone stops at the first)
    # the valid choices come from the kernel registry, not from a list in the harness
    assert lines[0] == (f"kernel.attention=nope: unknown attention kernel 'nope'; known: "
                        f"{sorted(available_attention_variants())} (or 'auto')")
    assert lines[1].startswith(f"kernel.kmeans=trion: unknown k-means kernel 'trion'; known: "
                               f"{sorted(available_kmeans_variants())}")
    assert lines[2] == "method.cfg.top_p=1.5: SVG2Config.top_p=1.5 is out of range; allowed: (0.0, 1.0]"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "c").exists()  # no folder, no reference


def test_unknown_method_key_and_bad_method_argument_exit_2(tmp_path, monkeypatch, capfd, no_model):
    monkeypatch.chdir(tmp_path)
    code, out = run_svg2_cli([*TINY, "+method.cfg.top_pp=0.9"], monkeypatch, capfd)
    assert code == 2
    (line,) = _problem_lines(out)
    assert "takes no parameter top_pp; it takes:" in line and "top_p" in line
    # dense_floor's backend name was checked only when the method was installed, after the model load and the
    # dense references (about 40 s on the tiny model): its constructor now runs before any job starts
    code, out = run_svg2_cli([*TINY, "method=dense_floor", "method.cfg.backend=nope"], monkeypatch, capfd)
    assert code == 2
    (line,) = _problem_lines(out)
    assert "backend='nope' is unknown for dense_floor; choose one of ('auto', 'efficient', 'math')" in line


@pytest.mark.skipif(triton_interpreting(), reason="under TRITON_INTERPRET the Triton kernels run on the CPU")
def test_a_kernel_that_cannot_run_on_the_device_exits_2(tmp_path, monkeypatch, capfd, no_model):
    monkeypatch.chdir(tmp_path)
    code, out = run_svg2_cli([*TINY, "model.device=cpu", "kernel=triton_tma"], monkeypatch, capfd)
    assert code == 2
    lines = _problem_lines(out)
    assert len(lines) == 2, lines
    assert lines[0].startswith("kernel.attention=triton_tma: kernel 'triton_tma' runs on cuda, not on this job's "
                               "device (cpu); on cpu use kernel.attention=auto or one of ['torch']")
    assert lines[1].startswith("kernel.kmeans=triton: kernel 'triton' runs on cuda")
    # the stock pipeline runs no svg2 kernel: the same kernel group is no problem for method=dense
    code, out = run_svg2_cli(["-m", *TINY, "model.device=cpu", "kernel=triton_tma", "method=dense,svg2",
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"], monkeypatch, capfd)
    assert code == 2 and "1 of 2 job(s) cannot run" in out and "  method=svg2:" in out
    assert "  method=dense:" not in out


def test_every_job_of_a_sweep_is_checked_before_the_first_starts(tmp_path, monkeypatch, capfd, no_model):
    monkeypatch.chdir(tmp_path)
    code, out = run_svg2_cli(["-m", *TINY, "method=svg2,dense_floor", "kernel.attention=auto,nope",
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"], monkeypatch, capfd)
    assert code == 2, out
    assert "2 of 4 job(s) cannot run; nothing was started" in out
    assert "  method=svg2 kernel.attention=nope:" in out and "  method=dense_floor kernel.attention=nope:" in out
    assert len(_problem_lines(out)) == 2
    assert not (tmp_path / "sweep").exists()  # not even a job folder


def test_launch_ids_sort_by_time_and_differ_by_process():
    a = new_launch_id(datetime(2026, 12, 4, 15, 0, 0, 5), pid=99999)
    b = new_launch_id(datetime(2026, 12, 4, 15, 0, 0, 6), pid=1)
    assert a == "2026-12-04_15-00-00.000005_99999" and sorted([b, a]) == [a, b]
    assert new_launch_id(datetime(2026, 12, 4), pid=1) != new_launch_id(datetime(2026, 12, 4), pid=2)


def test_single_run_store_is_beside_the_launch_folders(monkeypatch, tmp_path):
    monkeypatch.setenv(LAUNCH_ENV, "2026-12-04_15-00-00.000005_1")
    assert single_run_store(tmp_path / "outputs/x/2026-12-04_15-00-00.000005_1") == tmp_path / "outputs/x/results"
    assert single_run_store(tmp_path / "fixed") == tmp_path / "fixed" / "results"  # hydra.run.dir=<fixed dir>


def test_two_launches_under_one_name_keep_both_job_folders(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "prompts.limit=1", "method=dense", f"cache.dir={tmp_path / 'c'}", f"hydra.sweep.dir={sweep}"]
    code, out = run_svg2_cli(args, monkeypatch, capfd)
    assert code == 0 and "1 ok, 0 failed, 0 already done" in out, out
    code, out = run_svg2_cli(args, monkeypatch, capfd)  # at once: no second has to pass between the two
    assert code == 0 and "0 ok, 0 failed, 1 already done" in out, out
    folders = sorted(p.parent for p in sweep.glob("0/*/.hydra"))
    assert len(folders) == 2, folders
    first, second = (f / "run.log" for f in folders)  # named by launch: sorted by start time
    assert "1 ok, 0 failed, 0 already done" in first.read_text()  # the first launch's log is intact
    assert "0 ok, 0 failed, 1 already done" in second.read_text()
    assert len(ResultsStore(sweep / "results").rows()) == 1


def test_launches_started_together_get_their_own_folders(tmp_path):
    """Two processes launched in the same second (SLURM jobs, a script's loop) under one name: the folders were
    stamped to the second, so the second launch wrote its .hydra/ and run.log over the first's."""
    args = [*TINY, "prompts.limit=1", "method=dense", "name=together", f"cache.dir={tmp_path / 'c'}"]
    procs = [_svg2_popen(args, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted(p.parent for p in (tmp_path / "outputs" / "together").glob("*/.hydra"))
    assert len(folders) == 2, folders
    assert all("[svg2-run] job " in (f / "run.log").read_text() for f in folders)
    (row,) = ResultsStore(tmp_path / "outputs" / "together" / "results").rows()  # one store, one row
    assert row["status"] == "ok"


def test_run_log_holds_the_job_and_its_rows(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, out = run_svg2_cli([*TINY, "prompts.limit=1", f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'c'}"],
                             monkeypatch, capfd)
    assert code == 0, out
    text = (run / "run.log").read_text()
    (row,) = ResultsStore(run / "results").rows()  # a fixed run folder holds its store
    assert "[svg2-run] job " in text and "model tiny, method svg2" in text
    assert f"row {row['key']} (" in text and "1 ok, 0 failed, 0 already done" in text


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_store_and_reference_files_follow_the_umask(tmp_path, monkeypatch, capfd, umask, mode):
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        code, out = run_svg2_cli([*TINY, "prompts.limit=1", f"hydra.run.dir={tmp_path / 'run'}",
                                  f"cache.dir={tmp_path / 'c'}"], monkeypatch, capfd)
    finally:
        os.umask(old)
    assert code == 0, out
    store = tmp_path / "run" / "results"
    files = [p for p in [*store.rglob("*"), *(tmp_path / "c").rglob("*")] if p.is_file() and p.name != ".lock"]
    assert any(p.suffix == ".mp4" for p in files) and any(p.parent.name == "rows" for p in files)
    assert (store / "results.parquet") in files and (store / "results.jsonl") in files
    assert len(list((tmp_path / "c").rglob("*"))) > 0  # the dense reference was cached
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != mode}
    assert not wrong, wrong  # was 0600 (mkstemp) for the row files and the Parquet snapshot


def _svg2_popen(args: list[str], cwd: Path) -> subprocess.Popen:
    """``svg2-run args`` in a new process (the console script's module), output captured."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'fixtures'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    env.pop(LAUNCH_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _svg2_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = _svg2_popen(args, cwd)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_killed_single_run_resumes_from_its_stable_store(tmp_path):
    args = [*TINY, "prompts.limit=2", "name=resume", f"cache.dir={tmp_path / 'c'}"]
    proc = _svg2_run([*args, "+hydra.callbacks.kill._target_=harness_kill.KillAfterFirstRow"], tmp_path)
    assert proc.returncode != 0  # SIGKILLed right after its first row
    store = tmp_path / "outputs" / "resume" / "results"
    (first,) = [json.loads(p.read_text()) for p in (store / "rows").glob("*.json")]
    proc = _svg2_run(args, tmp_path)  # the same command: the run folder is new, the store is the same
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 ok, 0 failed, 1 already done" in proc.stderr + proc.stdout
    rows = [json.loads(p.read_text()) for p in (store / "rows").glob("*.json")]
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2 and all(r["status"] == "ok" for r in rows)
    assert {r["prompt"] for r in rows} != {first["prompt"]}  # the second prompt ran, the first did not again
    (again,) = [r for r in rows if r["key"] == first["key"]]
    assert again["finished_at"] == first["finished_at"]  # untouched by the relaunch
    assert len((store / "results.jsonl").read_text().splitlines()) == 2
    launches = sorted(p.parent.name for p in (tmp_path / "outputs" / "resume").glob("*/.hydra"))
    assert len(launches) == 2  # the killed launch's folder is kept beside the relaunch's


def test_submitit_jobs_name_their_folders_after_the_launch(tmp_path, monkeypatch, capfd):
    """Jobs that hydra-submitit runs in other processes resolve ${svg2_launch:} there: to the launch's id."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    code, out = run_svg2_cli(["-m", "hydra/launcher=submitit_local", *TINY, "prompts.limit=1", "method=dense,svg2",
                              f"cache.dir={tmp_path / 'c'}", f"hydra.sweep.dir={sweep}"], monkeypatch, capfd)
    assert code == 0, out
    launches = {p.parent.name for p in sweep.glob("*/*/.hydra")}
    assert len(launches) == 1 and len(list(sweep.glob("*/*/.hydra"))) == 2, launches  # one launch, two jobs
    assert len(ResultsStore(sweep / "results").rows()) == 2
