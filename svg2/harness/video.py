"""MP4 read/write through imageio-ffmpeg (H.264, yuv420p). Frames are ``[F, H, W, 3]`` floats in [0, 1]."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["to_uint8", "write_mp4", "read_mp4", "mp4_support", "MP4_SETTINGS"]

# Recorded with every row that compares decoded MP4s.
MP4_SETTINGS = {"codec": "libx264", "pixelformat": "yuv420p", "quality": 8}


def mp4_support() -> tuple[bool, str]:
    """Whether MP4s can be written and read here, and if not, why (imageio picks another format silently)."""
    import importlib.util

    if importlib.util.find_spec("imageio") is None:
        return False, "imageio is not installed (pip install 'svg2[eval]')"
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return False, "imageio-ffmpeg is not installed (pip install 'svg2[eval]' or imageio-ffmpeg)"
    return True, ""


def _require_mp4() -> None:
    ok, why = mp4_support()
    if not ok:
        raise RuntimeError(f"cannot write/read MP4: {why}. Or run with metrics.compare_on=[memory] "
                           "store.save_videos=false")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 16) -> Path:
    """Write frames to an H.264 MP4 (atomically: a partial file never has the final name)."""
    _require_mp4()
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {h}x{w}")
    # A temp name of its own: two processes writing one video (launches sharing a reference cache or a store)
    # must not write into, or rename away, each other's file.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.mp4")
    try:
        with imageio.get_writer(tmp, fps=fps, codec=MP4_SETTINGS["codec"], quality=MP4_SETTINGS["quality"],
                                pixelformat=MP4_SETTINGS["pixelformat"], macro_block_size=1,
                                ffmpeg_log_level="error") as w_:
            for f in frames:  # one frame at a time: no uint8 (or float temporaries) of the whole video
                w_.append_data(to_uint8(f))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an MP4 to float32 ``[F, H, W, 3]`` in [0, 1]."""
    _require_mp4()
    import imageio.v2 as imageio

    with imageio.get_reader(Path(path), format="ffmpeg") as r:
        frames = np.stack([np.asarray(f)[..., :3] for f in r])
    out = frames.astype(np.float32)
    out /= 255.0  # in place: one float32 copy of the video
    return out
