"""Structured-config schemas of the experiment harness (Hydra 1.3).

``conf/config.yaml`` composes onto :class:`RunConfig`, so every group option is type-checked and an unknown
key fails at composition time with the option's file named. ``model.svg2`` and ``method.cfg`` are typed
overlays of ``SVG2Config`` (every field optional, None = not set; values and kernel names are checked before
any job starts, by ``svg2.harness.validation``); ``method.cfg`` also holds the method's own parameters, checked
against its class by ``method_spec``. Free-form mappings (``model.kwargs``) are checked by the code that consumes
them (the loader).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from svg2.config import KERNEL_FIELDS, SVG2Config
from svg2.harness.launch import ensure_launch_resolver
from svg2_kernels.plan import TileConfig

__all__ = ["SVG2Overrides", "ModelConfig", "MethodConfig", "KernelConfig", "PromptsConfig", "MetricsConfig",
           "LoggerConfig",
           "LatencyConfig", "StoreConfig", "CacheConfig", "RunConfig", "register_configs"]


def _optional_overrides(cls: type, exclude: tuple[str, ...] = ()) -> type:
    """A dataclass with every field of ``cls`` but ``exclude``, each Optional and None by default (None = not
    set). As a Hydra node it accepts ``method.cfg.top_p=0.8`` and rejects typos and wrong types at composition
    time."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        t = hints[f.name]
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            t = next(a for a in typing.get_args(t) if a is not type(None))
        fields.append((f.name, Optional[t], None))
    return dataclasses.make_dataclass(f"{cls.__name__}Overrides", fields)


# The kernel knobs are set by the `kernel` group only (one place per knob): model.svg2.attention_kernel=... and
# method.cfg.attention_kernel=... fail at composition time.
SVG2Overrides = _optional_overrides(SVG2Config, exclude=KERNEL_FIELDS)
# TileConfig is frozen (hashable plans): a frozen node is read-only in Hydra, so kernel.tiles.block_m=64 needs a
# writable overlay of the same fields.
TileOverrides = _optional_overrides(TileConfig)


@dataclass
class ModelConfig:
    """One model preset: how to load it and how to sample from it (one operating point)."""

    name: str = MISSING
    # diffusers: DiffusionPipeline.from_pretrained(repo_id); random: repo_id's architecture at full size with
    # random weights, built from configs shipped in svg2 (nothing downloaded; a dry run of memory and time);
    # tiny_wan: random tiny WanPipeline built in code; callable: import ``target`` ("pkg.module:function") and
    # call it with ``kwargs`` (+ device, dtype).
    loader: str = "diffusers"
    repo_id: Optional[str] = None
    target: Optional[str] = None
    pipeline_class: Optional[str] = None  # diffusers class name; None lets DiffusionPipeline pick
    family: str = "wan"
    task: str = "t2v"  # t2v | i2v | ti2v
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_2: Optional[float] = None
    flow_shift: Optional[float] = None  # scheduler shift; None keeps the checkpoint's scheduler config
    negative_prompt: str = ""
    dtype: str = "bfloat16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    fps: int = 16
    svg2: SVG2Overrides = field(default_factory=SVG2Overrides)  # this model's SVG2Config defaults (authors')
    kwargs: dict[str, Any] = field(default_factory=dict)  # loader kwargs
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # extra pipeline-call kwargs


@dataclass
class MethodConfig:
    """An attention method: its class and its parameters, nothing else. What the class takes (its constructor's
    parameters, the SVG2 knobs it shares, whether it is the stock pipeline) is read from the class by
    :func:`svg2.harness.runner.method_spec`."""

    name: str = MISSING  # the method in result rows and tables; also its class (registered name) unless `target`
    target: Optional[str] = None  # the class when it differs from `name`: a registered name or "pkg.module:Class"
    label: Optional[str] = None  # display name in tables and plots
    # The method's parameters, the one place for each: typed SVG2 knobs (None = the model preset's value; a
    # method that does not take a knob ignores it, so a sweep over it runs that method once) plus the method's
    # own constructor arguments (open node: method.cfg.block_size=32 needs no `+`; unknown keys are an error
    # naming the accepted ones).
    cfg: SVG2Overrides = field(default_factory=SVG2Overrides)


