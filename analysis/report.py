"""``svg2-report``: tables (Markdown + LaTeX, the paper's Table 1 layout) and Pareto plots from results.

    svg2-report multirun/quickstart                 # a sweep folder, a store folder, or a folder of sweeps
    svg2-report multirun/pareto multirun/kernels --out reports/h200

``svg2-run`` writes the same report when a run or multirun ends (:class:`ReportCallback`, named in
``conf/config.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from analysis.pareto import plot_pareto
from analysis.tables import failures, summarise, to_latex, to_markdown
from svg2.harness.ranks import rank_policy
from svg2.harness.store import load_results

__all__ = ["write_report", "report_dir_for", "ReportCallback", "main"]

log = logging.getLogger("svg2.harness")


def report_dir_for(store_dir: Path) -> Path:
    """``<run or sweep dir>/report`` for ``<run or sweep dir>/results``; ``<store>/report`` otherwise."""
    return store_dir.parent / "report" if store_dir.name == "results" else store_dir / "report"


def write_report(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write ``table1.md``, ``table1.tex``, ``table1_mp4.md`` (if measured), ``summary.csv``,
    ``failures.md`` (if any), ``pareto_<model>.png/.svg`` and an index ``README.md``. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(*paths)
    written: list[Path] = []
    s = summarise(df)
    n_ok = int((df["status"] == "ok").sum()) if not df.empty else 0
    n_failed = int((df["status"] != "ok").sum()) if not df.empty else 0
    notes = [f"{n_ok} finished rows, {n_failed} failed, from: " + ", ".join(str(p) for p in paths)]
    if not s.empty:
        md = to_markdown(s)
        (out / "table1.md").write_text(md)
        (out / "table1.tex").write_text(to_latex(s))
        s.to_csv(out / "summary.csv", index=False)
        written += [out / "table1.md", out / "table1.tex", out / "summary.csv"]
        s_mp4 = summarise(df, mp4=True)
        if not s_mp4.empty and s_mp4[["psnr", "ssim"]].notna().any().any():
            (out / "table1_mp4.md").write_text(to_markdown(s_mp4))
            written.append(out / "table1_mp4.md")
        written += plot_pareto(s, out)
        net = s["lpips_net"].dropna().iloc[0] if s["lpips_net"].notna().any() else None
        notes.append(f"LPIPS: {net} backbone" if net else "LPIPS: not measured" + _lpips_reason(df))
        if "ssim_window" in df.columns and df["ssim_window"].notna().any():
            notes.append("SSIM window: " + ", ".join(sorted(df["ssim_window"].dropna().astype(str).unique())))
        src = s["speedup_source"].dropna().unique() if "speedup_source" in s else []
        if "reference" in src:
            notes.append("Speedup of some rows is against the timed dense reference generation (no dense row on "
                         "the same device); run method=dense for a warmed-up baseline.")
        if "gpu" in s:
            notes.append("Device: " + ", ".join(sorted(s["gpu"].dropna().astype(str).unique())))
    f = failures(df)
    if not f.empty:
        (out / "failures.md").write_text(_failures_md(f))
        written.append(out / "failures.md")
    index = ["# svg2 report", "", *[f"- {n}" for n in notes], ""]
    if (out / "table1.md").is_file():
        index += ["## Table 1 (in-memory frames)", "", (out / "table1.md").read_text(), ""]
    if (out / "table1_mp4.md").is_file():
        index += ["## Table 1 (decoded MP4s)", "", (out / "table1_mp4.md").read_text(), ""]
    for p in written:
        if p.suffix == ".png":
            index += [f"![{p.stem}]({p.name})", ""]
    if not f.empty:
        index += [f"{len(f)} failed rows: see [failures.md](failures.md).", ""]
    (out / "README.md").write_text("\n".join(index))
    written.append(out / "README.md")
    return written


def _lpips_reason(df: pd.DataFrame) -> str:
    for c in ("lpips_alex_skip_reason", "lpips_vgg_skip_reason"):
        if c in df.columns and df[c].notna().any():
            return f" (skipped: {df[c].dropna().iloc[0]})"
    return ""


def _failures_md(f: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(f.columns) + " |", "|" + "---|" * len(f.columns)]
    for _, r in f.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "/").replace("\n", " ")[:300] for v in r) + " |")
    return "\n".join(lines) + "\n"


class ReportCallback(Callback):
    """``report: true`` (default) writes ``<run or sweep dir>/report/`` from the results store when a run or
    multirun ends. The stores come from the jobs' return values (``svg2.harness.cli.run_from_hydra``), kept
    by this callback object for the run it belongs to."""

    def __init__(self) -> None:
        self._stores: list[Path] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._stores = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._stores = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn | None = None, **kwargs: Any) -> None:
        if job_return is None or job_return.status != JobStatus.COMPLETED:
            return
        value = job_return.return_value
        if isinstance(value, dict) and value.get("store_dir"):
            self._stores.append(Path(value["store_dir"]))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("report", True) and self._stores:
            self._report(config, self._stores[-1])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("report", True):
            return
        if self._stores:  # jobs ran in this process (basic launcher)
            stores = list(dict.fromkeys(self._stores))
        elif config.store.get("dir"):  # jobs ran elsewhere (SLURM): the store the config names
            stores = [Path(config.store.dir).expanduser()]
        else:
            stores = [Path(str(config.hydra.sweep.dir)) / "results"]
        for store in stores:
            self._report(config, store)

    def _report(self, config: DictConfig, store: Path) -> None:
        if not rank_policy(config).report_allowed():  # under torchrun: after every rank's rows, rank 0 only
            return
        if not store.exists():
            return
        out = report_dir_for(store)
        try:
            files = write_report([store], out)
        except Exception as e:  # noqa: BLE001 - a report problem must never lose or fail the runs
            log.error("report for %s failed: %s: %s (rerun: svg2-report %s)", store, type(e).__name__, e, store)
            return
        print(f"[svg2-run] report: {out} ({len(files)} files)")
        if config.logger.name == "wandb":
            from svg2.harness.loggers import make_logger

            lg = make_logger(config.logger, {}, name="report", out_dir=out, job_type="report")
            lg.log_images({p.stem: p for p in files if p.suffix == ".png"})
            lg.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="svg2-report", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", nargs="+", help="results store(s), sweep folder(s) or parent folder(s)")
    ap.add_argument("--out", default=None, help="output folder (default: <first path>/report)")
    args = ap.parse_args(argv)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else report_dir_for(first)
    try:
        files = write_report(args.paths, out)
    except FileNotFoundError as e:
        print(f"svg2-report: {e}", file=sys.stderr)
        return 2
    print(f"svg2-report: wrote {len(files)} files to {out}")
    if (out / "table1.md").is_file():
        print((out / "table1.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
