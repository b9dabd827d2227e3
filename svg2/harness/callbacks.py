"""Hydra callback: write the report (tables + Pareto plots) when a run or a whole multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ReportCallback", "ProgressCallback", "count_sweep_jobs", "report_dir_for"]

log = logging.getLogger("svg2.harness")


def report_dir_for(store_dir: Path) -> Path:
    return store_dir.parent / "report" if store_dir.name == "results" else store_dir / "report"


class ReportCallback(Callback):
    """``report: true`` (default) writes ``<run or sweep dir>/report/`` from the results store."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from svg2.harness.runner import STORES_WRITTEN

        STORES_WRITTEN.clear()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.on_run_start(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        from svg2.harness.runner import STORES_WRITTEN

        if config.get("report", True) and STORES_WRITTEN:
            self._report(config, STORES_WRITTEN[-1])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from svg2.harness.runner import STORES_WRITTEN

        if not config.get("report", True):
            return
        if STORES_WRITTEN:  # jobs ran in this process (basic launcher)
            stores = list(dict.fromkeys(STORES_WRITTEN))
        elif config.store.get("dir"):  # jobs ran elsewhere (SLURM): the store the config names
            stores = [Path(config.store.dir).expanduser()]
        else:
            stores = [Path(str(config.hydra.sweep.dir)) / "results"]
        for store in stores:
            self._report(config, store)

    def _report(self, config: DictConfig, store: Path) -> None:
        from analysis.report import write_report
        from svg2.parallel.harness_hooks import report_allowed

        if not report_allowed():  # under torchrun: after every rank's rows, rank 0 only
            return
        if not store.exists():
            return
        try:
            files = write_report([store], report_dir_for(store))
        except Exception as e:  # noqa: BLE001 - a report problem must never lose or fail the runs
            log.error("report for %s failed: %s: %s (rerun: svg2-report %s)", store, type(e).__name__, e, store)
            return
        print(f"[svg2-run] report: {report_dir_for(store)} ({len(files)} files)")
        if config.logger.name == "wandb":
            from svg2.harness.loggers import make_logger

            lg = make_logger(config.logger, {}, name="report", out_dir=report_dir_for(store), job_type="report")
            lg.log_images({p.stem: p for p in files if p.suffix == ".png"})
            lg.finish()


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