@dataclass
class KernelConfig:
    """The one place that chooses kernels: names (or "auto") and Triton tile overrides (None: measured)."""

    attention: str = "auto"
    kmeans: str = "auto"
    tiles: TileOverrides = field(default_factory=TileOverrides)


@dataclass
class PromptsConfig:
    # builtin: our VBench-style smoke sets; vbench: the installed vbench package's list (or ``path``);
    # file: ``path`` to a .txt (one prompt a line) or .json/.jsonl list.
    source: str = "builtin"
    set: str = "smoke"
    path: Optional[str] = None
    image_dir: Optional[str] = None  # I2V: images are resolved relative to this folder
    dimensions: Optional[list[str]] = None
    limit: Optional[int] = None


@dataclass
class MetricsConfig:
    # How PSNR/SSIM/LPIPS are computed and pooled (svg2.harness.metrics.CONVENTIONS): standard | svg (the
    # authors' evaluation script); recorded in every row as metric_convention.
    convention: str = "standard"
    psnr: bool = True
    ssim: bool = True
    ssim_window: Optional[str] = None  # replaced by `convention`; setting it is an error that says so
    lpips_nets: Optional[list[str]] = None  # None: the convention's backbone; [] = no LPIPS
    lpips_random_backbone: bool = False  # tests only: randomly initialised backbone, recorded as such
    lpips_allow_download: bool = True  # fetch absent backbone weights on first use (never under SVG2_OFFLINE=1)
    compare_on: list[str] = field(default_factory=lambda: ["memory", "mp4"])
    device: str = "auto"  # where PSNR, SSIM and LPIPS run, a chunk of frames at a time: auto (CUDA if any) | cpu | cuda


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "svg2"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_videos: bool = True


@dataclass
class LatencyConfig:
    # Untimed generations before the first timed one of each job (their time is reported as warmup_s): kernel
    # compilation, autotuning and torch.compile land there. -1 = auto: 1 on a GPU, 0 on the CPU.
    warmup_runs: int = -1
    per_step: bool = True  # per-denoising-step times through callback_on_step_end
    components: bool = True  # per-component times from the svg2 handle


@dataclass
class StoreConfig:
    # None: <sweep dir>/results in a multirun; outputs/<name>/results in a run (beside its per-launch folders)
    dir: Optional[str] = None
    retry_failed: bool = True  # a relaunch retries rows that failed; finished rows are always skipped
    save_videos: bool = True


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = "${oc.env:SVG2_CACHE_DIR,'~/.cache/svg2/reference'}"
    dtype: str = "float16"  # frames on disk: float16 | float32 | uint8


@dataclass
class ParallelConfig:
    """Several processes under torchrun (svg2.harness.ranks): ``none`` | ``shard`` (one video per GPU,
    rows split across ranks) | ``ulysses`` (one video on all GPUs, sequence parallel; rank 0 writes)."""

    mode: str = "none"
    ulysses_degree: Optional[int] = None  # None: the world size


@dataclass
class RunConfig:
    name: str = "adhoc"
    seeds: list[int] = field(default_factory=lambda: [0])
    compile: bool = False  # torch.compile the transformer(s); compile time lands in the warm-up
    progress: bool = True  # tqdm bars (TQDM_DISABLE=1 or CI=1 silences them)
    fail_fast: bool = False  # raise instead of recording a failed row and moving on
    # (prompt, seed) pairs per pipeline call (dense references and method videos); each item keeps its own
    # seed's noise. > 1 fills the GPU on small models; it is part of the row and reference keys when not 1.
    batch_size: int = 1
    report: bool = True  # write tables and plots when the run / multirun ends
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def register_configs() -> None:
    """Register the schemas and the ``${svg2_launch:}`` resolver of the job folders (idempotent).
    ``conf/config.yaml`` lists ``svg2_run_schema`` first."""
    ensure_launch_resolver()
    node = OmegaConf.structured(RunConfig)
    # method.cfg takes the method's own parameters beside the typed SVG2 knobs (see MethodConfig.cfg).
    OmegaConf.set_struct(node.method.cfg, False)
    ConfigStore.instance().store(name="svg2_run_schema", node=node)
