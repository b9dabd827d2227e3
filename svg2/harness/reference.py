"""Dense reference videos, generated once per content key and cached on disk.

The key covers everything that determines the dense video: the model preset (loader, sampling settings,
dtype), the identity of the weights it loads (their content, or the Hub commit:
:mod:`svg2.harness.weights_identity`), the software stack (torch and diffusers versions, the device's type and
name), the prompt (and image), the seed and, when not 1, the batch size. Retraining a model in place, a new Hub
revision or a torch upgrade gives new keys, so a stale reference is never compared with new videos. A cache
entry is a folder ``<cache>/<key>/`` holding ``frames.npy``, ``video.mp4`` and ``meta.json`` (written last,
atomically: an entry without meta.json is incomplete and regenerated). Jobs running at once (launcher=lanes)
take :meth:`ReferenceCache.lock_path` of a key before making its reference, so each is made once. Entries of
older key formats are never looked up again (their keys differ), so they are regenerated, not misread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from svg2.harness.store import atomic_write_text
from svg2.harness.video import write_mp4

__all__ = ["ReferenceCache", "reference_key"]

_FORMAT = 2  # 2: the weights' identity and the software stack are part of the key
_SAMPLING_FIELDS = ("name", "loader", "repo_id", "target", "pipeline_class", "task", "height", "width",
                    "num_frames", "num_steps", "guidance_scale", "guidance_scale_2", "flow_shift",
                    "negative_prompt", "dtype", "kwargs", "call_kwargs")


def reference_key(model: dict[str, Any], device_type: str, prompt: str, image: str | None, seed: int,
                  batch_size: int = 1, *, weights: dict[str, Any], stack: dict[str, str]) -> str:
    """``weights``: :func:`~svg2.harness.weights_identity.weights_identity` of ``model``; ``stack``:
    :func:`~svg2.harness.weights_identity.software_stack` of the generating device. ``batch_size``: videos per
    pipeline call (batched numerics differ slightly); part of the key only when not 1."""
    if not isinstance(weights, dict) or "kind" not in weights:
        raise TypeError("reference_key(weights=...) takes weights_identity(model) (a dict with 'kind'); without "
                        "it a retrained model would reuse the references of its old weights")
    if not isinstance(stack, dict):
        raise TypeError("reference_key(stack=...) takes software_stack(device) (torch/diffusers versions, device)")
    ident = {"format": _FORMAT, "model": {k: model.get(k) for k in _SAMPLING_FIELDS}, "device": device_type,
             "weights": weights, "stack": stack, "prompt": prompt, "image": image, "seed": int(seed)}
    if batch_size != 1:
        ident["batch_size"] = int(batch_size)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ReferenceCache:
    def __init__(self, root: str | Path, dtype: str = "float16", enabled: bool = True) -> None:
        if dtype not in ("float16", "float32", "uint8"):
            raise ValueError(f"cache.dtype={dtype!r}; use float16, float32 or uint8")
        self.root = Path(os.path.expanduser(str(root)))
        self.dtype = dtype
        self.enabled = enabled

    def entry(self, key: str) -> Path:
        return self.root / key

    def lock_path(self, key: str) -> Path:
        """The lock file a job holds while it makes this key's reference (:mod:`svg2.harness.locks`)."""
        return self.root / ".locks" / f"{key}.lock"

    def get(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        d = self.entry(key)
        if not self.enabled or not (d / "meta.json").is_file():
            return None
        try:
            meta = json.loads((d / "meta.json").read_text())
            frames = np.load(d / "frames.npy")
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict) or meta.get("key", key) != key:
            return None  # not this key's entry (a foreign or damaged folder): regenerate
        if not _finite(frames):
            return None  # a NaN/inf reference (stored before put() refused them): regenerate
        return _as_float32(frames), meta

    def put(self, key: str, frames: np.ndarray, meta: dict[str, Any], fps: int,
            write_video: bool = True) -> tuple[np.ndarray, Path | None]:
        """Store a reference; returns the frames as stored (what every comparison uses) and the MP4 path
        (None when ``write_video`` is False, e.g. imageio-ffmpeg is not installed)."""
        if not _finite(frames):
            # A reference with NaN/inf (a diverged or random-weight VAE) is never cached: every comparison with it
            # would fail, on every relaunch too.
            raise ValueError("the dense reference video holds NaN or inf values (not cached): the pipeline "
                             "diverged (for model.loader=random: the random VAE's output)")
        d = self.entry(key)
        d.mkdir(parents=True, exist_ok=True)
        if self.dtype == "uint8":
            stored = (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            stored = frames.astype(self.dtype)
        tmp = d / f".frames.{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"  # own name: launches may share the cache
        np.save(tmp, stored)
        os.replace(tmp, d / "frames.npy")
        mp4 = write_mp4(d / "video.mp4", frames, fps=fps) if write_video else None
        meta = {**meta, "key": key, "format": _FORMAT, "frames_dtype": self.dtype, "created_at": time.time()}
        atomic_write_text(d / "meta.json", json.dumps(meta, sort_keys=True, default=str, indent=1))
        return _as_float32(stored), mp4

    def clear(self, key: str) -> None:
        shutil.rmtree(self.entry(key), ignore_errors=True)


def _finite(frames: np.ndarray) -> bool:
    """Whether every value is finite (NaN and inf show in the min and max: no mask of the whole video)."""
    if frames.dtype == np.uint8 or not frames.size:
        return True
    return bool(np.isfinite(frames.min()) and np.isfinite(frames.max()))


def _as_float32(frames: np.ndarray) -> np.ndarray:
    """Stored frames as float32 in [0, 1] (uint8 divided by 255 in place: one float32 copy)."""
    out = frames.astype(np.float32)
    if frames.dtype == np.uint8:
        out /= 255.0
    return out
