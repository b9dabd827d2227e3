"""How a harness job runs under torchrun: one rank-policy object per job, chosen by ``parallel.mode``.

* ``none`` (:class:`SingleProcess`): one process, the default; every hook is the identity.
* ``shard`` (:class:`PromptSharding`): one video per GPU. Each rank runs a fixed share of the (prompt, seed)
  pairs of every job (``shard_keys`` over the job's full list, so a pair keeps its rank across jobs and its
  dense reference is generated once, by that rank, then read from the reference cache) and writes its rows
  into the one results store. Finished rows are skipped on relaunch.
* ``ulysses`` (:class:`UlyssesParallel`): one video on all GPUs (diffusers' context parallelism,
  ``svg2.parallel.ulysses``). Every rank makes the same generation calls in lockstep; rank 0 writes rows,
  videos, references and logs, the other ranks (followers) read the store and the reference cache, to take
  the same decisions, and write into a scratch folder.

    torchrun --nproc-per-node 2 -m experiments.run -m launcher=torchrun method=dense,svg2        # shard
    torchrun --nproc-per-node 2 -m experiments.run launcher=torchrun parallel.mode=ulysses ...   # ulysses

The harness depends on ``svg2.parallel`` (process groups, sharding, Ulysses), never the other way round.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from svg2.harness.reference import ReferenceCache
from svg2.harness.store import ResultsStore
from svg2.parallel.dist import DistInfo, barrier, dist_info
from svg2.parallel.sharding import shard_keys

__all__ = ["MODES", "RankPolicy", "SingleProcess", "PromptSharding", "UlyssesParallel", "rank_policy", "mode_of"]

MODES = ("none", "shard", "ulysses")

T = TypeVar("T")


def mode_of(cfg: Any) -> str:
    """``parallel.mode`` of a run config (``none`` when the node is absent), validated."""
    par = cfg.get("parallel") if hasattr(cfg, "get") else getattr(cfg, "parallel", None)
    mode = str(par.get("mode", "none") if par is not None else "none")
    if mode not in MODES:
        raise ValueError(f"parallel.mode={mode!r}; use one of {MODES}")
    return mode


class RankPolicy:
    """What this rank does in a job. The base class is one process (``parallel.mode=none``): it refuses a
    multi-process launch, where every rank would run every row."""

    mode = "none"

    def __init__(self, info: DistInfo | None = None, scratch: Callable[[], Path] | None = None) -> None:
        self.info = info or dist_info()
        # A folder for what a rank computes but must not keep (followers); made on first use.
        self._scratch = scratch or (lambda: Path(tempfile.mkdtemp(prefix=f"svg2-rank{self.info.rank}-")))

    # -- process set-up ---------------------------------------------------------------------------------------
    def setup(self) -> DistInfo:
        """Join the process group of a torchrun / SLURM launch (idempotent)."""
        _export_slurm_env()
        self.info = dist_info()
        if self.info.distributed:
            raise ValueError(f"launched on {self.info.world_size} processes but parallel.mode=none: every rank "
                             "would run every row. Use launcher=torchrun (prompt sharding) or "
                             "parallel.mode=ulysses.")
        return self.info

    def shared_path(self, path: Path) -> Path:
        """Rank 0's ``path`` on every rank (Hydra's timestamped run folders differ by a second across ranks)."""
        if not (dist.is_available() and dist.is_initialized()):
            return path
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        return Path(box[0])

    # -- one job ----------------------------------------------------------------------------------------------
    def job_start(self) -> None:
        """Called before a job decides which rows to run."""

    def rows(self, items: list[T]) -> list[T]:
        """This rank's share of a job's (prompt, seed) pairs."""
        return items

    def parallelize(self, pipe: Any) -> Any:
        """The pipeline as this mode runs it (called once per loaded pipeline)."""
        return pipe

    @property
    def writes(self) -> bool:
        """Whether this rank's rows, videos, references and logs are the run's (False: a follower)."""
        return True

    @property
    def locks(self) -> bool:
        """Whether this rank takes the job and reference locks (:mod:`svg2.harness.locks`) on its own. False
        where ranks work in lockstep (ulysses): a rank waiting on a lock another rank holds while that rank
        waits in a collective for it would deadlock."""
        return True

    def store(self, store: ResultsStore) -> Any:
        return store

    def cache(self, cache: ReferenceCache) -> ReferenceCache:
        return cache

    def identity(self) -> dict[str, Any]:
        """What the parallel set-up adds to a row's identity (the row key)."""
        return {}

    def row_fields(self) -> dict[str, Any]:
        """Columns of every row: how it ran."""
        return {"parallel_mode": self.mode, "num_gpus_per_video": 1}

    def stats_view(self, handle: Any) -> Any:
        """The handle whose ``stats()`` a row records."""
        return handle

    def report_allowed(self) -> bool:
        """Wait for every rank's rows, then let rank 0 alone write the report."""
        barrier()
        return dist_info().is_main


class SingleProcess(RankPolicy):
    """``parallel.mode=none``."""


