"""Full-size pipelines with random weights (``model.loader=random``): a dry run before fetching checkpoints.

The pipeline of ``model.repo_id`` is built from configs shipped in svg2 (:data:`ARCHS`, keyed by the Hub id of
the checkpoint whose architecture it is), nothing downloaded: the
transformer from :data:`svg2.benchmark.WAN_TRANSFORMERS` (the configs ``experiments/bench_e2e.py`` times), the
UMT5 text encoder, the VAE and the scheduler from ``arch_configs/<family>/*.json`` (copies of the checkpoints'
config files). The text goes through a character tokenizer built in code (the real one is a 4 MB SentencePiece
model): it pads to the same 512 tokens, so the text encoder does the same work. Every module is built on the
target device in the target dtype, with the modules diffusers keeps in float32 in float32, as a loaded
checkpoint is: peak memory, seconds per denoising step, VAE decode and metric cost are those of the real model.
The videos are noise, so quality metrics mean nothing.

Memory of the weights in bfloat16: Wan 2.1 14B transformer 26.6 GiB, 1.3B 2.6 GiB; UMT5-XXL text encoder
(5.7B parameters) 10.6 GiB, the same for both; VAE 0.24 GiB. Building at full size on the CPU needs that much
RAM (float32 doubles it) and minutes of random initialisation: use a GPU.

``model.kwargs`` (with ``loader=random``) overrides fields of the component configs,
``{transformer: {...}, text_encoder: {...}, vae: {...}}``: the tests build a tiny version of the same path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHS", "Arch", "random_pipeline", "component_configs", "CONFIG_DIR"]

log = logging.getLogger("svg2.harness")

CONFIG_DIR = Path(__file__).resolve().parent / "arch_configs"
COMPONENTS = ("transformer", "text_encoder", "vae")


@dataclass(frozen=True)
class Arch:
    transformer: str  # a key of svg2.benchmark.WAN_TRANSFORMERS
    components: str  # the folder of arch_configs/ with text_encoder.json, vae.json, scheduler.json
    text_len: int = 512  # the pipeline's max_sequence_length (Wan: 512)


# Hub id of the checkpoint -> its architecture (the same id as model.repo_id of the preset, so a random run and
# a real one differ only in model.loader: rows and references keep apart through it).
ARCHS: dict[str, Arch] = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": Arch(transformer="wan1.3b", components="wan2.1"),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": Arch(transformer="wan14b", components="wan2.1"),
}


def _read(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def component_configs(arch: str, overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The configs of ``arch``'s transformer, text encoder, VAE and scheduler, with ``overrides`` applied
    (``{component: {field: value}}``; an unknown component or field is an error naming the known ones)."""
    from svg2.benchmark import _WAN_COMMON, WAN_TRANSFORMERS

    if arch not in ARCHS:
        raise KeyError(f"model.loader=random has no shipped architecture for model.repo_id={arch!r}; shipped: "
                       f"{sorted(ARCHS)} (e.g. model=wan2.1-t2v-14b model.loader=random)")
    a = ARCHS[arch]
    folder = CONFIG_DIR / a.components
    out = {"transformer": {**_WAN_COMMON, **WAN_TRANSFORMERS[a.transformer]["config"]},
           "text_encoder": _read(folder / "text_encoder.json"), "vae": _read(folder / "vae.json"),
           "scheduler": _read(folder / "scheduler.json")}
    for comp, fields in dict(overrides or {}).items():
        if comp not in COMPONENTS:
            raise KeyError(f"model.kwargs.{comp}: with model.loader=random, model.kwargs overrides component "
                           f"configs; components: {list(COMPONENTS)}")
        unknown = sorted(set(fields) - set(out[comp]))
        if unknown:
            raise KeyError(f"model.kwargs.{comp}: unknown field(s) {unknown}; known: {sorted(out[comp])}")
        out[comp] = {**out[comp], **dict(fields)}
    return out


@contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    """Modules constructed inside are allocated on ``device`` in ``dtype`` (no float32 CPU copy first). The
    default dtype is process state: it is restored on exit."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def _keep_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to float32 what a checkpoint load keeps in float32: diffusers keeps ``_keep_in_fp32_modules`` in
    float32 at any dtype (the Wan transformer's norms, time embedder, scale-shift tables); transformers only at
    float16, and ``_keep_in_fp32_modules_strict`` at float16 and bfloat16 (UMT5 has none: all bfloat16)."""
    if dtype == torch.float32:
        return
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        keep = set(model._keep_in_fp32_modules or [])
    else:
        keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if keep & set(name.split(".")):
            t.data = t.data.float()


def _gib(model: torch.nn.Module) -> tuple[float, float]:
    """(billions of parameters, GiB of parameters and buffers)."""
    n = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return n / 1e9, size / 2**30


def random_pipeline(arch: str, device: torch.device, dtype: torch.dtype, overrides: Mapping[str, Any] | None = None):
    """The diffusers pipeline of ``arch`` (:data:`ARCHS`) with random weights, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from svg2.harness.models import _char_tokenizer

    cfgs = component_configs(arch, overrides)
    text_len = ARCHS[arch].text_len
    with _building(device, dtype):
        transformer = WanTransformer3DModel(**cfgs["transformer"])
        text_encoder = UMT5EncoderModel(UMT5Config(**cfgs["text_encoder"]))
        vae = AutoencoderKLWan(**cfgs["vae"])
    for m in (transformer, text_encoder, vae):
        _keep_fp32(m, dtype)
        m.eval().requires_grad_(False)
    sizes = {name: _gib(m) for name, m in (("transformer", transformer), ("text encoder", text_encoder),
                                            ("VAE", vae))}
    log.info("model.loader=random: %s with random weights on %s: %s", arch, device,
             ", ".join(f"{k} {n:.2f}B params {g:.1f} GiB" for k, (n, g) in sizes.items()))
    pipe = WanPipeline(tokenizer=_char_tokenizer(text_len), text_encoder=text_encoder, vae=vae,
                       scheduler=UniPCMultistepScheduler.from_config(cfgs["scheduler"]), transformer=transformer)
    pipe._svg2_max_sequence_length = text_len  # the harness passes it as max_sequence_length
    pipe._svg2_random_weights = {k: {"params_b": n, "gib": g} for k, (n, g) in sizes.items()}
    return pipe
