"""How the experiment harness (``svg2.harness.runner``) runs under torchrun: the few calls it makes.

``parallel.mode`` (``RunConfig.parallel``):

* ``none``: one process (the default; every hook is the identity).
* ``shard``: one video per GPU. Each rank runs a fixed share of the (prompt, seed) pairs of every job
  (``shard_keys`` over the job's full list, so a pair keeps its rank across jobs and its dense reference is
  generated once, by that rank, and then read from the reference cache) and writes its rows into the one
  results store. Finished rows are skipped on relaunch.
* ``ulysses``: one video on all GPUs (diffusers' context parallelism, ``svg2.parallel.ulysses``). Every rank
  makes the same generation calls in lockstep; rank 0 writes rows, videos, references and logs, the other
  ranks read the store and the reference cache (to take the same decisions) and write to a scratch folder.

    torchrun --nproc-per-node 2 -m experiments.run -m launcher=torchrun method=dense,svg2        # shard
    torchrun --nproc-per-node 2 -m experiments.run launcher=torchrun parallel.mode=ulysses ...   # ulysses
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from svg2.parallel.dist import DistInfo, barrier, dist_info
from svg2.parallel.sharding import shard_keys

__all__ = ["MODES", "mode_of", "setup", "shared_path", "rows_for_rank", "parallelize", "is_follower",
           "store_for_rank", "cache_for_rank", "identity", "row_fields", "stats_view", "job_start", "report_allowed"]

MODES = ("none", "shard", "ulysses")


def mode_of(cfg: Any) -> str:
    par = cfg.get("parallel") if hasattr(cfg, "get") else getattr(cfg, "parallel", None)
    mode = str(par.get("mode", "none") if par is not None else "none")
    if mode not in MODES:
        raise ValueError(f"parallel.mode={mode!r}; use one of {MODES}")
    return mode


def _export_slurm_env() -> None:
    # launcher=slurm: the tasks of a submitit job get SLURM's variables, not torchrun's; submitit turns them into
    # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
    env = os.environ
    if "RANK" in env or env.get("SUBMITIT_EXECUTOR") != "slurm" or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def setup(cfg: Any) -> DistInfo:
    """Join the process group of a torchrun launch (idempotent). ``shard`` waits only at the end of a sweep,
    so its ranks may drift apart for long: its group gets a long timeout."""
    mode = mode_of(cfg)
    _export_slurm_env()
    info = dist_info()
    if mode == "none" and info.distributed:
        raise ValueError(f"launched on {info.world_size} processes but parallel.mode=none: every rank would run "
                         "every row. Use launcher=torchrun (prompt sharding) or parallel.mode=ulysses.")
    if not info.distributed or dist.is_initialized():
        return info
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(info.local_rank)  # model.device=auto then means this rank's GPU
    if mode == "ulysses":
        backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(minutes=30)
    else:
        backend, timeout = "gloo", datetime.timedelta(days=7)
    kwargs = {"device_id": torch.device("cuda", info.local_rank)} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    return dist_info()


def rows_for_rank(cfg: Any, items: list) -> list:
    """This rank's share of a job's (prompt, seed) pairs (all of them unless ``parallel.mode=shard``)."""
    info = dist_info()
    if mode_of(cfg) != "shard" or not info.distributed:
        return items
    return shard_keys(list(dict.fromkeys(items)), info.rank, info.world_size)  # a repeated pair runs once


def parallelize(cfg: Any, pipe: Any) -> Any:
    """``ulysses``: shard the sequence of the pipeline's transformer(s) across all ranks."""
    if mode_of(cfg) != "ulysses" or not dist_info().distributed:
        return pipe
    from svg2.parallel.ulysses import enable_ulysses

    degree = _degree(cfg)
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            enable_ulysses(getattr(pipe, name), degree)
    return pipe


def is_follower(cfg: Any) -> bool:
    """A Ulysses rank other than 0: computes with the others, writes nothing that lasts."""
    return mode_of(cfg) == "ulysses" and not dist_info().is_main


class _ReadThroughStore:
    """Reads a results store, writes into a scratch store (a follower takes rank 0's decisions without
    writing rank 0's rows)."""

    def __init__(self, real: Any, scratch: Path) -> None:
        from svg2.harness.store import ResultsStore

        self._real, self._scratch = real, ResultsStore(scratch)
        self.root, self.rows_dir = self._scratch.root, self._scratch.rows_dir

    def get(self, key: str):
        return self._real.get(key)

    def status(self, key: str):
        return self._real.status(key)

    def should_run(self, key: str, retry_failed: bool = True) -> bool:
        return self._real.should_run(key, retry_failed=retry_failed)

    def write(self, row: dict[str, Any], consolidate: bool = True) -> None:
        self._scratch.write(row, consolidate=False)

    def consolidate(self):
        return None


_SCRATCH: list[Path] = []


def _scratch() -> Path:
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix=f"svg2-rank{dist_info().rank}-")))
    return _SCRATCH[0]


def store_for_rank(cfg: Any, store: Any) -> Any:
    """Followers read the results store and write their rows to a scratch folder."""
    return _ReadThroughStore(store, _scratch() / "results") if is_follower(cfg) else store


def cache_for_rank(cfg: Any, cache: Any) -> Any:
    """Followers read the reference cache and put their references into a scratch folder."""
    if not is_follower(cfg):
        return cache
    from svg2.harness.reference import ReferenceCache

    scratch = _scratch() / "cache"

    class _ReadThroughCache(ReferenceCache):
        def put(self, key, frames, meta, fps):
            return ReferenceCache(scratch, dtype=self.dtype, enabled=True).put(key, frames, meta, fps)

    return _ReadThroughCache(cache.root, dtype=cache.dtype, enabled=cache.enabled)


def shared_path(path: Path) -> Path:
    """Rank 0's ``path`` on every rank (Hydra's timestamped run folders differ by a second across ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return path
    box = [str(path)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _degree(cfg: Any) -> int:
    par = cfg.get("parallel")
    return int((par.get("ulysses_degree") if par is not None else None) or dist_info().world_size)


def identity(cfg: Any) -> dict[str, Any]:
    """What the parallel set-up adds to a row's identity: a Ulysses row (latency on N GPUs) is not the
    single-GPU row. Prompt sharding changes nothing (same computation), so its rows resume single runs."""
    return {"ulysses_degree": _degree(cfg)} if mode_of(cfg) == "ulysses" and _degree(cfg) > 1 else {}


def row_fields(cfg: Any) -> dict[str, Any]:
    """Columns of every row: how it ran."""
    mode = mode_of(cfg)
    return {"parallel_mode": mode, "num_gpus_per_video": _degree(cfg) if mode == "ulysses" else 1}


def stats_view(cfg: Any, handle: Any) -> Any:
    """``ulysses``: the handle with stats over all ranks' heads (a collective; all ranks call it in lockstep)."""
    if handle is None or mode_of(cfg) != "ulysses" or not dist_info().distributed:
        return handle
    from svg2.parallel.ulysses import GlobalStatsView

    return GlobalStatsView(handle)


def job_start(cfg: Any) -> None:
    """``ulysses``: every rank sees rank 0's writes of the previous job before deciding what to run."""
    if mode_of(cfg) == "ulysses":
        barrier()


def report_allowed() -> bool:
    """Wait for every rank's rows, then let rank 0 alone write the report."""
    barrier()
    return dist_info().is_main
