"""What the jobs of one process share: an object the entry point creates and passes down, never module state.

``svg2-run`` makes one :class:`RunSession` per process; a multirun with the basic launcher runs its jobs in
that process, so a job whose model (and ``compile``) matches the previous job's reuses the loaded pipeline.
``run_job`` without a session makes a fresh one for that job alone. The session also keeps what the jobs of
the process did (:meth:`RunSession.job_finished`, :meth:`RunSession.totals`): ``svg2-run`` exits non-zero when a
row failed, and on Ctrl-C says how many rows this launch saved (:meth:`RunSession.rows_saved`).
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from svg2.harness.models import load_pipeline

__all__ = ["LoadedPipeline", "RunSession", "JobRecord"]


@dataclass
class LoadedPipeline:
    pipe: Any
    device: torch.device
    dtype: torch.dtype
    load_s: float = math.nan  # seconds to load (or build) it, parallelize and compile included


@dataclass
class JobRecord:
    """One finished job of the session: its tag (the overrides that name it), row counts and store."""

    tag: str
    counts: dict[str, int]
    store_dir: Path
    seconds: float = math.nan


@dataclass
class _Outcome:
    jobs: list[JobRecord] = field(default_factory=list)
    stores: list[Path] = field(default_factory=list)  # every store a job of this session wrote, in order


class RunSession:
    """The loaded pipeline (one at a time) and this rank's scratch folder, for the jobs of one process."""

    def __init__(self) -> None:
        self._pipe_key: str | None = None
        self._pipe: LoadedPipeline | None = None
        self._scratch: Path | None = None
        self.started_at = time.time()
        self._outcome = _Outcome()

    # -- what the jobs did --------------------------------------------------------------------------------------
    def job_started(self, store_dir: Path) -> None:
        """A job starts writing ``store_dir`` (kept for :meth:`rows_saved` if the launch is interrupted)."""
        if Path(store_dir) not in self._outcome.stores:
            self._outcome.stores.append(Path(store_dir))

    def job_finished(self, tag: str, counts: dict[str, int], store_dir: Path, seconds: float = math.nan) -> None:
        self.job_started(store_dir)
        self._outcome.jobs.append(JobRecord(tag, dict(counts), Path(store_dir), seconds))

    @property
    def jobs(self) -> list[JobRecord]:
        return list(self._outcome.jobs)

    @property
    def stores(self) -> list[Path]:
        return list(self._outcome.stores)

    def totals(self) -> dict[str, int]:
        """Row counts summed over the finished jobs: total, skipped (already done), ok, failed."""
        out = {"total": 0, "skipped": 0, "ok": 0, "failed": 0}
        for job in self._outcome.jobs:
            for k in out:
                out[k] += int(job.counts.get(k, 0))
        return out

    def rows_saved(self) -> dict[str, int]:
        """Rows written since the session started, read from its stores (so the rows of a job cut short count
        too): ``{"ok": n, "failed": m}``."""
        from svg2.harness.store import ResultsStore

        out = {"ok": 0, "failed": 0}
        for store in self._outcome.stores:
            if not (store / "rows").is_dir():
                continue
            for row in ResultsStore(store).rows():
                if (row.get("finished_at") or 0) >= self.started_at and row.get("status") in out:
                    out[row["status"]] += 1
        return out

    def pipeline(self, cfg: DictConfig, parallelize: Any = None) -> LoadedPipeline:
        """The pipeline of ``cfg.model`` (and ``cfg.compile``): the session's current one when they match,
        else the current one is freed first and a new one loaded, ``parallelize(pipe)`` applied (the rank
        policy's, e.g. Ulysses sharding) and the transformers compiled when asked."""
        model = OmegaConf.to_container(cfg.model, resolve=True) if isinstance(cfg.model, DictConfig) else cfg.model
        key = json.dumps({"model": model, "compile": bool(cfg.compile)}, sort_keys=True, default=str)
        if key != self._pipe_key or self._pipe is None:
            self.release()  # one pipeline at a time: free the previous one first
            t0 = time.perf_counter()
            pipe, device, dtype = load_pipeline(cfg.model)
            if parallelize is not None:
                pipe = parallelize(pipe)
            if cfg.compile:
                for name in ("transformer", "transformer_2"):
                    if getattr(pipe, name, None) is not None:
                        setattr(pipe, name, torch.compile(getattr(pipe, name)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._pipe, self._pipe_key = LoadedPipeline(pipe, device, dtype, time.perf_counter() - t0), key
        return self._pipe

    def release(self) -> None:
        """Drop the loaded pipeline and return its memory."""
        self._pipe = self._pipe_key = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def scratch_dir(self) -> Path:
        """A temporary folder of this process (a Ulysses follower's rows and references go there)."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="svg2-run-"))
        return self._scratch
