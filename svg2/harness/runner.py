"""One harness job: every (prompt, seed) of one (model, method, kernel) configuration -> result rows.

Flow per job: skip rows the store already holds -> load the pipeline (kept across the jobs of one process)
-> dense reference videos (cache hit, or generated with the stock pipeline) -> enable the method ->
optional warm-up -> per (prompt, seed): timed generation, MP4, metrics against the reference, one row.
Any exception inside a row (OOM included) becomes a ``status="failed"`` row with the error and the job goes
on; a relaunch retries it. Nothing is lost on a kill: every finished row is already on disk.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from svg2.config import SVG2Config
from svg2.harness.environment import environment_info
from svg2.harness.generation import GenerationResult, generate
from svg2.harness.loggers import NullLogger, make_logger
from svg2.harness.metrics import MetricSuite
from svg2.harness.models import load_pipeline
from svg2.harness.prompts import Prompt, load_prompts
from svg2.harness.reference import ReferenceCache, reference_key
from svg2.harness.store import ResultsStore
from svg2.harness.video import MP4_SETTINGS, mp4_support, read_mp4, write_mp4
from svg2.parallel import harness_hooks as par

__all__ = ["MethodSpec", "method_spec", "job_identity", "row_key", "run_job", "clear_pipeline_cache"]

log = logging.getLogger("svg2.harness")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@dataclass
class MethodSpec:
    """What ``enable_svg2`` will be called with (or ``stock``: nothing installed)."""

    name: str
    label: str
    stock: bool
    cfg: SVG2Config | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "stock": self.stock, "cfg": self.cfg.to_dict() if self.cfg else None,
                "kwargs": self.kwargs}


def method_spec(cfg: DictConfig) -> MethodSpec:
    """Merge SVG2Config defaults <- model.svg2 <- method.cfg <- kernel group, and split what the method gets."""
    m = cfg.method
    def _set(node: Any) -> dict[str, Any]:  # None means "not set" in the typed overlays
        return {k: v for k, v in (_plain(node) or {}).items() if v is not None}

    tiles = _set(cfg.kernel.get("tiles"))
    merged = {**_set(cfg.model.svg2), **_set(m.cfg), "attention_kernel": cfg.kernel.attention,
              "kmeans_kernel": cfg.kernel.kmeans, "attention_tiles": tiles or None}
    try:
        full = SVG2Config.from_dict(merged)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid SVG2 settings (model.svg2 + method.cfg + kernel) for method {m.name!r}: {e}") from e
    kwargs = dict(_plain(m.kwargs) or {})
    label = m.label or m.name
    if m.stock:
        return MethodSpec(m.name, label, True, None, {})
    if m.pass_cfg:
        return MethodSpec(m.name, label, False, full, kwargs)
    shared = {}
    for f in m.shared_fields:
        if f not in SVG2Config.field_names():
            raise ValueError(f"method.shared_fields: {f!r} is not an SVG2Config field; "
                             f"known: {SVG2Config.field_names()}")
        v = getattr(full, f)
        if v is not None:
            shared[f] = v
    if "attention_kernel" in shared and full.attention_tiles is not None:  # the tiles go with the kernel
        shared["attention_tiles"] = full.attention_tiles.overrides()
    return MethodSpec(m.name, label, False, None, {**shared, **kwargs})


def job_identity(cfg: DictConfig, spec: MethodSpec) -> dict[str, Any]:
    """Everything that changes a row's content. Logger, store, progress and names are not part of it."""
    mt = cfg.metrics
    return {
        "model": _plain(cfg.model),
        "method": spec.identity(),
        "metrics": {k: _plain(mt[k]) for k in ("psnr", "ssim", "ssim_window", "lpips_nets", "lpips_random_backbone",
                                                "compare_on")},
        "compile": bool(cfg.compile),
        "warmup_runs": int(cfg.latency.warmup_runs),
        **par.identity(cfg),  # parallel.mode=ulysses: {"ulysses_degree": N} (other latencies); else nothing
    }


def row_key(identity: dict[str, Any], prompt: Prompt, seed: int) -> str:
    blob = json.dumps({"job": identity, "prompt": prompt.text, "image": prompt.image, "seed": int(seed)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# Store folders this process wrote to (read by svg2.harness.callbacks.ReportCallback).
STORES_WRITTEN: list[Path] = []

# -- pipeline reuse across the jobs of one process (a multirun with the basic launcher) ---------------------
_PIPE_CACHE: dict[str, tuple[Any, torch.device, torch.dtype]] = {}


def clear_pipeline_cache() -> None:
    _PIPE_CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _get_pipeline(cfg: DictConfig) -> tuple[Any, torch.device, torch.dtype]:
    key = json.dumps({"model": _plain(cfg.model), "compile": bool(cfg.compile)}, sort_keys=True, default=str)
    if key not in _PIPE_CACHE:
        clear_pipeline_cache()  # one pipeline at a time: free the previous one first
        pipe, device, dtype = load_pipeline(cfg.model)
        par.parallelize(cfg, pipe)  # parallel.mode=ulysses: shard the sequence across the ranks
        if cfg.compile:
            for name in ("transformer", "transformer_2"):
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, torch.compile(getattr(pipe, name)))
        _PIPE_CACHE[key] = (pipe, device, dtype)
    return _PIPE_CACHE[key]


def _progress_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.progress) and not os.environ.get("CI") and os.environ.get("TQDM_DISABLE") not in ("1", "true")


