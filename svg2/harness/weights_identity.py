"""The identity of a model's weights and software stack, for the keys of dense references and result rows.

A key that hashes only the model *preset* goes stale when the weights change under it (retraining in place,
a new Hub revision): the cached dense reference of the old weights would be compared with videos of the new
ones. So the keys also hash :func:`weights_identity`:

- local weights (a ``callable`` loader's weights folder, a ``diffusers`` ``repo_id`` that is a local folder):
  a sha256 over every file's relative path and content. Per-file hashes are cached on disk
  (:class:`FileHashCache`, keyed by absolute path, size and mtime), so a big checkpoint is read once, not for
  every job; rewriting a file (new mtime) re-hashes it.
- Hub ids: the commit the local Hugging Face cache resolves the requested revision to (``refs/<revision>``),
  read from disk, never from the network. Before the first download there is none (``commit: None``): the
  runner computes the identity again once the pipeline is loaded.
- ``tiny_wan``: built in code from its kwargs (already part of the preset): ``{"kind": "code"}``.

A ``callable`` loader names its weights by a ``weights_path(**kwargs)`` attribute on the function (the
mini and testbed loaders have one), else by a ``path`` kwarg; without either its weights cannot be seen and
the identity says so (``{"kind": "callable", "weights": None}``).

:func:`software_stack` is the rest of what changes a video besides the preset and the weights: the torch
and diffusers versions (and, for references, the device's name).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svg2.harness.store import atomic_write_text

__all__ = ["FileHashCache", "files_identity", "hub_identity", "callable_weights_path", "weights_identity",
           "software_stack", "is_resolved", "HASH_CACHE_NAME"]

HASH_CACHE_NAME = ".file_hashes.json"  # inside the reference cache folder (a dot file: never a cache key)
_CHUNK = 1 << 22
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileHashCache:
    """sha256 of files, remembered on disk by (absolute path, size, mtime_ns).

    ``path=None`` keeps nothing between instances (every file is read). The file is rewritten atomically
    after new hashes; concurrent writers may drop each other's entries, which only costs a re-hash.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(os.path.expanduser(str(path))) if path is not None else None
        self._entries: dict[str, list[Any]] | None = None
        self.hashed = 0  # files read by this instance (tests: a cached file is not read again)

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if isinstance(data, dict):
                        self._entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3}
                except (OSError, ValueError):
                    pass  # unreadable: start over (a cache, never the truth)
        return self._entries

    def sha256(self, file: str | Path) -> str:
        p = Path(file).resolve()
        st = p.stat()
        entries = self._load()
        hit = entries.get(str(p))
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        digest = _sha256_file(p)
        self.hashed += 1
        entries[str(p)] = [st.st_size, st.st_mtime_ns, digest]
        if self.path is not None:
            try:
                atomic_write_text(self.path, json.dumps(entries, sort_keys=True))
            except OSError:
                pass  # a read-only cache folder: hashes are recomputed next time, keys stay right
        return digest


# Documentation beside the weights: editing a model card must not rekey every row and dense reference made with
# those weights (it did: a card edit made a resumed sweep regenerate its references and rerun finished rows).
_DOC_SUFFIXES = frozenset({".md", ".rst", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf"})


def _weight_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (itself, if a file), sorted; hidden files and folders and documentation
    (``_DOC_SUFFIXES``: model cards, plots) excepted."""
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() not in _DOC_SUFFIXES]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def files_identity(root: str | Path, cache: FileHashCache | None = None) -> dict[str, Any]:
    """Content identity of a weights folder (or one file): ``{"kind": "files", "sha256": ..., "files": n}``;
    ``{"kind": "files", "missing": path}`` when it does not exist (loading will fail and say so)."""
    root = Path(os.path.expanduser(str(root)))
    if not root.exists():
        return {"kind": "files", "missing": str(root)}
    cache = cache or FileHashCache(None)
    files = _weight_files(root)
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{cache.sha256(f)}\n".encode())
    return {"kind": "files", "sha256": h.hexdigest()[:32], "files": len(files)}


def hub_identity(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The commit of ``repo_id`` at ``revision`` (default ``main``) in the local Hugging Face cache, without
    network: ``{"kind": "hub", "repo_id", "revision", "commit"}`` (``commit`` None: not downloaded yet)."""
    revision = revision or "main"
    if _COMMIT.fullmatch(revision):
        commit: str | None = revision  # a pinned commit is its own identity
    else:
        if cache_dir is None:
            from huggingface_hub.constants import HF_HUB_CACHE

            cache_dir = HF_HUB_CACHE
        ref = Path(os.path.expanduser(str(cache_dir))) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
        try:
            commit = ref.read_text().strip() or None
        except OSError:
            commit = None
    return {"kind": "hub", "repo_id": repo_id, "revision": revision, "commit": commit}


def callable_weights_path(target: Callable[..., Any], kwargs: dict[str, Any]) -> Path | None:
    """Where a ``callable`` loader reads its weights: its ``weights_path(**kwargs)`` attribute, else its
    ``path`` kwarg, else None (unknown)."""
    fn = getattr(target, "weights_path", None)
    if callable(fn):
        p = fn(**kwargs)
        return Path(p) if p is not None else None
    if kwargs.get("path"):
        return Path(str(kwargs["path"]))
    return None


def weights_identity(model: Any, cache: FileHashCache | None = None) -> dict[str, Any]:
    """The identity of the weights a model preset (``ModelConfig``-like mapping) loads; see the module doc."""
    loader = model.get("loader", "diffusers")
    kwargs = dict(model.get("kwargs") or {})
    if loader == "tiny_wan":
        return {"kind": "code", "loader": loader}
    if loader == "callable":
        from svg2.harness.models import _import_target

        target = model.get("target")
        if not target:
            raise ValueError("model.loader=callable needs model.target='package.module:function'")
        path = callable_weights_path(_import_target(target), kwargs)
        if path is None:
            return {"kind": "callable", "target": target, "weights": None}
        return files_identity(path, cache)
    if loader == "diffusers":
        repo = model.get("repo_id")
        if not repo:
            raise ValueError(f"model {model.get('name')}: loader=diffusers needs model.repo_id (a Hub id or folder)")
        local = Path(os.path.expanduser(str(repo)))
        if local.is_dir():
            return files_identity(local, cache)
        return hub_identity(str(repo), kwargs.get("revision"), kwargs.get("cache_dir"))
    if loader == "random":
        # Full-size architecture with fresh random weights each build (a dry run of memory and time): there is
        # no checkpoint to hash, and its quality numbers mean nothing; the key tells it apart from real weights.
        return {"kind": "random", "arch": model.get("repo_id"), "kwargs": kwargs}
    raise ValueError(f"unknown model.loader {loader!r}; use diffusers, random, tiny_wan or callable")


def is_resolved(identity: dict[str, Any]) -> bool:
    """False for a Hub model whose commit is not known yet (not in the local cache before loading)."""
    return not (identity.get("kind") == "hub" and identity.get("commit") is None)


def software_stack(device: Any = None) -> dict[str, str]:
    """torch and diffusers versions, and with ``device`` (a torch device) its name: the numerics of a video."""
    import torch

    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = "none"
    out = {"torch": torch.__version__, "diffusers": dv}
    if device is not None:
        dev = torch.device(device)
        out["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return out
