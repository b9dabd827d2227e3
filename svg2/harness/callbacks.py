"""Hydra callbacks of the harness: a progress bar over the jobs of a multirun. (The report at the end of a run is
``analysis.report.ReportCallback``: the report lives above the harness.)"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ProgressCallback", "count_sweep_jobs"]


def count_sweep_jobs(config: DictConfig) -> int:
    """Jobs of a basic-sweeper multirun: the product of the sweep sizes of ``hydra.sweeper.params`` merged
    with the command-line overrides (which win for the same key), as Hydra's BasicSweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged: dict[str, str] = {}
    params = config.hydra.sweeper.get("params") or {}
    for key, value in params.items():
        merged[str(key)] = f"{key}={value}"
    for ov in config.hydra.overrides.task:
        merged[str(ov).split("=", 1)[0].lstrip("+~")] = str(ov)
    n = 1
    for ov in OverridesParser.create().parse_overrides(list(merged.values())):
        if ov.is_sweep_override():
            n *= max(1, len(list(ov.sweep_string_iterator())))
    return n


class ProgressCallback(Callback):
    """A tqdm bar over the jobs of a multirun (quiet in CI and with ``progress=false`` or TQDM_DISABLE=1)."""

    def __init__(self) -> None:
        self._bar = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import os

        from tqdm.auto import tqdm

        if not config.get("progress", True) or os.environ.get("CI") or os.environ.get("TQDM_DISABLE") in ("1", "true"):
            return
        try:
            total = count_sweep_jobs(config)
        except Exception:  # noqa: BLE001 - a sweeper this parser does not know: a bar without a total
            total = None
        self._bar = tqdm(total=total, desc=f"jobs [{config.get('name', '')}]", unit="job", position=0)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
