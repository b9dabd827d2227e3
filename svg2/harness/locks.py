"""Exclusive file locks (``flock``) for jobs that run at once on one machine (launcher=lanes) or share a folder.

Two locks keep concurrent jobs from doing the same work twice:

* a job lock per (job identity, rank) around a whole job: two jobs with the same row keys (``dense`` at three
  densities: its rows ignore the density knob) run one after the other, and the second finds its rows done;
* a reference lock per reference key, held from the cache miss until the reference is stored: the first job
  to need the dense video of a (prompt, seed) makes it, the others wait and read it from the cache.

Locks are taken in sorted path order, so two holders of overlapping sets never deadlock. ``flock`` locks end
with the process that holds them (a killed job leaves no stale lock); the lock files stay (empty, harmless).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["file_locks"]

log = logging.getLogger("svg2.harness")


@contextlib.contextmanager
def file_locks(paths: Iterable[Path], what: str = "lock") -> Iterator[float]:
    """Hold an exclusive lock on every path (created if missing); yields the seconds spent waiting for them
    (0.0: none was held by another process). ``what`` names the locks in the waiting message."""
    ordered = sorted(dict.fromkeys(Path(p) for p in paths))
    waited, told = 0.0, False
    with contextlib.ExitStack() as stack:
        for path in ordered:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    log.info("waiting for %s %s (held by a concurrent job)", what, path.name)
                    told = True
                t0 = time.perf_counter()
                fcntl.flock(fd, fcntl.LOCK_EX)
                waited += time.perf_counter() - t0
            stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
        yield waited
