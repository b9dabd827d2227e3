"""The results store: one row per (job, prompt, seed), safe against killed runs and concurrent jobs.

Layout of a store folder::

    rows/<key>.json      one file per row, written atomically (tmp + rename): the source of truth
    results.parquet      all rows, rebuilt atomically after every write (under a file lock)
    results.jsonl        the same rows as JSON lines (a greppable mirror)

A relaunched sweep asks :meth:`ResultsStore.status` per row key and skips finished rows; a failed row is kept
with its error and retried on relaunch (``retry_failed``). Rows cannot be duplicated: a key names one file.
Several processes (SLURM jobs) may write to one store at once; consolidation takes an exclusive ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["ResultsStore", "find_stores", "require_stores", "load_results", "atomic_write_text", "shareable_mkstemp"]


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def shareable_mkstemp(directory: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` with the mode a plain ``open()`` gives (0666 less the umask), not mkstemp's 0600:
    stores and caches on a shared cluster are read by collaborators, and the rename keeps the temp file's mode."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = shareable_mkstemp(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "inf" / "nan": JSON has no literal; _from_json turns it back
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return _jsonable(v.item())
    return v


_SPECIAL = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _special(v: Any) -> Any:
    if isinstance(v, str) and v in _SPECIAL:
        return _SPECIAL[v]
    if isinstance(v, list):  # per-frame lists (psnr_frames: inf for an identical frame)
        return [_special(x) for x in v]
    return v


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _special(v) for k, v in row.items()}


class ResultsStore:
    """A folder of result rows. Rows are flat dicts; nested values should be JSON strings (``*_json``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.rows_dir = self.root / "rows"
        self.parquet_path = self.root / "results.parquet"
        self.jsonl_path = self.root / "results.jsonl"
        self.rows_dir.mkdir(parents=True, exist_ok=True)

    def _row_path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid row key {key!r}")
        return self.rows_dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self._row_path(key)
        if not p.is_file():
            return None
        try:
            return _from_json(json.loads(p.read_text()))
        except (json.JSONDecodeError, OSError):
            return None  # cannot happen with atomic writes; treat as absent

    def status(self, key: str) -> str | None:
        """``"ok"``, ``"failed"`` or None (never run)."""
        row = self.get(key)
        return None if row is None else row.get("status")

    def should_run(self, key: str, retry_failed: bool = True) -> bool:
        st = self.status(key)
        return st is None or (st != "ok" and retry_failed)

    def write(self, row: dict[str, Any], consolidate: bool = True) -> None:
        if "key" not in row or "status" not in row:
            raise ValueError("a result row needs 'key' and 'status'")
        atomic_write_text(self._row_path(row["key"]), json.dumps(_jsonable(row), sort_keys=True))
        if consolidate:
            self.consolidate()

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.rows_dir.glob("*.json")):
            try:
                out.append(_from_json(json.loads(p.read_text())))
            except (json.JSONDecodeError, OSError):
                continue
        return out

    def load(self) -> pd.DataFrame:
        rows = self.rows()
        if rows:
            return pd.DataFrame(rows)
        if self.parquet_path.is_file():
            return pd.read_parquet(self.parquet_path)
        return pd.DataFrame()

    @contextlib.contextmanager
    def _lock(self):
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def consolidate(self) -> pd.DataFrame:
        """Rebuild ``results.parquet`` and ``results.jsonl`` from the row files (atomically, locked)."""
        with self._lock():
            rows = self.rows()
            df = pd.DataFrame(rows)
            if not df.empty:
                df = df.sort_values([c for c in ("finished_at", "key") if c in df.columns], kind="stable")
                fd, tmp = shareable_mkstemp(self.root, prefix=".results.", suffix=".parquet.tmp")
                os.close(fd)
                try:
                    df.to_parquet(tmp, index=False)
                    os.replace(tmp, self.parquet_path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                lines = [json.dumps(_jsonable(r), sort_keys=True) for r in df.to_dict(orient="records")]
                atomic_write_text(self.jsonl_path, "\n".join(lines) + "\n")
            return df

    def drop_failed(self) -> int:
        """Move every failed row out of the store (to ``dropped/<key>.json``, kept for inspection), rebuild the
        snapshots, return how many moved. A row a running job rewrites as ``ok`` meanwhile stays: each file is
        moved first and checked after, and an ``ok`` row is put back unless a newer file took its place."""
        dropped_dir = self.root / "dropped"
        n = 0
        with self._lock():
            for p in sorted(self.rows_dir.glob("*.json")):
                try:
                    if json.loads(p.read_text()).get("status") == "ok":
                        continue
                except (json.JSONDecodeError, OSError):
                    continue  # unreadable: not known to be failed; the report counts it as corrupt
                dropped_dir.mkdir(exist_ok=True)
                dest = dropped_dir / p.name
                try:
                    os.replace(p, dest)
                except FileNotFoundError:
                    continue
                try:
                    status = json.loads(dest.read_text()).get("status")
                except (json.JSONDecodeError, OSError):
                    status = None
                if status == "ok":  # rewritten by a running job between the read and the move: put it back
                    with contextlib.suppress(FileExistsError):
                        os.link(dest, p)  # never over a newer row file
                    dest.unlink()
                    continue
                n += 1
            if n and not any(self.rows_dir.glob("*.json")):  # none left: the snapshots must not bring them back
                for snap in (self.parquet_path, self.jsonl_path):
                    with contextlib.suppress(FileNotFoundError):
                        snap.unlink()
        if n:
            self.consolidate()
        return n


def find_stores(path: str | Path) -> list[Path]:
    """Store folders at or under ``path`` (a store, a run/sweep folder, a folder of sweeps, or a store's
    results.parquet / results.jsonl[.gz] file)."""
    path = Path(path)
    # A committed results folder may keep only the JSONL mirror, gzipped (results/ in the repository).
    snapshots = ("results.parquet", "results.jsonl", "results.jsonl.gz")
    if path.is_file() and path.name in snapshots:  # the snapshot file itself names its store
        return [path.parent]
    if (path / "rows").is_dir() or any((path / n).is_file() for n in snapshots):
        return [path]
    found = {p.parent for n in snapshots for p in path.glob(f"**/{n}")} | {p.parent for p in path.glob("**/rows")
                                                                           if p.is_dir()}
    return sorted(found)


def require_stores(path: str | Path) -> list[Path]:
    """:func:`find_stores`, or an error naming what a store looks like when there is none."""
    stores = find_stores(path)
    if not stores:
        raise FileNotFoundError(f"no results store (rows/, results.parquet or results.jsonl[.gz]) at or under "
                                f"{str(path)!r}")
    return stores


def load_results(*paths: str | Path) -> pd.DataFrame:
    """All rows of every store found under ``paths`` (row files preferred over the Parquet snapshot, that over
    the JSONL mirror)."""
    frames = []
    for p in paths:
        for s in require_stores(p):
            rows_dir = s / "rows"
            if rows_dir.is_dir() and any(rows_dir.glob("*.json")):
                df = ResultsStore(s).load()
            elif (s / "results.parquet").is_file():
                df = pd.read_parquet(s / "results.parquet")
            elif (s / "results.jsonl").is_file() or (s / "results.jsonl.gz").is_file():
                mirror = s / "results.jsonl"
                lines = (mirror.read_text() if mirror.is_file()
                         else gzip.decompress((s / "results.jsonl.gz").read_bytes()).decode()).splitlines()
                df = pd.DataFrame([_from_json(json.loads(ln)) for ln in lines if ln.strip()])
            else:
                df = pd.DataFrame()
            if not df.empty:
                df["store"] = str(s)
                frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if "key" in df.columns:
        df = df.drop_duplicates(subset=["key", "store"], keep="last")
    return df
