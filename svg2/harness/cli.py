"""``svg2-run``: the Hydra entry of the harness (``experiments/run.py`` is its console script).

The config folder is found through the installed package ``svg2_conf`` (the repository's ``conf/``, shipped in
the wheel as package data; an editable install maps it to the source tree), so the command works from a
regular install as well as from a checkout.

Exit status: 0 when every row of the jobs this process ran is ok (or already done); 1 when a row failed (a
summary line says how many, where, and how to retry or drop them); 2 when a job config cannot run (checked for
every job before the first starts: ``svg2.harness.validation``); 130 on Ctrl-C (the rows saved so far are kept
and a relaunch of the same command resumes). Jobs that launcher=lanes runs in local worker processes count as
the process's own (their records: :mod:`svg2.harness.job_records`); a worker that raised or died fails the launch
(exit 1, Hydra's error). SLURM jobs report through their own logs and stores.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from svg2.harness.job_records import RECORDS_ENV, read_job_records, write_job_record
from svg2.harness.launch import LAUNCH_ENV, single_run_store, start_launch
from svg2.harness.ranks import rank_policy
from svg2.harness.runner import run_job
from svg2.harness.session import RunSession

__all__ = ["config_dir", "run_from_hydra", "main", "summary_lines"]

log = logging.getLogger("svg2.harness")


def _retry_hint(stores: list[Path]) -> str:
    where = " ".join(str(s) for s in stores) or "<store>"
    return (f"Relaunch the same command to retry them (store.retry_failed=true, the default), or drop them from the "
            f"results with `svg2-report --drop-failed {where}`.")


def config_dir() -> Path:
    """The folder holding ``config.yaml`` and the config groups (model, method, kernel, ...)."""
    try:
        import svg2_conf
    except ImportError:  # svg2 imported from a source tree that was never installed
        here = Path(__file__).resolve().parents[2] / "conf"
        if (here / "config.yaml").is_file():
            return here
        raise RuntimeError("svg2's config folder (package svg2_conf) is not installed: reinstall svg2 with "
                           "`pip install .` (or `pip install -e .` in a checkout)") from None
    path = Path(svg2_conf.__file__).resolve().parent
    if not (path / "config.yaml").is_file():
        raise RuntimeError(f"{path} holds no config.yaml: the svg2 install is incomplete; reinstall svg2")
    return path


def run_from_hydra(cfg: DictConfig, session: RunSession) -> dict[str, Any]:
    """One ``svg2-run`` job: join the process group (torchrun), resolve the store folder from Hydra's run or
    sweep dir, then :func:`~svg2.harness.runner.run_job`. Returns the counts and ``store_dir`` (the report
    callback collects the stores of the run from these return values)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    policy = rank_policy(cfg)
    policy.setup()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    if cfg.store.dir:
        store_dir = Path(os.path.expanduser(cfg.store.dir))
    else:  # one store per sweep or run name, above the per-launch job folders: a relaunch resumes it
        store_dir = Path(hc.sweep.dir) / "results" if multirun else single_run_store(out_dir)
    job_info = {"job_num": hc.job.num if multirun else 0, "override_dirname": hc.job.override_dirname or "default",
                "output_dir": str(out_dir)}
    store_dir = policy.shared_path(store_dir)
    tag = job_info["override_dirname"]
    log.info("[svg2-run] job %s: model %s, method %s, kernel %s -> %s", tag, cfg.model.name, cfg.method.name,
             cfg.kernel.attention, store_dir)
    session.job_started(store_dir)
    t0 = time.perf_counter()
    counts = run_job(cfg, store_dir, job_info, out_dir=out_dir, session=session)
    seconds = time.perf_counter() - t0
    session.job_finished(tag, counts, store_dir, seconds)
    write_job_record(tag, counts, store_dir, seconds)  # launcher=lanes: the launching process counts it
    # logging, not print: the line lands in the job's run.log as well as on the console
    log.info("[svg2-run] %s: %d ok, %d failed, %d already done in %.1f s -> %s%s", tag, counts["ok"], counts["failed"],
             counts["skipped"], seconds, store_dir, f" ({_retry_hint([store_dir])})" if counts["failed"] else "")
    return {**counts, "store_dir": str(store_dir)}


def summary_lines(session: RunSession) -> list[str]:
    """The closing lines of an invocation: row counts over its jobs, and what to do about failed rows."""
    jobs = session.jobs
    if not jobs:
        return []
    t = session.totals()
    stores = list(dict.fromkeys(j.store_dir for j in jobs))
    lines = [f"[svg2-run] {len(jobs)} job(s): {t['ok']} ok, {t['failed']} failed, {t['skipped']} already done "
             f"({', '.join(str(s) for s in stores)})"]
    if t["failed"]:
        failed = [j.tag for j in jobs if j.counts.get("failed")]
        lines.append(f"[svg2-run] FAILED: {t['failed']} row(s) in {len(failed)} job(s) ({'; '.join(failed[:5])}"
                     f"{' ...' if len(failed) > 5 else ''}). Each failed row holds its stage, error and traceback "
                     f"(the report's failures.md lists them). {_retry_hint(stores)}")
    return lines


def _interrupted(session: RunSession) -> None:
    saved = session.rows_saved()
    stores = ", ".join(str(s) for s in session.stores) or "no store yet"
    print(f"\n[svg2-run] interrupted: {saved['ok']} row(s) saved by this launch ({saved['failed']} failed) in "
          f"{stores}. Relaunch the same command to resume: finished rows are skipped.", file=sys.stderr, flush=True)


def _add_worker_jobs(session: RunSession, records: Path) -> None:
    """Add the jobs that worker processes (launcher=lanes) recorded in ``records`` to ``session``, then remove
    the folder (a second call adds nothing)."""
    if not records.is_dir():
        return
    for rec in read_job_records(records, skip_pid=os.getpid()):
        session.job_finished(rec["tag"], rec["counts"], Path(rec["store_dir"]), rec["seconds"])
    shutil.rmtree(records, ignore_errors=True)


def main() -> None:
    """``svg2-run [overrides]``: one session (pipeline reuse) for every job this process runs."""
    import hydra

    from svg2.harness.schema import register_configs

    register_configs()
    session = RunSession()
    before = {k: os.environ.get(k) for k in (LAUNCH_ENV, RECORDS_ENV)}
    start_launch()  # this invocation's id: its job folders are its own (svg2.harness.launch)
    records = Path(tempfile.mkdtemp(prefix="svg2-jobs-"))
    os.environ[RECORDS_ENV] = str(records)  # worker processes (launcher=lanes) inherit it

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def svg2_run(cfg: DictConfig) -> dict[str, Any]:
        return run_from_hydra(cfg, session)

    try:
        svg2_run()
    except KeyboardInterrupt:
        # Every finished row is on disk already (atomic row files): say so, without a traceback.
        _add_worker_jobs(session, records)
        _interrupted(session)
        raise SystemExit(130) from None
    finally:  # another invocation in this process (tests, notebooks) starts its own launch
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _add_worker_jobs(session, records)
    lines = summary_lines(session)
    if lines:
        print("\n".join(lines), file=sys.stderr, flush=True)
    if session.totals()["failed"]:
        raise SystemExit(1)