class PromptSharding(RankPolicy):
    """``parallel.mode=shard``: rows split round-robin across ranks, every rank writes its own rows. Ranks only
    meet at the end of a sweep, so the gloo group gets a long timeout."""

    mode = "shard"

    def setup(self) -> DistInfo:
        _export_slurm_env()
        return _init_group(self, "gloo", datetime.timedelta(days=7))

    def rows(self, items: list[T]) -> list[T]:
        if not self.info.distributed:
            return items
        # a repeated pair runs once
        return shard_keys(list(dict.fromkeys(items)), self.info.rank, self.info.world_size)


class UlyssesParallel(RankPolicy):
    """``parallel.mode=ulysses``: one video on ``degree`` ranks (default: all), rank 0 writes."""

    mode = "ulysses"

    def __init__(self, info: DistInfo | None = None, scratch: Callable[[], Path] | None = None,
                 degree: int | None = None) -> None:
        super().__init__(info, scratch)
        self._degree = degree

    @property
    def degree(self) -> int:
        return int(self._degree or self.info.world_size)

    def setup(self) -> DistInfo:
        _export_slurm_env()
        cuda = torch.cuda.is_available()
        return _init_group(self, "nccl" if cuda else "gloo", datetime.timedelta(minutes=30))

    def job_start(self) -> None:
        barrier()  # every rank sees rank 0's writes of the previous job before deciding what to run

    def parallelize(self, pipe: Any) -> Any:
        if not self.info.distributed:
            return pipe
        from svg2.parallel.ulysses import enable_ulysses

        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                enable_ulysses(getattr(pipe, name), self.degree)
        return pipe

    @property
    def writes(self) -> bool:
        return self.info.is_main

    @property
    def locks(self) -> bool:
        return not self.info.distributed  # ranks in lockstep: no rank may wait on a lock alone

    def store(self, store: ResultsStore) -> Any:
        return store if self.writes else _ReadThroughStore(store, self._scratch() / "results")

    def cache(self, cache: ReferenceCache) -> ReferenceCache:
        return cache if self.writes else _ReadThroughCache(cache, self._scratch() / "cache")

    def identity(self) -> dict[str, Any]:
        # A Ulysses row (latency on N GPUs) is not the single-GPU row. Prompt sharding changes nothing (same
        # computation), so its rows resume single-process runs.
        return {"ulysses_degree": self.degree} if self.degree > 1 else {}

    def row_fields(self) -> dict[str, Any]:
        return {"parallel_mode": self.mode, "num_gpus_per_video": self.degree}

    def stats_view(self, handle: Any) -> Any:
        # stats over all ranks' heads: a collective, all ranks call it in lockstep
        if handle is None or not self.info.distributed:
            return handle
        from svg2.parallel.ulysses import GlobalStatsView

        return GlobalStatsView(handle)


def rank_policy(cfg: Any, *, scratch: Callable[[], Path] | None = None,
                info: DistInfo | None = None) -> RankPolicy:
    """The policy of a run config's ``parallel`` node (``none`` when it has none)."""
    mode = mode_of(cfg)
    if mode == "shard":
        return PromptSharding(info, scratch)
    if mode == "ulysses":
        return UlyssesParallel(info, scratch, degree=cfg.get("parallel").get("ulysses_degree"))
    return SingleProcess(info, scratch)


def _init_group(policy: RankPolicy, backend: str, timeout: datetime.timedelta) -> DistInfo:
    info = dist_info()
    if info.distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)  # model.device=auto then means this rank's GPU
        kwargs = {"device_id": torch.device("cuda", info.local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        info = dist_info()
    policy.info = info
    return info


def _export_slurm_env() -> None:
    # launcher=slurm: the tasks of a submitit job get SLURM's variables, not torchrun's; submitit turns them into
    # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
    env = os.environ
    if "RANK" in env or env.get("SUBMITIT_EXECUTOR") != "slurm" or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


class _ReadThroughStore:
    """Reads a results store, writes into a scratch store (a follower takes rank 0's decisions without
    writing rank 0's rows)."""

    def __init__(self, real: ResultsStore, scratch: Path) -> None:
        self._real, self._scratch = real, ResultsStore(scratch)
        self.root, self.rows_dir = self._scratch.root, self._scratch.rows_dir

    def get(self, key: str) -> dict[str, Any] | None:
        return self._real.get(key)

    def status(self, key: str) -> str | None:
        return self._real.status(key)

    def should_run(self, key: str, retry_failed: bool = True) -> bool:
        return self._real.should_run(key, retry_failed=retry_failed)

    def write(self, row: dict[str, Any], consolidate: bool = True) -> None:
        self._scratch.write(row, consolidate=False)

    def consolidate(self) -> None:
        return None


class _ReadThroughCache(ReferenceCache):
    """Reads the reference cache, puts new references into a scratch cache."""

    def __init__(self, real: ReferenceCache, scratch: Path) -> None:
        super().__init__(real.root, dtype=real.dtype, enabled=real.enabled)
        self._scratch = ReferenceCache(scratch, dtype=real.dtype, enabled=True)

    def put(self, key: str, frames: Any, meta: dict[str, Any], fps: int,
            write_video: bool = True) -> tuple[Any, Path | None]:
        return self._scratch.put(key, frames, meta, fps, write_video=write_video)
