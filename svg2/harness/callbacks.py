"""Hydra callback: write the report (tables + Pareto plots) when a run or a whole multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ReportCallback", "report_dir_for"]

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
