"""Prompt sharding: split the (job, prompt, seed) rows of a sweep across ranks, one video per GPU.

Shares are a stable function of the full row list (round-robin), not of what is finished: ranks need no
communication to agree, a (prompt, seed) pair keeps its rank across the jobs of a sweep (its dense reference is
generated once and then read from the reference cache), and a relaunch resumes (each rank skips its finished
rows). Every rank writes into the one results store (``svg2.harness.store.ResultsStore``: one file per row
key, consolidation under a file lock), so shares merge by construction; ``merge_stores`` merges stores that
were written apart (node-local disks).

    rows = my_rows(all_rows, key=lambda r: r.key, store=store)   # this rank's unfinished rows, in sweep order
    for row in rows: ...run, store.write(result, consolidate=False)...
    finish(store)                                                 # barrier, then rank 0 consolidates
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from svg2.parallel.dist import DistInfo, barrier, dist_info

__all__ = ["shard_keys", "pending_keys", "my_rows", "finish", "merge_stores"]

T = TypeVar("T")


def shard_keys(keys: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of ``keys`` for ``rank``: disjoint across ranks, together exactly ``keys``, sweep order
    kept (so expensive jobs listed together spread over ranks). Duplicate keys are an error."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if len(set(keys)) != len(keys):
        dup = sorted({str(k) for k in keys if list(keys).count(k) > 1})
        raise ValueError(f"duplicate row keys would run twice: {dup[:5]}")
    return list(keys[rank::world_size])


def pending_keys(store: Any, keys: Iterable[str], retry_failed: bool = True) -> list[str]:
    """The keys that ``store`` has not finished (failed ones too, with ``retry_failed``), in order."""
    return [k for k in keys if store.should_run(k, retry_failed=retry_failed)]


def my_rows(rows: Sequence[T], key: Callable[[T], str], store: Any, *, retry_failed: bool = True,
            info: DistInfo | None = None) -> list[T]:
    """This rank's rows still to run (all pending rows for a single process).

    Args:
        rows: every row of the sweep (job, prompt, seed), in sweep order, identical on every rank.
        key: the row key the store files it under.
        store: a ResultsStore (anything with ``should_run(key, retry_failed=...)``).
        info: rank and world size; default: from torch.distributed or torchrun's environment.
    """
    info = info or dist_info()
    by_key = {key(r): r for r in rows}
    keys = list(by_key)
    if len(keys) != len(rows):
        raise ValueError("two rows of the sweep have the same key; they would overwrite each other")
    return [by_key[k] for k in pending_keys(store, shard_keys(keys, info.rank, info.world_size), retry_failed)]


def finish(store: Any) -> None:
    """Wait for every rank's rows, then rank 0 rebuilds the store's Parquet/JSONL files once."""
    barrier()
    if dist_info().is_main:
        store.consolidate()
    barrier()


def merge_stores(dst: Any, *sources: str | Path, consolidate: bool = True) -> int:
    """Copy the row files of other stores (e.g. per-node stores on local disks) into ``dst``; a finished row
    wins over a failed one, then the later one. Returns the number of rows copied."""
    copied = 0
    for src in sources:
        for p in sorted((Path(src) / "rows").glob("*.json")):
            try:
                row = json.loads(p.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            key = row.get("key", p.stem)
            have = dst.get(key)
            if have is not None and _rank(have) >= _rank(row):
                continue
            tmp = dst.rows_dir / f".{p.name}.merge"
            shutil.copyfile(p, tmp)
            tmp.replace(dst.rows_dir / p.name)
            copied += 1
    if consolidate:
        dst.consolidate()
    return copied


def _rank(row: dict[str, Any]) -> tuple[int, str]:
    return (1 if row.get("status") == "ok" else 0, str(row.get("finished_at", "")))