def _failure(base: dict[str, Any], exc: BaseException, stage: str) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {**base, "status": "failed", "failed_stage": stage, "error_type": type(exc).__name__,
            "error": str(exc)[:2000], "traceback": tb[-6000:], "finished_at": time.time()}


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


@dataclass
class _Ref:
    frames: np.ndarray
    mp4: Path
    meta: dict[str, Any]
    cached: bool


def run_job(cfg: DictConfig, store_dir: str | Path, job_info: dict[str, Any] | None = None,
            out_dir: str | Path | None = None) -> dict[str, int]:
    """Run one job (all prompts x seeds of ``cfg``) into the store at ``store_dir``.

    Returns counts: ``{"total", "skipped", "ok", "failed"}``.
    """
    from tqdm.auto import tqdm

    job_info = dict(job_info or {})
    par.job_start(cfg)
    store = par.store_for_rank(cfg, ResultsStore(store_dir))
    out_dir = Path(out_dir or store_dir)
    prompts = load_prompts(cfg.prompts, task=cfg.model.task)  # a bad prompt set fails before any generation
    seeds = [int(s) for s in cfg.seeds]
    items = par.rows_for_rank(cfg, [(p, s) for p in prompts for s in seeds])  # torchrun: this rank's share
    counts = {"total": len(items), "skipped": 0, "ok": 0, "failed": 0}

    base_job = {"name": cfg.name, **job_info, "model": cfg.model.name, "model_family": cfg.model.family,
                "task": cfg.model.task, "height": cfg.model.height, "width": cfg.model.width,
                "num_frames": cfg.model.num_frames, "num_steps": cfg.model.num_steps,
                "guidance_scale": cfg.model.guidance_scale, "dtype": cfg.model.dtype, "compile": bool(cfg.compile),
                "kernel_attention": cfg.kernel.attention, "kernel_kmeans": cfg.kernel.kmeans,
                "method": cfg.method.name, "method_label": cfg.method.label or cfg.method.name,
                **par.row_fields(cfg),
                "config_json": _json(_plain(cfg))}
    try:
        spec = method_spec(cfg)
        identity = job_identity(cfg, spec)
        spec_error = None
    except Exception as e:  # noqa: BLE001 - a bad method config is a failed job, not a dead sweep
        spec, spec_error = None, e
        identity = {"invalid": _plain(cfg.method), "model": _plain(cfg.model), "kernel": _plain(cfg.kernel)}

    def base_row(p: Prompt, s: int) -> dict[str, Any]:
        row = {**base_job, "key": row_key(identity, p, s), "prompt": p.text, "prompt_id": p.id,
               "dimension": p.dimension, "image": p.image, "seed": s, "started_at": time.time()}
        if spec is not None:
            row.update(method_stock=spec.stock, svg2_config_json=_json(spec.cfg.to_dict() if spec.cfg else None),
                       method_kwargs_json=_json(spec.kwargs))
            if spec.cfg is not None:  # flat copies of the knobs people sweep (tables, plots, filtering)
                row.update({f"cfg_{k}": v for k, v in spec.cfg.to_dict().items()})
            elif "target_density" in spec.kwargs:
                row["cfg_target_density"] = spec.kwargs["target_density"]
        return row

    todo = []
    for p, s in items:
        key = row_key(identity, p, s)
        if store.should_run(key, retry_failed=cfg.store.retry_failed):
            todo.append((p, s))
        else:
            counts["skipped"] += 1
    tag = job_info.get("override_dirname") or cfg.method.name
    if counts["skipped"]:
        log.info("[%s] %d of %d rows already in %s: skipped", tag, counts["skipped"], len(items), store.root)
    if not todo:
        return counts

    def fail_all(exc: BaseException, stage: str, which: list[tuple[Prompt, int]]) -> None:
        for p, s in which:
            store.write(_failure(base_row(p, s), exc, stage), consolidate=False)
            counts["failed"] += 1
        store.consolidate()
        log.error("[%s] %s failed for %d rows: %s: %s", tag, stage, len(which), type(exc).__name__, exc)

    if spec_error is not None:
        fail_all(spec_error, "config", todo)
        if cfg.fail_fast:
            raise spec_error
        return counts

    try:
        pipe, device, dtype = _get_pipeline(cfg)
        suite = MetricSuite.from_config(cfg.metrics)
    except Exception as e:  # noqa: BLE001
        fail_all(e, "load", todo)
        if cfg.fail_fast:
            raise
        return counts

    env = environment_info(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = ReferenceCache(Path(os.path.expanduser(cfg.cache.dir)), dtype=cfg.cache.dtype, enabled=cfg.cache.enabled)
    cache = par.cache_for_rank(cfg, cache)
    model_plain = _plain(cfg.model)
    compare_on = list(cfg.metrics.compare_on)
    bad = set(compare_on) - {"memory", "mp4"}
    if bad:
        raise ValueError(f"metrics.compare_on has {sorted(bad)}; use memory and/or mp4")
    save_videos = bool(cfg.store.save_videos)
    mp4_ok, mp4_why = mp4_support()
    if not mp4_ok:
        if "mp4" in compare_on or save_videos:
            # Recorded in every row (mp4_skipped_reason), not silently dropped.
            log.warning("MP4 output and MP4 metrics are skipped: %s", mp4_why)
        compare_on = [c for c in compare_on if c != "mp4"]
        save_videos = False
    progress = _progress_enabled(cfg)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress, leave=False, desc="steps")
    logger = NullLogger() if par.is_follower(cfg) else make_logger(cfg.logger, _plain(cfg), name=str(tag),
                                                                    out_dir=out_dir)

    refs: dict[tuple[str, int], _Ref] = {}
    failed_keys: set[str] = set()

    def ref_key(p: Prompt, s: int) -> str:
        return reference_key(model_plain, device.type, p.text, p.image, s)

    def store_reference(p: Prompt, s: int, res: GenerationResult) -> _Ref:
        meta = {"latency_s": res.latency_s, "gpu": env["gpu"], "git_rev": env["git_rev"], "model": cfg.model.name,
                "prompt": p.text, "seed": s}
        frames, mp4 = cache.put(ref_key(p, s), res.frames, meta, fps=cfg.model.fps, write_video=mp4_ok)
        return _Ref(frames, mp4, {**meta, "key": ref_key(p, s)}, cached=False)

    # 1. references (stock pipeline). A stock method's own generation doubles as its missing reference.
    for p, s in todo:
        hit = cache.get(ref_key(p, s))
        if hit is not None:
            ref_mp4 = cache.entry(ref_key(p, s)) / "video.mp4"
            if "mp4" in compare_on and not ref_mp4.exists():  # cached where imageio-ffmpeg was missing
                write_mp4(ref_mp4, hit[0], fps=cfg.model.fps)
            refs[(p.text + (p.image or ""), s)] = _Ref(hit[0], ref_mp4, hit[1], True)
    missing = [(p, s) for p, s in todo if (p.text + (p.image or ""), s) not in refs]
    if missing and not spec.stock:
        for p, s in tqdm(missing, desc=f"dense references [{tag}]", disable=not progress, leave=False):
            try:
                refs[(p.text + (p.image or ""), s)] = store_reference(p, s, generate(pipe, cfg.model, p, s, device))
            except Exception as e:  # noqa: BLE001
                row = _failure(base_row(p, s), e, "reference")
                store.write(row)
                failed_keys.add(row["key"])
                counts["failed"] += 1
                log.error("[%s] dense reference failed for %r: %s", tag, p.text, e)
                if cfg.fail_fast:
                    raise
                _free_memory(device)

    # 2. the method
    handle = None
    try:
        if not spec.stock:
            from svg2.integrations import enable_svg2

            handle = enable_svg2(pipe, spec.cfg, method=spec.name, timing=bool(cfg.latency.components),
                                 **spec.kwargs)
        warmup_s = 0.0
        n_warmup = int(cfg.latency.warmup_runs)
        if n_warmup < 0:
            n_warmup = 1 if device.type == "cuda" else 0
        for _ in range(n_warmup):
            p0, s0 = todo[0]
            warmup_s += generate(pipe, cfg.model, p0, s0, device, per_step=False).latency_s
    except Exception as e:  # noqa: BLE001
        if handle is not None:
            handle.remove()
        fail_all(e, "enable" if handle is None else "warmup", [it for it in todo if row_key(identity, *it)
                                                                not in failed_keys])
        if cfg.fail_fast:
            raise
        logger.finish()
        return counts

    try:
        bar = tqdm(todo, desc=f"{spec.label} [{tag}]", disable=not progress)
        for p, s in bar:
            row = base_row(p, s)
            if row["key"] in failed_keys:
                continue
            video_path = None
            try:
                res = generate(pipe, cfg.model, p, s, device, per_step=bool(cfg.latency.per_step))
                ref = refs.get((p.text + (p.image or ""), s))
                if ref is None:  # stock method, reference not cached yet: this video is the reference
                    ref = store_reference(p, s, res)
                row.update(_latency_fields(res, warmup_s, env))
                row.update(_stats_fields(par.stats_view(cfg, handle)))  # ulysses: all ranks' heads
                row.update(ref_key=ref.meta.get("key"), ref_cached=ref.cached, ref_latency_s=ref.meta.get("latency_s"),
                           ref_gpu=ref.meta.get("gpu"), ref_frames_dtype=ref.meta.get("frames_dtype", cfg.cache.dtype),
                           ref_video_path=str(ref.mp4) if ref.mp4 else "")
                if save_videos or "mp4" in compare_on:
                    video_path = write_mp4(store.root / "videos" / f"{row['key']}.mp4", res.frames, fps=cfg.model.fps)
                    row["video_path"] = str(video_path)
                scalars, per_frame = {}, {}
                if "memory" in compare_on:
                    sc, pf = suite(ref.frames, res.frames)
                    scalars.update(sc)
                    per_frame.update(pf)
                if "mp4" in compare_on:
                    sc, pf = suite(read_mp4(ref.mp4), read_mp4(video_path), suffix="_mp4")
                    scalars.update(sc)
                    per_frame.update(pf)
                row.update(scalars)
                row.update(suite.describe())
                row.update(compared_on=",".join(compare_on), mp4_skipped_reason=mp4_why,
                           mp4_settings_json=_json(MP4_SETTINGS),
                           per_frame_json=_json(per_frame), status="ok", finished_at=time.time(), **env)
                counts["ok"] += 1
                if progress and "psnr" in scalars:
                    bar.set_postfix(psnr=f"{scalars['psnr']:.2f}", density=row.get("density"))
            except Exception as e:  # noqa: BLE001 - OOM, kernel errors...: record and go on
                row = {**_failure(row, e, "generate"), **env}
                counts["failed"] += 1
                log.error("[%s] failed for %r: %s: %s", tag, p.text, type(e).__name__, e)
                _free_memory(device)
                if cfg.fail_fast:
                    store.write(row)
                    raise
            store.write(row)
            logger.log_row(row, video_path)
    finally:
        if handle is not None:
            handle.remove()
        logger.finish()
        _free_memory(device)
    return counts


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _latency_fields(res: GenerationResult, warmup_s: float, env: dict[str, Any]) -> dict[str, Any]:
    steps = res.step_s
    return {
        "latency_s": res.latency_s,
        "step_times_json": _json(steps),
        "mean_step_s": float(np.mean(steps)) if steps else math.nan,
        # The first step also holds text encoding and set-up; the median excludes that.
        "median_step_s": float(np.median(steps)) if steps else math.nan,
        "warmup_s": warmup_s,
        "peak_mem_gb": res.peak_mem_gb,
    }


