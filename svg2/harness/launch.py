"""The launch id of an ``svg2-run`` invocation and the ``${svg2_launch:}`` resolver that puts it in folder names.

Each launch writes its job folders (``run.log``, ``.hydra/``) under its own id, so two launches under one
``name`` never share, and so never overwrite, a folder; the results store sits above those folders, at a path
without the id, so a relaunch of the same command finds it and resumes. The id is the launch's start time to the
microsecond, then the process id: ``2026-12-04_15-19-00.123456_4242``. It sorts by time (the pid only breaks
ties) and two processes cannot share it.

One invocation has one id (:func:`start_launch`, called by ``svg2-run``'s ``main``). It is also exported as
``SVG2_LAUNCH_ID``, so processes that resolve the config of its jobs elsewhere (submitit's SLURM jobs inherit
the environment of the submitting process) name their folders after the same launch.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["LAUNCH_ENV", "RESOLVER", "new_launch_id", "current_launch_id", "start_launch", "ensure_launch_resolver",
           "single_run_store"]

LAUNCH_ENV = "SVG2_LAUNCH_ID"
RESOLVER = "svg2_launch"


def new_launch_id(now: datetime | None = None, pid: int | None = None) -> str:
    """A fresh id: local start time with microseconds, then the process id (sortable, unique per process)."""
    now = now or datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S.%f}_{os.getpid() if pid is None else pid}"


def current_launch_id() -> str:
    """The id of the launch this process belongs to: ``SVG2_LAUNCH_ID`` when set (by :func:`start_launch` here
    or in the process that submitted this one); otherwise a fresh id, exported for the rest of the process."""
    launch = os.environ.get(LAUNCH_ENV)
    if not launch:
        launch = os.environ[LAUNCH_ENV] = new_launch_id()
    return launch


def ensure_launch_resolver() -> None:
    """Register ``${svg2_launch:}`` (idempotent); it returns :func:`current_launch_id` when a config resolves it."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, current_launch_id)


def start_launch() -> str:
    """Begin a new launch in this process: a fresh id, exported as ``SVG2_LAUNCH_ID`` (so each ``svg2-run``
    invocation, even several in one process, gets its own job folders). Returns the id."""
    launch = os.environ[LAUNCH_ENV] = new_launch_id()
    ensure_launch_resolver()
    return launch


def single_run_store(run_dir: Path) -> Path:
    """The results store of a single (not ``-m``) run whose Hydra run folder is ``run_dir``: beside the launch
    folders when the run folder is named after the launch (the default ``outputs/<name>/<launch id>``: the store is
    ``outputs/<name>/results``, one per name, so relaunching resumes), else inside the run folder (a fixed
    ``hydra.run.dir=<dir>`` is stable by itself)."""
    if run_dir.name == os.environ.get(LAUNCH_ENV):
        return run_dir.parent / "results"
    return run_dir / "results"


# On import as well: a process that only resolves a job's config (a submitit SLURM job unpickles svg2-run's task,
# which imports svg2.harness.cli and so this module) needs the resolver before Hydra names the job's folder.
ensure_launch_resolver()
