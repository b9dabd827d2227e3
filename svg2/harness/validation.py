"""Checks of a composed run config that need no model: ``svg2-run`` runs them on every job of an invocation
before any pipeline is loaded (:class:`ValidateCallback`), so a typo or an out-of-range value fails in seconds,
with one line per problem, instead of after a model load (or, for a kernel name, at the first sparse step of
every row).

:func:`check_run_config` returns the problems of one job config (an empty list when it can run). What is checked:
the method and its SVG2 knobs (``method_spec``: the method class, its parameters, SVG2Config ranges, kernel
names from the kernel registry; the method object is built, so its constructor checks its own arguments; a named
kernel must be able to run on the job's device), the model preset's values (frames, steps, sizes, dtype, device,
loader, weights), seeds, the prompt selection (the prompts are loaded: a bad file or an empty selection is
reported here), batch size, parallel mode, metric comparisons, warm-up runs and the reference cache's dtype.
Pretrained weights are checked where it costs nothing: a local folder must exist, and with HF_HUB_OFFLINE=1 a
Hub id must be in the cache.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

__all__ = ["check_run_config", "check_model", "kernel_device_problems", "sweep_job_overrides", "ValidateCallback",
           "ConfigProblems"]

_LOADERS = ("diffusers", "random", "tiny_wan", "callable")
_CACHE_DTYPES = ("float16", "float32", "uint8")


class ConfigProblems(SystemExit):
    """Raised by :class:`ValidateCallback` when a job config cannot run: exits ``svg2-run`` with status 2 after
    the problems were printed (a SystemExit, so Hydra neither reports it as a crash nor swallows it)."""

    def __init__(self, n: int) -> None:
        super().__init__(2)
        self.n = n


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _weights_problem(m: Any) -> str | None:
    """Why the pretrained weights of ``m`` cannot be loaded here, found without loading them: a local folder that
    does not exist, or (HF_HUB_OFFLINE=1) a Hub id that is not in the cache. None when they may load."""
    from svg2.harness.models import hub_offline, is_local_path, load_hint

    repo = str(m.repo_id)
    if is_local_path(repo):
        return None if Path(repo).expanduser().exists() else f"model {m.get('name')!r}: {load_hint(m)}"
    if not hub_offline():
        return None  # online: from_pretrained downloads them
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    if isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        return None
    return f"model {m.get('name')!r}: {load_hint(m)}"


def check_model(m: Any, weights: bool = True) -> list[str]:
    """Problems of a ``model`` node (a ModelConfig); ``weights``: also whether pretrained weights can load (a local
    folder exists; offline, the Hub id is cached)."""
    out: list[str] = []
    for key in ("height", "width", "num_frames", "num_steps", "fps"):
        v = m.get(key)
        if not _whole(v) or v < 1:
            what = {"num_frames": "frames per video", "num_steps": "denoising steps", "fps": "frames per second of "
                    "the saved MP4s"}.get(key, "pixels")
            out.append(f"model.{key}={v!r}: use a whole number >= 1 ({what})")
    if str(m.get("family")) == "wan" and m.get("loader") != "callable" and not out:
        # The diffusers Wan pipelines: the VAE compresses time by 4 (the pipeline silently rounds another count)
        # and space by 8 with 2x2 patches (the pipeline raises at its first call). Callables (mini, testbed) check
        # their own sizes.
        if (m.num_frames - 1) % 4:
            near = 4 * round((m.num_frames - 1) / 4) + 1
            out.append(f"model.num_frames={m.num_frames}: Wan needs 4k+1 frames (e.g. {max(near, 1)}, 81)")
        for key in ("height", "width"):
            if m[key] % 16:
                out.append(f"model.{key}={m[key]}: Wan needs a multiple of 16 (e.g. {16 * max(1, round(m[key] / 16))})")
    if m.get("guidance_scale") is not None and m.guidance_scale < 0:
        out.append(f"model.guidance_scale={m.guidance_scale}: use a value >= 0")
    if m.get("flow_shift") is not None and m.flow_shift <= 0:
        out.append(f"model.flow_shift={m.flow_shift}: use a value > 0, or null to keep the checkpoint's scheduler")
    from svg2.harness.models import _DTYPES

    if m.get("dtype") not in _DTYPES:
        out.append(f"model.dtype={m.get('dtype')!r}: use one of {sorted(_DTYPES)}")
    device = str(m.get("device", "auto"))
    if device != "auto":
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            out.append(f"model.device={device!r}: use auto, cpu, cuda or cuda:N")
        else:
            if dev.type == "cuda" and not torch.cuda.is_available():
                out.append(f"model.device={device!r} but no CUDA GPU is visible; use model.device=auto or cpu")
    loader = m.get("loader")
    if loader not in _LOADERS:
        out.append(f"model.loader={loader!r}: use one of {list(_LOADERS)}")
    elif loader == "callable":
        target = str(m.get("target") or "")
        if ":" not in target:
            out.append(f"model.target={target or None!r}: model.loader=callable needs 'package.module:function'")
    elif loader == "random":
        from svg2.harness.random_weights import component_configs

        try:
            component_configs(str(m.get("repo_id")), m.get("kwargs") or {})
        except KeyError as e:
            out.append(str(e.args[0]))
    elif loader == "diffusers":
        if not m.get("repo_id"):
            out.append(f"model {m.get('name')!r}: loader=diffusers needs model.repo_id (a Hub id or a local folder)")
        elif weights:
            why = _weights_problem(m)
            if why:
                out.append(why)
    return out


def _check_prompts(cfg: Any) -> list[str]:
    p = cfg.prompts
    limit = p.get("limit")
    if limit is not None and (not _whole(limit) or limit < 1):
        return [f"prompts.limit={limit!r}: use a whole number >= 1 (the first N prompts) or null (all of them)"]
    from svg2.harness.prompts import load_prompts

    try:
        prompts = load_prompts(p, task=cfg.model.task)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        return [f"prompts: {msg}"]
    if not prompts:
        return [f"prompts: the selection {_plain(p)} holds no prompt"]
    return []


def _check_kernel_names(cfg: Any) -> tuple[list[str], Any]:
    """Unknown kernel names (``kernel.attention``, ``kernel.kmeans``), looked up in the kernel registry, one line
    each with the registered names; and the config with each unknown name replaced by ``auto``, so that the other
    checks still run on it (SVG2Config would stop at the first unknown name)."""
    from svg2_kernels.registry import get_attention_variant, get_kmeans_variant

    out: list[str] = []
    bad: list[str] = []
    for field_name, get in (("attention", get_attention_variant), ("kmeans", get_kmeans_variant)):
        name = cfg.kernel.get(field_name)
        if name == "auto" or not isinstance(name, str):
            continue  # not a string: SVG2Config's type check says so
        try:
            get(name)
        except KeyError as e:
            out.append(f"kernel.{field_name}={name}: {e.args[0]}")
            bad.append(field_name)
    if not bad:
        return out, cfg
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        for field_name in bad:
            job.kernel[field_name] = "auto"
    return out, job


def _svg2_knob_problems(cfg: Any) -> list[str]:
    """Each SVG2 knob of ``model.svg2``, ``method.cfg`` and ``kernel.tiles`` that SVG2Config refuses on its own
    (on top of the defaults), one line each naming the override to fix."""
    from svg2.config import SVG2Config
    from svg2.harness.runner import _set

    fields = set(SVG2Config.field_names())
    knobs = [(f"model.svg2.{k}", k, v) for k, v in _set(cfg.model.svg2).items() if k in fields]
    knobs += [(f"method.cfg.{k}", k, v) for k, v in _set(cfg.method.cfg).items() if k in fields]
    tiles = _set(cfg.kernel.get("tiles"))
    if tiles:
        knobs.append(("kernel.tiles", "attention_tiles", tiles))
    out = []
    for where, key, value in knobs:
        try:
            SVG2Config.from_dict({key: value})
        except (KeyError, TypeError, ValueError) as e:
            out.append(f"{where}={value}: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    return out


def _check_method(spec: Any, model: Any) -> list[str]:
    """Problems the method object finds in its own arguments (its constructor checks them: a bad
    ``method.cfg.backend`` of dense_floor), and named kernels that cannot run on the job's device."""
    if spec.stock:
        return []
    try:
        with warnings.catch_warnings():  # a deprecation warning is the runner's to give, once
            warnings.simplefilter("ignore")
            spec.build()
    except (ValueError, KeyError, TypeError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e
        return [f"method {spec.name!r} (method.cfg): {why}"]
    if spec.cfg is not None:
        attention, kmeans = spec.cfg.attention_kernel, spec.cfg.kmeans_kernel
    else:  # a method that shares the kernel knobs with SVG2 gets them as arguments; others run no kernel
        attention, kmeans = spec.kwargs.get("attention_kernel", "auto"), spec.kwargs.get("kmeans_kernel", "auto")
    return kernel_device_problems(attention, kmeans, str(model.get("device", "auto")))


def kernel_device_problems(attention: str, kmeans: str, device: str) -> list[str]:
    """Named kernels (not ``auto``) that cannot run on ``device`` (a ``model.device`` value) at all, by what the
    registry's variants declare (their ``devices`` and the packages they require); one line each, listing the
    registered kernels that can. Whether a kernel takes the model's head dim, dtype and sequence length is
    known only once the model is loaded: the variant's ``not_supported_reasons`` decides that at the call."""
    from svg2.harness.models import ModelLoadError, resolve_device
    from svg2_kernels.registry import (
        available_attention_variants,
        available_kmeans_variants,
        get_attention_variant,
        get_kmeans_variant,
    )

    try:
        dev = resolve_device(device).type
    except (ModelLoadError, RuntimeError, ValueError):
        return []  # check_model reports the device
    out: list[str] = []
    for key, name, get, names in (("kernel.attention", attention, get_attention_variant, available_attention_variants),
                                  ("kernel.kmeans", kmeans, get_kmeans_variant, available_kmeans_variants)):
        if name == "auto":
            continue
        try:
            variant = get(name)
        except KeyError:
            continue  # an unknown name: SVG2Config already said so, with the known names
        why = _refusal(variant, dev)
        if why:
            fit = [n for n in names() if not _refusal(get(n), dev)]
            out.append(f"{key}={name}: {why}; on {dev} use {key}=auto or one of {fit}"
                       + (" (kernel=<name> sets both kernels)" if key == "kernel.attention" else ""))
    return out


def _refusal(variant: Any, device_type: str) -> str:
    """Why ``variant`` can run nothing on ``device_type`` (empty: it may run, depending on the inputs)."""
    from svg2_kernels.registry import missing_package_reasons

    why = missing_package_reasons(variant)
    if device_type not in variant.devices:
        why.append(f"kernel {variant.name!r} runs on {'/'.join(variant.devices)}, not on this job's device "
                   f"({device_type})")
    return "; ".join(why)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_run_config(cfg: Any) -> list[str]:
    """Problems of one composed job config (``RunConfig``); empty when the job can start."""
    from svg2.harness.ranks import mode_of
    from svg2.harness.runner import method_spec, resolve_batch_size

    out, job = _check_kernel_names(cfg)
    try:
        spec = method_spec(job)
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        # SVG2Config stops at its first bad field: name each bad knob on its own line (the message when none
        # is bad alone)
        out += (_svg2_knob_problems(job) or [msg]) if msg.startswith("invalid SVG2 settings") else [msg]
    else:
        out += _check_method(spec, job.model)
    out += check_model(cfg.model)
    seeds = list(cfg.seeds) if cfg.get("seeds") is not None else []
    if not seeds:
        out.append("seeds=[]: list at least one seed, e.g. seeds=[0] or seeds=[0,1,2]")
    elif any(not _whole(s) or s < 0 for s in seeds):
        out.append(f"seeds={seeds}: seeds are whole numbers >= 0")
    out += _check_prompts(cfg)
    for check in (resolve_batch_size, mode_of):
        try:
            check(cfg)
        except ValueError as e:
            out.append(str(e))
    compare_on = list(cfg.metrics.get("compare_on") or [])
    if set(compare_on) - {"memory", "mp4"}:
        out.append(f"metrics.compare_on={compare_on}: use memory and/or mp4")
    warmup = cfg.latency.get("warmup_runs", -1)
    if not _whole(warmup) or warmup < -1:
        out.append(f"latency.warmup_runs={warmup!r}: use -1 (auto: 1 on a GPU, 0 on the CPU) or a whole number >= 0")
    if cfg.cache.get("dtype") not in _CACHE_DTYPES:
        out.append(f"cache.dtype={cfg.cache.get('dtype')!r}: use one of {list(_CACHE_DTYPES)}")
    return out


def sweep_job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job of a basic-sweeper multirun, in Hydra's order (``hydra.sweeper.params``
    merged with the command line, which wins for the same key); None for another sweeper (it picks its jobs
    as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(config.hydra.sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += [str(o) for o in config.hydra.overrides.task]
    overrides = OverridesParser.create().parse_overrides(params)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _report(problems: list[tuple[str, list[str]]], n_jobs: int) -> None:
    lines = [f"svg2-run: {len(problems)} of {n_jobs} job(s) cannot run; nothing was started. Fix the config and "
             "launch again:"]
    for where, probs in problems:
        lines.append(f"  {where}:" if where else "  this run:")
        lines += [f"    - {p}" for p in probs]
    print("\n".join(lines), file=sys.stderr, flush=True)


class ValidateCallback(Callback):
    """Checks every job of a run or a basic-sweeper multirun before the first one starts (before any pipeline
    is loaded or any SLURM job submitted); on a problem, prints one line per problem and exits with status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        problems = check_run_config(config)
        if problems:
            _report([("", problems)], 1)
            raise ConfigProblems(1)

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        from hydra import compose

        jobs = sweep_job_overrides(config)
        if jobs is None:
            return  # another sweeper: each job is checked when it starts (runner: failed rows, stage "config")
        found: list[tuple[str, list[str]]] = []
        tasks = [[o for o in job if not o.lstrip("+~").startswith("hydra")] for job in jobs]  # not launcher keys
        varying = {o for t in tasks for o in t if len(tasks) > 1 and any(o not in u for u in tasks)}
        for task in tasks:
            try:
                cfg = compose(config_name=config_name or "config", overrides=task)
                probs = check_run_config(cfg)
            except Exception as e:  # noqa: BLE001 - a job that cannot be composed cannot run either
                probs = [f"{type(e).__name__}: {e}"]
            if probs:  # the job named by the overrides that tell it from the others
                found.append((" ".join(o for o in task if o in varying) or " ".join(task), probs))
        if found:
            _report(found, len(jobs))
            raise ConfigProblems(len(found))