def _stats_fields(handle: Any) -> dict[str, Any]:
    if handle is None:
        return {"density": 1.0, "density_sparse": math.nan, "density_json": _json({}), "components_json": _json({}),
                "kernels_used": "stock"}
    st = handle.stats()
    timing = st.get("timing_ms") or {}
    out = {
        "density": st.get("mean_density"),
        "density_sparse": st.get("mean_sparse_density") if st.get("mean_sparse_density") is not None else math.nan,
        "density_json": _json({k: st.get(k) for k in ("density_per_step", "density_per_layer", "density_per_branch")}),
        "components_json": _json(timing),
        "kernels_used": ",".join(st.get("kernels") or []),
        "num_attention_calls": st.get("num_calls"),
        "num_dense_calls": st.get("num_dense_calls"),
    }
    for comp, t in timing.items():
        out[f"time_{comp}_ms"] = t.get("total_ms") if isinstance(t, dict) else t
    return out


def run_from_hydra(cfg: DictConfig) -> dict[str, int]:
    """The body of ``svg2-run``: resolve the store folder from Hydra's run/sweep dir, then :func:`run_job`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    par.setup(cfg)  # under torchrun: join the process group (svg2.parallel.harness_hooks)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    if cfg.store.dir:
        store_dir = Path(os.path.expanduser(cfg.store.dir))
    else:
        store_dir = (Path(hc.sweep.dir) if multirun else out_dir) / "results"
    job_info = {"job_num": hc.job.num if multirun else 0, "override_dirname": hc.job.override_dirname or "default",
                "output_dir": str(out_dir)}
    store_dir = par.shared_path(store_dir)
    STORES_WRITTEN.append(store_dir)  # for the report callback at the end of the run / multirun
    counts = run_job(cfg, store_dir, job_info, out_dir=out_dir)
    print(f"[svg2-run] {job_info['override_dirname']}: {counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} already done -> {store_dir}", file=sys.stderr)
    return counts
