"""``svg2-report``: tables (Markdown + LaTeX, the paper's Table 1 layout) and Pareto plots from results.

    svg2-report multirun/quickstart                 # a sweep folder, a store folder, or a folder of sweeps
    svg2-report multirun/pareto multirun/kernels --out reports/h200
    svg2-report multirun/baselines --off-target drop     # leave out rows that miss their target density
    svg2-report multirun/quickstart --drop-failed        # move failed rows out of the store, then report

Every row shows n, the mean and the 95% confidence interval over (prompt, seed); methods are ranked (bold)
within one target density only; a ``method=dense_floor`` row is the noise floor. On the CPU, or where the run
is overhead-bound, speedups are not ranked and the plot is quality against density.

``svg2-run`` writes the same report when a run or multirun ends (:class:`ReportCallback`, named in
``conf/config.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from analysis.pareto import plot_all
from analysis.tables import DENSITY_TOLERANCE, failures, prepare, summarise, to_latex, to_markdown
from svg2.harness.ranks import rank_policy
from svg2.harness.store import ResultsStore, find_stores, load_results, require_stores

__all__ = ["write_report", "build_report", "drop_failed", "report_dir_for", "ReportCallback", "main"]

log = logging.getLogger("svg2.harness")


def report_dir_for(store_dir: Path) -> Path:
    """``<run or sweep dir>/report`` for ``<run or sweep dir>/results``; ``<store>/report`` otherwise."""
    return store_dir.parent / "report" if store_dir.name == "results" else store_dir / "report"


def write_report(paths: list[str | Path], out_dir: str | Path, *, off_target: str = "flag",
                 tolerance: float = DENSITY_TOLERANCE) -> list[Path]:
    """Write ``table1.md``, ``table1.tex``, ``table1_mp4.md`` (if measured), ``summary.csv``,
    ``failures.md`` (if any), the plots (``quality_density_<model>``, and ``pareto_<model>`` where latency is a
    result; PNG and SVG) and an index ``README.md``. Returns the paths; warnings (corrupt or duplicate rows)
    are logged and listed in the index."""
    files, warnings = build_report(paths, out_dir, off_target=off_target, tolerance=tolerance)
    for w in warnings:
        log.warning("report: %s", w)
    return files


def build_report(paths: list[str | Path], out_dir: str | Path, *, off_target: str = "flag",
                 tolerance: float = DENSITY_TOLERANCE, psnr_pooling: str | None = None
                 ) -> tuple[list[Path], list[str]]:
    """:func:`write_report`, returning (the paths written, the warnings). ``psnr_pooling`` ("frames" | "video")
    re-pools PSNR from the stored per-frame values first (:func:`repool_psnr`)."""
    out = Path(out_dir)
    df = load_results(*paths)
    if psnr_pooling is not None:
        df = repool_psnr(df, psnr_pooling)
    out.mkdir(parents=True, exist_ok=True)
    ours = (out / "README.md").is_file() and (out / "README.md").read_text().startswith("# svg2 report")
    written: list[Path] = []
    _ok, warnings = prepare(df)
    warnings = _unreadable_rows(paths) + warnings + _mixed_revisions(_ok)
    s_all = summarise(df, tolerance=tolerance)
    s = summarise(df, tolerance=tolerance, off_target=off_target)
    dropped = len(s_all) - len(s)
    n_ok = int((df["status"] == "ok").sum()) if not df.empty else 0
    n_failed = int((df["status"] != "ok").sum()) if not df.empty else 0
    notes = [f"{n_ok} finished rows, {n_failed} failed, from: " + ", ".join(str(p) for p in paths)]
    if not s.empty:
        md = to_markdown(s, tolerance=tolerance, dropped=dropped)
        (out / "table1.md").write_text(md)
        (out / "table1.tex").write_text(to_latex(s, tolerance=tolerance, dropped=dropped))
        s.to_csv(out / "summary.csv", index=False)
        written += [out / "table1.md", out / "table1.tex", out / "summary.csv"]
        s_mp4 = summarise(df, mp4=True, tolerance=tolerance, off_target=off_target)
        if not s_mp4.empty and s_mp4[["psnr", "ssim"]].notna().any().any():
            (out / "table1_mp4.md").write_text(to_markdown(s_mp4, tolerance=tolerance, dropped=dropped))
            written.append(out / "table1_mp4.md")
        written += plot_all(s, out)
        net = s["lpips_net"].dropna().iloc[0] if s["lpips_net"].notna().any() else None
        notes.append(_lpips_note(df, net) if net else "LPIPS: not measured" + _lpips_reason(df))
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
        (out / "failures.md").write_text(_FAILED_HINT.format(n=len(f), paths=" ".join(map(str, paths))) + "\n\n"
                                         + _failures_md(f))
        written.append(out / "failures.md")
    index = ["# svg2 report", "", *[f"- {n}" for n in notes], ""]
    if warnings:
        index += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    if (out / "table1.md").is_file():
        index += ["## Table 1 (in-memory frames)", "", (out / "table1.md").read_text(), ""]
    if (out / "table1_mp4.md").is_file():
        index += ["## Table 1 (decoded MP4s)", "", (out / "table1_mp4.md").read_text(), ""]
    for p in written:
        if p.suffix == ".png":
            index += [f"![{p.stem}]({p.name})", ""]
    if not f.empty:
        index += [_FAILED_HINT.format(n=len(f), paths=" ".join(map(str, paths))) + " Details: "
                  "[failures.md](failures.md).", ""]
    (out / "README.md").write_text("\n".join(index))
    written.append(out / "README.md")
    stale = {p for pat in _OUTPUTS for p in out.glob(pat)} - set(written) if ours else set()
    for p in stale:  # left by an earlier report into this folder (a folder it did not write: left alone)
        p.unlink()
    return written, warnings


# What a report writes: a file of these an earlier report left and this one did not write is removed.
_OUTPUTS = ("table1.md", "table1.tex", "table1_mp4.md", "summary.csv", "failures.md", "pareto_*.png", "pareto_*.svg",
            "quality_density_*.png", "quality_density_*.svg")


_FAILED_HINT = ("{n} failed rows. Relaunching the sweep retries them (store.retry_failed=true, the default); "
                "`svg2-report --drop-failed {paths}` removes them from the store.")


def _unreadable_rows(paths: list[str | Path]) -> list[str]:
    """Row files that are not valid JSON (the store skips them: their rows are missing from every table)."""
    bad: list[Path] = []
    for p in paths:
        for store in find_stores(p):
            for f in sorted((store / "rows").glob("*.json")):
                try:
                    json.loads(f.read_text())
                except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                    bad.append(f)
    if not bad:
        return []
    return [f"{len(bad)} unreadable (corrupt) row file(s), left out: " + ", ".join(map(str, bad[:5]))
            + (" ..." if len(bad) > 5 else "") + ". Delete them and relaunch the sweep to rerun those rows."]


def drop_failed(paths: list[str | Path]) -> list[tuple[Path, int]]:
    """Move the failed rows of every store under ``paths`` out of the store (``<store>/dropped/``); returns
    (store, how many) per store. A store without row files (a Parquet or JSONL snapshot only) is an error."""
    out = []
    for p in paths:
        for store in require_stores(p):
            if not (store / "rows").is_dir():
                raise ValueError(f"{store} has no rows/ folder (a snapshot only): --drop-failed edits row files; "
                                 "report it without --drop-failed")
            out.append((store, ResultsStore(store).drop_failed()))
    return out


PSNR_POOLINGS = {"frames": "mean of per-frame PSNRs (the authors' svg convention)",
                 "video": "PSNR of the squared error pooled over all frames (the standard convention)"}


def repool_psnr(df: pd.DataFrame, pooling: str) -> pd.DataFrame:
    """Recompute ``psnr`` (and ``psnr_mp4``) of every finished row from its per-frame values (``psnr_frames``,
    ``psnr_mp4_frames``) under ``pooling``, without regenerating. Only the PSNR pooling can change this way: the
    SSIM window and the LPIPS backbone of a convention need the videos, so they stay as measured, and the row's
    convention is renamed ``<convention>+psnr:<pooling>`` so that tables never present the mix as either
    convention. A finished row without per-frame values is an error (it predates them: regenerate it)."""
    from svg2.harness.metrics import pool_psnr

    if pooling not in PSNR_POOLINGS:
        raise ValueError(f"psnr pooling {pooling!r}: use one of {sorted(PSNR_POOLINGS)} "
                         "(frames: " + PSNR_POOLINGS["frames"] + "; video: " + PSNR_POOLINGS["video"] + ")")
    df = df.copy()
    ok = df["status"] == "ok" if "status" in df.columns else pd.Series(False, index=df.index)
    for col in ("psnr", "psnr_mp4"):
        if col not in df.columns or not df.loc[ok, col].notna().any():
            continue
        frames_col = f"{col}_frames"
        has = ok & df[col].notna()
        values = df[frames_col] if frames_col in df.columns else pd.Series(None, index=df.index)
        missing = has & values.map(lambda v: not isinstance(v, list | tuple) or not len(v))
        if missing.any():
            raise ValueError(f"{int(missing.sum())} finished row(s) have {col} but no {frames_col} (rows written "
                             f"before per-frame values were kept): regenerate them, or report without "
                             f"--psnr-pooling")
        df.loc[has, col] = values[has].map(lambda v: pool_psnr(v, pooling))
    conv = df["metric_convention"] if "metric_convention" in df.columns else pd.Series(None, index=df.index)
    df["metric_convention"] = conv.where(~ok, conv.fillna("unrecorded").astype(str) + f"+psnr:{pooling}")
    df["psnr_pooling"] = df.get("psnr_pooling", pd.Series(None, index=df.index)).where(~ok, pooling)
    return df


def _lpips_note(df: pd.DataFrame, net: str) -> str:
    """The backbone, and whether it was randomly initialised (metrics.lpips_random_backbone: a dry run's cost
    figure whose values say nothing about quality)."""
    col = f"lpips_{net}_status"
    if col in df.columns and (df[col] == "random_backbone").any():
        return (f"LPIPS: {net} backbone **randomly initialised** (metrics.lpips_random_backbone=true): "
                "its values measure the metric's cost only, not perceptual quality")
    return f"LPIPS: {net} backbone"


def _mixed_revisions(ok: pd.DataFrame) -> list[str]:
    """Rows from several svg2 code revisions in one table: row keys hash the model, weights, method and settings,
    not the code, so a sweep relaunched after a code change keeps its old rows beside the new ones."""
    if ok.empty or "git_rev" not in ok.columns:
        return []
    revs = sorted({str(r)[:8] for r in ok["git_rev"].dropna()})
    if len(revs) < 2:
        return []
    return [f"rows come from {len(revs)} svg2 revisions ({', '.join(revs[:4])}{' ...' if len(revs) > 4 else ''}): "
            "row keys do not include the code, so rows finished before a code change were kept. To compare one "
            "revision, run the sweep under a new name (or delete its store) after the change."]


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
    ap.add_argument("--off-target", choices=("flag", "drop"), default="flag",
                    help="rows whose sparse density misses their target density by more than the tolerance: "
                         "flag (mark with a dagger, never rank; default) or drop (leave out)")
    ap.add_argument("--density-tolerance", type=float, default=DENSITY_TOLERANCE, metavar="FRAC",
                    help=f"relative miss of the target density still counted as matched (default "
                         f"{DENSITY_TOLERANCE})")
    ap.add_argument("--psnr-pooling", choices=sorted(PSNR_POOLINGS), default=None,
                    help="recompute PSNR from the stored per-frame values under this pooling (frames: mean of "
                         "per-frame PSNRs, the svg convention; video: error pooled over all frames, standard); "
                         "SSIM and LPIPS stay as measured, and the convention is shown as <name>+psnr:<pooling>")
    ap.add_argument("--drop-failed", action="store_true",
                    help="first move the failed rows out of the store(s) (to <store>/dropped/), then report")
    args = ap.parse_args(argv)
    if not 0 <= args.density_tolerance < 1:
        ap.error(f"--density-tolerance {args.density_tolerance}: use a fraction in [0, 1), e.g. 0.05 for 5%")
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else report_dir_for(first)
    try:
        if args.drop_failed:
            for store, n in drop_failed(args.paths):
                print(f"svg2-report: removed {n} failed row(s) from {store}"
                      + (f" (moved to {store / 'dropped'})" if n else ""))
        files, warnings = build_report(args.paths, out, off_target=args.off_target,
                                       tolerance=args.density_tolerance, psnr_pooling=args.psnr_pooling)
    except (FileNotFoundError, ValueError) as e:
        print(f"svg2-report: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"svg2-report: warning: {w}", file=sys.stderr)
    print(f"svg2-report: wrote {len(files)} files to {out}")
    if (out / "table1.md").is_file():
        print((out / "table1.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
