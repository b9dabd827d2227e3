"""What the jobs of one process share: an object the entry point creates and passes down, never module state.

``svg2-run`` makes one :class:`RunSession` per process; a multirun with the basic launcher runs its jobs in
that process, so a job whose model (and ``compile``) matches the previous job's reuses the loaded pipeline.
``run_job`` without a session makes a fresh one for that job alone.
"""

from __future__ import annotations

import gc
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from svg2.harness.models import load_pipeline

__all__ = ["LoadedPipeline", "RunSession"]


@dataclass
class LoadedPipeline:
    pipe: Any
    device: torch.device
    dtype: torch.dtype


class RunSession:
    """The loaded pipeline (one at a time) and this rank's scratch folder, for the jobs of one process."""

    def __init__(self) -> None:
        self._pipe_key: str | None = None
        self._pipe: LoadedPipeline | None = None
        self._scratch: Path | None = None

    def pipeline(self, cfg: DictConfig, parallelize: Any = None) -> LoadedPipeline:
        """The pipeline of ``cfg.model`` (and ``cfg.compile``): the session's current one when they match,
        else the current one is freed first and a new one loaded, ``parallelize(pipe)`` applied (the rank
        policy's, e.g. Ulysses sharding) and the transformers compiled when asked."""
        model = OmegaConf.to_container(cfg.model, resolve=True) if isinstance(cfg.model, DictConfig) else cfg.model
        key = json.dumps({"model": model, "compile": bool(cfg.compile)}, sort_keys=True, default=str)
        if key != self._pipe_key or self._pipe is None:
            self.release()  # one pipeline at a time: free the previous one first
            pipe, device, dtype = load_pipeline(cfg.model)
            if parallelize is not None:
                pipe = parallelize(pipe)
            if cfg.compile:
                for name in ("transformer", "transformer_2"):
                    if getattr(pipe, name, None) is not None:
                        setattr(pipe, name, torch.compile(getattr(pipe, name)))
            self._pipe, self._pipe_key = LoadedPipeline(pipe, device, dtype), key
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
