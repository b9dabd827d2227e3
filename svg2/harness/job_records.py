"""What jobs run in other local processes (launcher=lanes: hydra-submitit's local executor) tell ``svg2-run``.

Hydra hands a launcher's job returns to its sweeper, not back to ``svg2-run``, so a job that ran in a worker
process reported its row counts to nobody: the launch exited 0 with failed rows. ``svg2-run`` now names a
folder in ``SVG2_JOB_RECORDS`` (inherited by the workers); every job writes one JSON record there, and the
launching process adds the records of other processes to its session (summary line, exit status 1 on a failed
row), exactly as for jobs it ran itself. SLURM jobs run elsewhere: they see no such folder and write nothing.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from svg2.harness.store import atomic_write_text

__all__ = ["RECORDS_ENV", "write_job_record", "read_job_records"]

RECORDS_ENV = "SVG2_JOB_RECORDS"
log = logging.getLogger("svg2.harness")


def write_job_record(tag: str, counts: dict[str, int], store_dir: Path, seconds: float) -> Path | None:
    """One finished job's record in the folder ``SVG2_JOB_RECORDS`` names (None when unset or not a folder on
    this machine)."""
    folder = os.environ.get(RECORDS_ENV)
    if not folder or not Path(folder).is_dir():
        return None
    path = Path(folder) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    atomic_write_text(path, json.dumps({"pid": os.getpid(), "tag": tag, "counts": dict(counts),
                                        "store_dir": str(store_dir), "seconds": seconds}))
    return path


def read_job_records(folder: Path, skip_pid: int | None = None) -> list[dict[str, Any]]:
    """The records in ``folder``, without those ``skip_pid`` wrote (the launching process's own jobs are in its
    session already)."""
    out = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("unreadable job record %s: %s", p, e)
            continue
        if rec.get("pid") != skip_pid:
            out.append(rec)
    return out
