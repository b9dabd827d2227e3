"""Experiment loggers: ``none`` and ``wandb`` (offline by default, so no network is needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["NullLogger", "WandbLogger", "make_logger"]


class NullLogger:
    def log_row(self, row: dict[str, Any], video: Path | None = None) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """One W&B run per Hydra job: the resolved config, one step per result row, the videos."""

    def __init__(self, cfg: Any, config: dict[str, Any], name: str, out_dir: Path, job_type: str = "run") -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logger=wandb needs the wandb package: pip install 'svg2[wandb]'") from e
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or cfg.mode  # tests force WANDB_MODE=disabled
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_videos = bool(cfg.get("log_videos", True))
        self.run = wandb.init(project=cfg.project, entity=cfg.get("entity"), group=cfg.get("group"),
                              tags=list(cfg.get("tags") or []), name=name, config=config, mode=mode,
                              dir=str(out_dir), job_type=job_type, reinit="finish_previous")

    def log_row(self, row: dict[str, Any], video: Path | None = None) -> None:
        data = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and not (isinstance(v, float) and math.isnan(v))}
        data = {k: (1e9 if v == math.inf else v) for k, v in data.items()}  # W&B charts reject inf
        data["status"] = row.get("status")
        data["prompt"] = row.get("prompt")
        if video is not None and self.log_videos and Path(video).is_file():
            data["video"] = self.wandb.Video(str(video), format="mp4")
        self.run.log(data)

    def log_images(self, images: dict[str, Path]) -> None:
        self.run.log({k: self.wandb.Image(str(p)) for k, p in images.items() if Path(p).is_file()})

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: Any, config: dict[str, Any], name: str, out_dir: Path, job_type: str = "run"):
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, config, name, out_dir, job_type)
    raise ValueError(f"unknown logger {cfg.name!r}; use none or wandb")
