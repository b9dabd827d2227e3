"""Pipelines for the harness: real checkpoints through diffusers, the same architectures with random weights
(``model.loader=random``, :mod:`svg2.harness.random_weights`), the tiny random Wan pipeline, or any callable.

Every loader returns a pipeline with the diffusers video call shape (``pipe(prompt=..., height=..., width=...,
num_frames=..., num_inference_steps=..., guidance_scale=..., generator=..., output_type="np")`` returning an
object with ``.frames``).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["resolve_device", "resolve_dtype", "load_pipeline", "load_hint", "is_local_path", "hub_offline",
           "tiny_wan_pipeline", "ModelLoadError"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded; the message says what to do."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={name!r} but no CUDA GPU is visible; use model.device=auto or cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown model.dtype {name!r}; use one of {sorted(_DTYPES)}")
    dt = _DTYPES[name]
    if device.type == "cpu" and dt == torch.float16:
        return torch.float32  # fp16 matmuls on the CPU are slow or unsupported
    return dt


def _char_tokenizer(max_length: int):
    """A character-level fast tokenizer built in code (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_wan_pipeline(*, init_seed: int = 0, num_layers: int = 2, num_heads: int = 2, head_dim: int = 16,
                      text_dim: int = 32, text_len: int = 16, flow_shift: float = 3.0, two_experts: bool = False,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny diffusers ``WanPipeline`` (UMT5 text encoder, Wan VAE, Wan transformer),
    deterministic under ``init_seed``. Its attention has no learned structure: for plumbing, not quality.

    ``two_experts``: a Wan 2.2 A14B-style pipeline, a second transformer (the low-noise expert) taking over
    below timestep 600 (``boundary_ratio=0.6``: with UniPC's flow sigmas at shift 3 the last of 4 steps sits at
    t=500, so even a 4-step test run uses both experts)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(init_seed)
    try:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        enc_cfg = UMT5Config(vocab_size=128, d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=1,
                             num_heads=max(1, text_dim // 8), relative_attention_num_buckets=8,
                             relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0)
        text_encoder = UMT5EncoderModel(enc_cfg)
        def make_transformer() -> WanTransformer3DModel:
            return WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=2 * num_heads * head_dim,
                num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)

        transformer = make_transformer()
        experts = dict(transformer_2=make_transformer().eval(), boundary_ratio=0.6) if two_experts else {}
    finally:
        torch.random.set_rng_state(gen_state)
    for m in (vae, text_encoder, transformer):
        m.eval()  # built from configs, so in training mode: dropout would make every video differ
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift)
    pipe = WanPipeline(tokenizer=_char_tokenizer(text_len), text_encoder=text_encoder, vae=vae,
                       scheduler=scheduler, transformer=transformer, **experts)
    pipe._svg2_max_sequence_length = text_len  # the harness passes it as max_sequence_length
    pipe.to(device=device)
    if dtype != torch.float32:
        for m in (pipe.transformer, getattr(pipe, "transformer_2", None), pipe.text_encoder):
            if m is not None:
                m.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_local_path(repo_id: str) -> bool:
    """A ``model.repo_id`` that names a folder rather than a Hub id (``org/name``)."""
    return repo_id.startswith(("/", ".", "~")) or repo_id.count("/") != 1 or Path(repo_id).expanduser().exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def load_hint(cfg: Any) -> str:
    """What to do when the weights of ``cfg`` (a ModelConfig) cannot be loaded. A Hub id: download it with the
    ``hf`` command (huggingface_hub 2.x installs no ``huggingface-cli``); a local
    folder: it must hold the diffusers layout (model_index.json)."""
    from svg2.harness.random_weights import ARCHS

    without = ("Without weights: model.loader=random (the same architecture with random weights: memory and time "
               "only) or model=tiny (CPU smoke runs)." if cfg.get("repo_id") in ARCHS else
               "Without weights: model=tiny (CPU smoke runs).")
    repo = str(cfg.repo_id)
    if is_local_path(repo):
        where = "does not exist" if not Path(repo).expanduser().exists() else "holds no model_index.json"
        return (f"model.repo_id={repo!r} is a local folder that {where}: download the weights there "
                f"(`hf download <hub id> --local-dir {repo}`) or pass the folder that holds them. {without}")
    cache = "the Hugging Face cache and HF_HUB_OFFLINE=1" if hub_offline() else "the Hugging Face cache"
    return (f"{repo} is not in {cache}. Download it first (`hf download {repo}`), or into a folder (`hf download "
            f"{repo} --local-dir <dir>`, then model.repo_id=<dir>). {without}")


def _set_flow_shift(pipe: Any, shift: float) -> None:
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        return
    conf = dict(sched.config)
    key = "flow_shift" if "flow_shift" in conf else ("shift" if "shift" in conf else None)
    if key is None:
        raise ValueError(f"model.flow_shift is set but {type(sched).__name__} has no flow_shift/shift; "
                         "set model.flow_shift=null")
    pipe.scheduler = type(sched).from_config(conf, **{key: shift})


def _deprecation_utils():
    try:
        return importlib.import_module("diffusers.utils.deprecation_utils")
    except ImportError:
        return object()


def _import_target(target: str):
    mod, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"model.target must look like 'package.module:function', got {target!r}")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"model.target {target!r} cannot be imported ({type(e).__name__}: {e})") from e


def load_pipeline(cfg: Any) -> tuple[Any, torch.device, torch.dtype]:
    """Load the pipeline of a ``ModelConfig``-like node; returns ``(pipe, device, dtype)``."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(cfg.get("kwargs") or {})
    if cfg.loader == "tiny_wan":
        pipe = tiny_wan_pipeline(**kwargs, flow_shift=cfg.flow_shift or 3.0, device=device, dtype=dtype)
        return pipe, device, dtype
    if cfg.loader == "random":
        from svg2.harness.random_weights import random_pipeline

        if not cfg.get("repo_id"):
            raise ValueError(f"model {cfg.name}: loader=random builds the architecture of model.repo_id; set it")
        pipe = random_pipeline(cfg.repo_id, device, dtype, overrides=kwargs)
        if cfg.get("flow_shift") is not None:
            _set_flow_shift(pipe, float(cfg.flow_shift))
    elif cfg.loader == "callable":
        if not cfg.get("target"):
            raise ValueError("model.loader=callable needs model.target='package.module:function'")
        fn = _import_target(cfg.target)
        params = inspect.signature(fn).parameters
        extra = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in params}
        pipe = fn(**kwargs, **extra)
    elif cfg.loader == "diffusers":
        import diffusers

        if not cfg.get("repo_id"):
            raise ValueError(f"model {cfg.name}: loader=diffusers needs model.repo_id (a Hub id or local folder)")
        cls = getattr(diffusers, cfg.pipeline_class) if cfg.get("pipeline_class") else diffusers.DiffusionPipeline
        # diffusers renamed torch_dtype to dtype (the old name warns); pass whichever this version reads.
        dtype_kw = "dtype" if hasattr(_deprecation_utils(), "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
        try:
            pipe = cls.from_pretrained(cfg.repo_id, **{dtype_kw: dtype}, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load model {cfg.name!r} from {cfg.repo_id!r}: {type(e).__name__}: "
                                 f"{str(e)[:300]}\n{load_hint(cfg)}") from e
        pipe.to(device)
        if cfg.get("flow_shift") is not None:
            _set_flow_shift(pipe, float(cfg.flow_shift))
    else:
        raise ValueError(f"unknown model.loader {cfg.loader!r}; use diffusers, random, tiny_wan or callable")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe, device, dtype
