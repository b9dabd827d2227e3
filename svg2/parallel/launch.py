"""Run a function on N local processes joined in a process group: CPU tests (gloo) and debugging without
torchrun. Production launches use torchrun (one video: Ulysses; many videos: prompt sharding) or SLURM."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_on_ranks", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, threads: int,
           args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, backend: str = "gloo",
                 threads_per_rank: int = 1) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with the default process group
    initialised (``backend``, on localhost) and torchrun's environment variables set. ``fn`` must be importable
    (a module-level function); results come back through files. Raises if any rank fails."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), backend, threads_per_rank, args), nprocs=world_size,
             join=True)
