"""What a result row records about where it ran: git revision, device, library versions."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["git_revision", "device_name", "environment_info"]

_REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def git_revision() -> tuple[str | None, bool | None]:
    """(commit sha, dirty?) of the svg2 checkout, or (None, None) outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.machine()}x{torch.get_num_threads()}threads"


def environment_info(device: torch.device) -> dict[str, Any]:
    import diffusers

    sha, dirty = git_revision()
    return {
        "git_rev": sha,
        "git_dirty": dirty,
        "gpu": device_name(device),
        "host": socket.gethostname(),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "cuda_version": torch.version.cuda,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
