"""One harness job: every (prompt, seed) of one (model, method, kernel) configuration -> result rows.

:func:`run_job` runs the stages of a job in order: ``plan`` (method spec, row keys, this rank's share, skip
rows the store already holds) -> ``claim`` (the job's lock: a concurrent job with the same row keys runs first,
then this one skips its rows; :mod:`svg2.harness.locks`) -> ``load`` (the pipeline, kept across the jobs of one
process by the :class:`~svg2.harness.session.RunSession`) -> ``references`` (dense videos: cache hit, or
generated with the stock pipeline under a per-key lock, so concurrent jobs make each once) -> ``enable`` (the
method, optional warm-up) -> ``rows`` (per (prompt, seed): timed generation, MP4, metrics against the reference,
one row). The rank policy of ``parallel.mode``
(:mod:`svg2.harness.ranks`) decides this rank's share and what it writes.

``batch_size: N`` (> 1) generates up to N (prompt, seed) pairs in one pipeline call, references and rows
alike; each item starts from its own seed's noise. Batched numerics differ slightly from unbatched ones, so
``batch_size`` is part of the row key and the reference key when it is not 1 (at 1 both are unchanged).

A stage that fails records every row still to run as failed (``failed_stage`` names it) and ends the job;
an exception inside a row (OOM included) fails that row only and the job goes on. A relaunch retries failed
rows. Nothing is lost on a kill: every finished row is already on disk.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from svg2.config import KERNEL_FIELDS, SVG2Config
from svg2.harness.environment import environment_info
from svg2.harness.generation import GenerationResult, generate_batch
from svg2.harness.locks import file_locks
from svg2.harness.loggers import NullLogger, make_logger
from svg2.harness.metrics import MetricSuite, metrics_identity
from svg2.harness.prompts import Prompt, load_prompts
from svg2.harness.ranks import RankPolicy, rank_policy
from svg2.harness.reference import ReferenceCache, reference_key
from svg2.harness.session import LoadedPipeline, RunSession
from svg2.harness.store import ResultsStore
from svg2.harness.validation import check_model
from svg2.harness.video import MP4_SETTINGS, mp4_support, read_mp4, write_mp4
from svg2.harness.weights_identity import HASH_CACHE_NAME, FileHashCache, is_resolved, software_stack, weights_identity
from svg2.methods import AttentionMethod, method_class
from svg2_kernels.plan import TileConfig

__all__ = ["MethodSpec", "method_spec", "job_identity", "row_key", "run_job"]

log = logging.getLogger("svg2.harness")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@dataclass
class MethodSpec:
    """The method of a job: its class and constructor arguments (``cfg``: the merged SVG2Config, for a method
    that takes one; ``kwargs``: the others). A ``stock`` method installs nothing."""

    name: str
    label: str
    stock: bool
    cfg: SVG2Config | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    method_cls: type[AttentionMethod] | None = None  # None: the registered method ``name``

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "stock": self.stock, "cfg": self.cfg.to_dict() if self.cfg else None,
                "kwargs": self.kwargs}

    def build(self) -> AttentionMethod:
        """The method object (for ``enable_svg2``); a stock method has none to build."""
        if self.stock:
            raise ValueError(f"method {self.name!r} is the stock pipeline: there is no method to install")
        cls = self.method_cls or method_class(self.name)
        return cls(**({"cfg": self.cfg} if self.cfg is not None else {}), **self.kwargs)


def _set(node: Any) -> dict[str, Any]:
    """The keys of a typed overlay that are set (None means "not set")."""
    return {k: v for k, v in (_plain(node) or {}).items() if v is not None}


def method_spec(cfg: DictConfig) -> MethodSpec:
    """The method of a job from ``method`` (its class and ``method.cfg``), ``model.svg2`` and the ``kernel``
    group: one place for each knob.

    The class (``method.target`` or ``method.name``) says what it takes. SVG2 knobs are merged as SVG2Config
    defaults <- ``model.svg2`` <- ``method.cfg`` <- kernel group (validated for every method): a method taking an
    SVG2Config gets the merged config; another gets the knobs it shares with SVG2 (its ``shared_parameters()``)
    from it, plus the other knobs of ``method.cfg`` its constructor takes. An SVG2 knob a method does not take is
    left out (and out of the row key: a sweep over it runs that method once); any other key it does not take is
    an error naming the ones it does.
    """
    m = cfg.method
    try:
        cls = method_class(m.target or m.name)
    except (KeyError, TypeError) as e:
        raise ValueError(f"method {m.name!r}: {e.args[0] if e.args else e}") from e
    given = _set(m.cfg)
    misplaced = sorted(set(given) & set(KERNEL_FIELDS))
    if misplaced:
        raise ValueError(f"method.cfg.{misplaced[0]}: kernels are chosen by the kernel group only "
                         "(kernel=<name>, kernel.tiles.<field>=...), not by the method")
    svg2_fields = set(SVG2Config.field_names())
    own = {k: v for k, v in given.items() if k not in svg2_fields}
    unknown = sorted(set(own) - cls.parameters())
    if unknown:
        takes = sorted(cls.parameters() - set(KERNEL_FIELDS))
        raise ValueError(f"method {m.name!r} ({cls.__name__}) takes no parameter {', '.join(unknown)}; it takes: "
                         f"{', '.join(takes) or 'none'} (and ignores the SVG2 knobs it does not take)")
    tiles = _set(cfg.kernel.get("tiles"))
    merged = {**_set(cfg.model.svg2), **{k: v for k, v in given.items() if k in svg2_fields},
              "attention_kernel": cfg.kernel.attention, "kmeans_kernel": cfg.kernel.kmeans,
              "attention_tiles": tiles or None}
    try:
        full = SVG2Config.from_dict(merged)
    except (KeyError, TypeError, ValueError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        raise ValueError(f"invalid SVG2 settings (model.svg2 + method.cfg + kernel) for method {m.name!r}: "
                         f"{why}") from e
    label = m.label or m.name
    if cls.stock:
        return MethodSpec(m.name, label, True, None, {}, cls)
    if cls.takes_config():
        return MethodSpec(m.name, label, False, full, own, cls)
    kwargs: dict[str, Any] = {}
    for f in sorted(cls.shared_parameters()):
        v = getattr(full, f)
        if v is not None:
            kwargs[f] = v.overrides() if isinstance(v, TileConfig) else v
    # SVG2 knobs the method takes as its own (not from the preset), e.g. positional's top_p: only when given.
    kwargs.update({k: v for k, v in given.items() if k in svg2_fields and k in cls.parameters() and k not in kwargs})
    return MethodSpec(m.name, label, False, None, {**kwargs, **own}, cls)


def job_identity(cfg: DictConfig, spec: MethodSpec, policy: RankPolicy | None = None) -> dict[str, Any]:
    """Everything that changes a row's content: the model preset and the identity of its weights (content hash
    or Hub commit; retraining in place gives new keys), torch/diffusers versions, the method, the metric
    convention. Logger, store, progress and names are not part of it."""
    policy = policy or rank_policy(cfg)
    hashes = FileHashCache(Path(os.path.expanduser(cfg.cache.dir)) / HASH_CACHE_NAME)
    return {
        "model": _plain(cfg.model),
        "weights": weights_identity(_plain(cfg.model), hashes),
        "stack": software_stack(),
        "method": spec.identity(),
        "metrics": metrics_identity(cfg.metrics),
        "compile": bool(cfg.compile),
        "warmup_runs": int(cfg.latency.warmup_runs),
        **policy.identity(),  # parallel.mode=ulysses: {"ulysses_degree": N} (other latencies); else nothing
        **_batch_identity(cfg),  # batch_size > 1: {"batch_size": N} (other numerics); 1: nothing (old keys)
    }


def resolve_batch_size(cfg: DictConfig) -> int:
    """``cfg.batch_size`` (1 when absent), validated."""
    n = cfg.get("batch_size", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batch_size={n!r}: use a whole number >= 1 (1 = one video per pipeline call)")
    return n


def _batch_identity(cfg: DictConfig) -> dict[str, int]:
    n = resolve_batch_size(cfg)
    return {} if n == 1 else {"batch_size": n}


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def row_key(identity: dict[str, Any], prompt: Prompt, seed: int) -> str:
    blob = json.dumps({"job": identity, "prompt": prompt.text, "image": prompt.image, "seed": int(seed)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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
    mp4: Path | None
    meta: dict[str, Any]
    cached: bool


class _Stop(Exception):  # noqa: N818 - control flow: the job ends here, its rows are already recorded
    """Raised by a stage after it recorded the failure of every row still to run."""


def _comparisons(cfg: DictConfig) -> tuple[list[str], bool, str | None]:
    """(metrics.compare_on, save MP4s?, why MP4 is skipped or None) on this machine."""
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
    return compare_on, save_videos, None if mp4_ok else mp4_why


class _Job:
    """The state of one job while its stages run (see :func:`run_job`)."""

    def __init__(self, cfg: DictConfig, store_dir: str | Path, job_info: dict[str, Any] | None,
                 out_dir: str | Path | None, session: RunSession) -> None:
        self.cfg, self.session = cfg, session
        self.policy = rank_policy(cfg, scratch=session.scratch_dir)
        self.job_info = dict(job_info or {})
        self.store = ResultsStore(store_dir)
        self.out_dir = Path(out_dir or store_dir)
        self.tag = self.job_info.get("override_dirname") or cfg.method.name
        self.counts = {"total": 0, "skipped": 0, "ok": 0, "failed": 0}
        self.todo: list[tuple[Prompt, int]] = []
        self.failed_keys: set[str] = set()
        self.refs: dict[tuple[str, int], _Ref] = {}
        self.spec: MethodSpec | None = None
        self.spec_error: Exception | None = None
        self.handle: Any = None
        self.logger: Any = NullLogger()
        self.warmup_s = 0.0
        self.loaded: LoadedPipeline | None = None
        self._job_lock = contextlib.ExitStack()  # held from claim() to close()
        self._ref_locks = contextlib.ExitStack()  # held while this job makes missing references

    # -- stages -----------------------------------------------------------------------------------------------
    def plan(self) -> None:
        """Method spec and row keys; this rank's share of (prompt, seed); skip rows the store already holds."""
        cfg = self.cfg
        self.policy.job_start()
        self.store = self.policy.store(self.store)
        prompts = load_prompts(cfg.prompts, task=cfg.model.task)  # a bad prompt set fails before any generation
        self.compare_on, self.save_videos, self.mp4_why = _comparisons(cfg)
        items = self.policy.rows([(p, int(s)) for p in prompts for s in cfg.seeds])
        self.counts["total"] = len(items)
        self.base_job = {
            "name": cfg.name, **self.job_info, "model": cfg.model.name, "model_family": cfg.model.family,
            "task": cfg.model.task, "height": cfg.model.height, "width": cfg.model.width,
            "num_frames": cfg.model.num_frames, "num_steps": cfg.model.num_steps,
            "guidance_scale": cfg.model.guidance_scale, "dtype": cfg.model.dtype, "compile": bool(cfg.compile),
            "kernel_attention": cfg.kernel.attention, "kernel_kmeans": cfg.kernel.kmeans,
            "method": cfg.method.name, "method_label": cfg.method.label or cfg.method.name,
            **self.policy.row_fields(), "config_json": _json(_plain(cfg))}
        self.base_job["metric_convention"] = cfg.metrics.get("convention", "standard")
        try:
            bad_model = check_model(cfg.model, weights=False)  # e.g. num_steps=0: a config failure, not an IndexError
            if bad_model:
                raise ValueError("; ".join(bad_model))
            self.spec = method_spec(cfg)
            self.identity = job_identity(cfg, self.spec, self.policy)
        except Exception as e:  # noqa: BLE001 - a bad method config is a failed job, not a dead sweep
            self.spec_error = e
            self.identity = {"invalid": _plain(cfg.method), "model": _plain(cfg.model), "kernel": _plain(cfg.kernel)}
        for p, s in items:
            if self.store.should_run(row_key(self.identity, p, s), retry_failed=cfg.store.retry_failed):
                self.todo.append((p, s))
            else:
                self.counts["skipped"] += 1
        if self.counts["skipped"]:
            log.info("[%s] %d of %d rows already in %s: skipped", self.tag, self.counts["skipped"], len(items),
                     self.store.root)
        if self.todo and self.spec_error is not None:
            self.fail_rows(self.spec_error, "config")

    def claim(self) -> None:
        """Hold this job's lock (its identity and rank) until it ends, then skip the rows that a concurrent job
        with the same row keys finished meanwhile: ``dense`` swept over three densities has one row set (its
        rows ignore the knob), so under launcher=lanes one job runs it and the other two wait, then skip."""
        if not self.policy.locks:
            return
        name = hashlib.sha256(json.dumps(self.identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(self.store.root) / ".locks" / f"job-{name}-rank{self.policy.info.rank}.lock"
        self._job_lock.enter_context(file_locks([path], "job lock"))
        self._skip_done()  # always: the other job may have finished between this job's plan and its lock

    def load(self) -> None:
        """The pipeline (the session's, when the model matches), the metrics, the reference cache, the logger."""
        cfg = self.cfg
        try:
            self.loaded = self.session.pipeline(cfg, self.policy.parallelize)
            self.suite = MetricSuite.from_config(cfg.metrics)
        except Exception as e:  # noqa: BLE001
            self.fail_rows(e, "load")
        if not is_resolved(self.identity["weights"]):
            self._rekey()
        device = self.loaded.device
        # pipeline_load_s: loading (or building) the pipeline this job uses; a reused one keeps its first time
        self.env = {**environment_info(device), "pipeline_load_s": self.loaded.load_s}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cache = ReferenceCache(Path(os.path.expanduser(cfg.cache.dir)), dtype=cfg.cache.dtype,
                               enabled=cfg.cache.enabled)
        self.cache = self.policy.cache(cache)
        self.progress = _progress_enabled(cfg)
        pipe = self.loaded.pipe
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=not self.progress, leave=False, desc="steps")
        if self.policy.writes:
            self.logger = make_logger(cfg.logger, _plain(cfg), name=str(self.tag), out_dir=self.out_dir)

    def references(self) -> None:
        """Dense reference videos: cache hits, else generated with the stock pipeline. A stock method's own
        generation doubles as its missing reference (see :meth:`rows`)."""
        cfg = self.cfg
        missing = self._read_cached(self.todo)
        if missing and self.policy.locks and self.cache.enabled:
            # Concurrent jobs (launcher=lanes) share the cache: hold the missing keys' locks until their references
            # are stored, so each is made once; a job that waited reads what the holder made. A stock method's rows
            # are its references: it holds the locks until close().
            keys = [self.cache.lock_path(self._ref_key(p, s)) for p, s in missing]
            self._ref_locks.enter_context(file_locks(keys, "dense reference"))
            missing = self._read_cached(missing)
        if not missing or self.spec.stock:
            if not missing:
                self._ref_locks.close()
            return
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"dense references [{self.tag}]", disable=not self.progress, leave=False)
        for batch in _chunks(missing, self.batch_size):
            try:
                results = generate_batch(self.loaded.pipe, cfg.model, batch, self.loaded.device)
                for (p, s), res in zip(batch, results):
                    self.refs[_pair_id(p, s)] = self._store_reference(p, s, res)
            except Exception as e:  # noqa: BLE001 - one failed call fails every item of its batch
                for p, s in batch:
                    if _pair_id(p, s) in self.refs:  # stored before the failure
                        continue
                    row = _failure({**self._base_row(p, s), "batch_size": len(batch)}, e, "reference")
                    self.store.write(row)
                    self.failed_keys.add(row["key"])
                    self.counts["failed"] += 1
                    log.error("[%s] dense reference failed for %r: %s", self.tag, p.text, e)
                if cfg.fail_fast:
                    raise
                _free_memory(self.loaded.device)
            bar.update(len(batch))
        bar.close()
        self._ref_locks.close()

    def _read_cached(self, items: list[tuple[Prompt, int]]) -> list[tuple[Prompt, int]]:
        """Take the cached references of ``items`` into ``self.refs``; returns the items still missing."""
        for p, s in items:
            hit = self.cache.get(self._ref_key(p, s))
            if hit is not None:
                ref_mp4 = self.cache.entry(self._ref_key(p, s)) / "video.mp4"
                if "mp4" in self.compare_on and not ref_mp4.exists():  # cached where imageio-ffmpeg was missing
                    write_mp4(ref_mp4, hit[0], fps=self.cfg.model.fps)
                self.refs[_pair_id(p, s)] = _Ref(hit[0], ref_mp4, hit[1], True)
        return [(p, s) for p, s in items if _pair_id(p, s) not in self.refs]

    def enable(self) -> None:
        """Install the method (nothing for a stock method) and run the untimed warm-up generations."""
        cfg, spec = self.cfg, self.spec
        try:
            if not spec.stock:
                from svg2.integrations import enable_svg2

                self.handle = enable_svg2(self.loaded.pipe, method=spec.build(), timing=bool(cfg.latency.components))
            n_warmup = int(cfg.latency.warmup_runs)
            if n_warmup < 0:
                n_warmup = 1 if self.loaded.device.type == "cuda" else 0
            for _ in range(n_warmup):  # at the timed batches' size: compilation and autotuning are per shape
                first = self.todo[:self.batch_size]
                self.warmup_s += _call_s(generate_batch(self.loaded.pipe, cfg.model, first, self.loaded.device,
                                                        per_step=False))
        except Exception as e:  # noqa: BLE001
            self.fail_rows(e, "enable" if self.handle is None else "warmup")

    def rows(self) -> None:
        """Per batch of up to ``batch_size`` (prompt, seed): one timed generation; per item: MP4, metrics
        against the reference, one row in the store. A failed call fails every row of its batch; a failure
        after the call (metrics, MP4) fails that row only."""
        from tqdm.auto import tqdm

        pending = [(p, s) for p, s in self.todo if row_key(self.identity, p, s) not in self.failed_keys]
        bar = tqdm(total=len(pending), desc=f"{self.spec.label} [{self.tag}]", disable=not self.progress)
        for batch in _chunks(pending, self.batch_size):
            base_rows = [self._base_row(p, s) for p, s in batch]  # started_at: before the call
            try:
                results = generate_batch(self.loaded.pipe, self.cfg.model, batch, self.loaded.device,
                                         per_step=bool(self.cfg.latency.per_step))
                # The handle's records cover the last pipeline call (reset by set_timesteps at its start):
                # every row of a batch gets the batch's stats.
                stats = _stats_fields(self.policy.stats_view(self.handle))  # ulysses: all ranks' heads
            except Exception as e:  # noqa: BLE001 - OOM, kernel errors...: record the batch and go on
                self._fail_batch(batch, base_rows, e)
                bar.update(len(batch))
                continue
            for (p, s), res, row in zip(batch, results, base_rows):
                video_path = None
                try:
                    row, video_path = self._measure(p, s, row, res, stats)
                    self.counts["ok"] += 1
                    if self.progress and "psnr" in row:
                        bar.set_postfix(psnr=f"{row['psnr']:.2f}", density=row.get("density"))
                except Exception as e:  # noqa: BLE001
                    row = {**_failure(row, e, "generate"), "batch_size": len(batch), **self.env}
                    self.counts["failed"] += 1
                    log.error("[%s] failed for %r: %s: %s", self.tag, p.text, type(e).__name__, e)
                    _free_memory(self.loaded.device)
                    if self.cfg.fail_fast:
                        self.store.write(row)
                        raise
                self.store.write(row)
                log.info("[%s] row %s (%s, seed %d): %s", self.tag, row["key"], p.id, s, row["status"])
                self.logger.log_row(row, video_path)
                bar.update(1)
        bar.close()

    def _fail_batch(self, batch: list[tuple[Prompt, int]], base_rows: list[dict[str, Any]],
                    exc: Exception) -> None:
        """Record every row of a batch whose pipeline call failed (``fail_fast``: then re-raise)."""
        for base in base_rows:
            row = {**_failure(base, exc, "generate"), "batch_size": len(batch), **self.env}
            self.store.write(row, consolidate=False)
            self.counts["failed"] += 1
            self.logger.log_row(row, None)
        self.store.consolidate()
        log.error("[%s] failed for %d prompt(s) (%s ...): %s: %s", self.tag, len(batch), batch[0][0].text,
                  type(exc).__name__, exc)
        _free_memory(self.loaded.device)
        if self.cfg.fail_fast:
            raise exc

    @property
    def batch_size(self) -> int:
        return resolve_batch_size(self.cfg)

    def close(self) -> None:
        try:
            if self.handle is not None:
                self.handle.remove()
                self.handle = None
            self.logger.finish()
            if self.loaded is not None:
                _free_memory(self.loaded.device)
        finally:
            self._ref_locks.close()
            self._job_lock.close()

    # -- helpers ----------------------------------------------------------------------------------------------
    def fail_rows(self, exc: Exception, stage: str) -> None:
        """Record every row still to run as failed at ``stage``, then end the job (``fail_fast``: re-raise)."""
        which = [it for it in self.todo if row_key(self.identity, *it) not in self.failed_keys]
        for p, s in which:
            self.store.write(_failure(self._base_row(p, s), exc, stage), consolidate=False)
            self.counts["failed"] += 1
        self.store.consolidate()
        log.error("[%s] %s failed for %d rows: %s: %s", self.tag, stage, len(which), type(exc).__name__, exc)
        if self.cfg.fail_fast:
            raise exc
        raise _Stop(stage) from exc

    def _base_row(self, p: Prompt, s: int) -> dict[str, Any]:
        row = {**self.base_job, "key": row_key(self.identity, p, s), "prompt": p.text, "prompt_id": p.id,
               "dimension": p.dimension, "image": p.image, "seed": s, "started_at": time.time()}
        spec = self.spec
        if spec is not None:
            row.update(method_stock=spec.stock, svg2_config_json=_json(spec.cfg.to_dict() if spec.cfg else None),
                       method_kwargs_json=_json(spec.kwargs))
            if spec.cfg is not None:  # flat copies of the knobs people sweep (tables, plots, filtering)
                row.update({f"cfg_{k}": v for k, v in spec.cfg.to_dict().items()})
            elif "target_density" in spec.kwargs:
                row["cfg_target_density"] = spec.kwargs["target_density"]
        return row

    def _rekey(self) -> None:
        """A Hub model first downloaded by this job: its commit is known now, so the row keys are computed
        again (rows already stored under the resolved keys are skipped)."""
        self.identity = job_identity(self.cfg, self.spec, self.policy)
        self._skip_done()
        if not self.todo:
            raise _Stop("rekey")  # every row is already stored under its resolved key: nothing to run

    def _skip_done(self) -> None:
        """Drop the rows the store holds now from ``todo`` (counted as skipped)."""
        todo, self.todo = self.todo, []
        for p, s in todo:
            if self.store.should_run(row_key(self.identity, p, s), retry_failed=self.cfg.store.retry_failed):
                self.todo.append((p, s))
            else:
                self.counts["skipped"] += 1

    def _ref_key(self, p: Prompt, s: int) -> str:
        return reference_key(_plain(self.cfg.model), self.loaded.device.type, p.text, p.image, s,
                             batch_size=self.batch_size, weights=self.identity["weights"],
                             stack=software_stack(self.loaded.device))

    def _store_reference(self, p: Prompt, s: int, res: GenerationResult) -> _Ref:
        # latency_s: this video's share of its batch's call (speedups compare like with like)
        meta = {"latency_s": res.latency_s, "batch_size": res.batch_size, "gpu": self.env["gpu"],
                "git_rev": self.env["git_rev"], "model": self.cfg.model.name, "prompt": p.text, "seed": s,
                "weights": self.identity["weights"], "stack": software_stack(self.loaded.device)}
        frames, mp4 = self.cache.put(self._ref_key(p, s), res.frames, meta, fps=self.cfg.model.fps,
                                     write_video=self.mp4_why is None)
        return _Ref(frames, mp4, {**meta, "key": self._ref_key(p, s)}, cached=False)

    def _measure(self, p: Prompt, s: int, row: dict[str, Any], res: GenerationResult,
                 stats: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
        """The row of one generated video ``res`` (``stats``: the method's stats of its pipeline call)."""
        cfg, suite = self.cfg, self.suite
        ref = self.refs.get(_pair_id(p, s))
        if ref is None:  # stock method, reference not cached yet: this video is the reference
            ref = self._store_reference(p, s, res)
        row.update(_latency_fields(res, self.warmup_s))
        row.update(stats)
        row.update(ref_key=ref.meta.get("key"), ref_cached=ref.cached, ref_latency_s=ref.meta.get("latency_s"),
                   ref_gpu=ref.meta.get("gpu"), ref_frames_dtype=ref.meta.get("frames_dtype", cfg.cache.dtype),
                   ref_video_path=str(ref.mp4) if ref.mp4 else "")
        video_path = None
        if self.save_videos or "mp4" in self.compare_on:
            video_path = write_mp4(self.store.root / "videos" / f"{row['key']}.mp4", res.frames, fps=cfg.model.fps)
            row["video_path"] = str(video_path)
        scalars, per_frame = {}, {}
        t_metrics = time.perf_counter()
        if "memory" in self.compare_on:
            sc, pf = suite(ref.frames, res.frames)
            scalars.update(sc)
            per_frame.update(pf)
        if "mp4" in self.compare_on:
            sc, pf = suite(read_mp4(ref.mp4), read_mp4(video_path), suffix="_mp4")
            scalars.update(sc)
            per_frame.update(pf)
        row.update(scalars, metrics_s=time.perf_counter() - t_metrics)  # PSNR/SSIM/LPIPS (+ MP4 decode)
        row.update(per_frame)  # psnr_frames (+ _mp4): either PSNR pooling recomputes (svg2-report --psnr-pooling)
        row.update(suite.describe())
        row.update(compared_on=",".join(self.compare_on), mp4_skipped_reason=self.mp4_why,
                   mp4_settings_json=_json(MP4_SETTINGS), status="ok", finished_at=time.time(), **self.env)
        return row, video_path


def _pair_id(p: Prompt, s: int) -> tuple[str, int]:
    return p.text + (p.image or ""), s


def run_job(cfg: DictConfig, store_dir: str | Path, job_info: dict[str, Any] | None = None,
            out_dir: str | Path | None = None, *, session: RunSession | None = None) -> dict[str, int]:
    """Run one job (all prompts x seeds of ``cfg``, this rank's share) into the store at ``store_dir``.

    ``session`` carries what the jobs of one process share (the loaded pipeline); without one, the job loads
    its own. Returns counts: ``{"total", "skipped", "ok", "failed"}``.
    """
    job = _Job(cfg, store_dir, job_info, out_dir, session or RunSession())
    try:
        job.plan()
        if job.todo:
            job.claim()
        if job.todo:
            job.load()
            job.references()
            job.enable()
            job.rows()
    except _Stop:
        pass  # the stage recorded its failed rows
    finally:
        job.close()
    return job.counts


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _call_s(results: list[GenerationResult]) -> float:
    """Seconds of the one pipeline call that made ``results``."""
    r = results[0]
    return r.batch_latency_s if r.batch_latency_s is not None else r.latency_s


def _latency_fields(res: GenerationResult, warmup_s: float) -> dict[str, Any]:
    steps = res.step_s  # the pipeline call's steps (the whole batch's)
    return {
        "latency_s": res.latency_s,  # in a batch: this video's share, batch_latency_s / batch_size
        "batch_size": res.batch_size,  # videos in the timed call
        "batch_latency_s": _call_s([res]),
        "step_times_json": _json(steps),
        "mean_step_s": float(np.mean(steps)) if steps else math.nan,
        # The first step also holds text encoding and set-up; the median excludes that.
        "median_step_s": float(np.median(steps)) if steps else math.nan,
        "warmup_s": warmup_s,
        "peak_mem_gb": res.peak_mem_gb,
        # the call's stages (nan when not measured): text encoder forwards; VAE decode + frames after the last step
        "text_encode_s": res.stage_s.get("text_encode", math.nan),
        "decode_s": res.stage_s.get("decode", math.nan),
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
