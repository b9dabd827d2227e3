"""Random-weight, real-size video transformers for the end-to-end benchmark (``experiments/bench_e2e.py``).

One registry, :data:`TRANSFORMERS`, over the model families the benchmark times: the Wan 2.1 entries of
:data:`svg2.benchmark.WAN_TRANSFORMERS` (shared with the harness's random loader) and HunyuanVideo T2V. Each entry
says how to build the transformer (diffusers class and config), one forward's inputs (latent shape, text length),
the authors' SVG2 setting (clusters, dense warm-up fraction) and how many transformer calls a denoising step makes
(2 with classifier-free guidance, 1 for guidance-distilled HunyuanVideo). Speed does not depend on the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from svg2.benchmark import _WAN_COMMON, WAN_TRANSFORMERS

__all__ = ["TRANSFORMERS", "HUNYUAN_720P_CONFIG", "random_transformer", "transformer_inputs", "video_tokens",
           "attention_layers", "attention_shape"]

# HunyuanVideo T2V transformer as published (hunyuanvideo-community/HunyuanVideo, transformer/config.json; the same
# values are diffusers' defaults): hidden 3072 = 24 heads x 128, 20 dual-stream + 40 single-stream blocks, 13B.
HUNYUAN_720P_CONFIG: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)

_TINY_HUNYUAN_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
    rope_axes_dim=(4, 6, 6), guidance_embeds=True,
)


def _wan(name: str, **extra: Any) -> dict[str, Any]:
    spec = WAN_TRANSFORMERS[name]
    return {**spec, "family": "wan", "config": {**_WAN_COMMON, **spec["config"]}, "calls_per_step": 2,
            "scenarios": [(0.25, 0.2), (0.12, 0.1), (0.25, 0.1), (0.12, 0.2)], **extra}


TRANSFORMERS: dict[str, dict[str, Any]] = {
    "wan1.3b": _wan("wan1.3b"),
    "wan14b": _wan("wan14b", large=True),
    # HunyuanVideo T2V 1280x720, 129 frames -> latent 33 x 90 x 160 -> 33 x 45 x 80 = 118800 video tokens, plus
    # 256 text tokens (the pipeline's max_sequence_length; 128 of them real here, the rest padding masked as the
    # pipeline masks it). The authors' setting (conf/model/hunyuanvideo-t2v-720p.yaml): (400, 1000) clusters, the
    # first 10% of the steps dense; guidance-distilled, so one transformer call per step.
    "hunyuan720p": dict(family="hunyuan_video", label="HunyuanVideo 720p 129f", latent=(33, 90, 160), text_len=256,
                        text_real=128, clusters=(400, 1000), config=HUNYUAN_720P_CONFIG, calls_per_step=1,
                        scenarios=[(0.25, 0.1), (0.12, 0.1)], large=True),
    # CPU smoke tests of the benchmark
    "tiny": _wan("tiny"),
    "tiny_hunyuan": dict(family="hunyuan_video", label="tiny HunyuanVideo (CPU smoke)", latent=(3, 8, 8), text_len=16,
                         text_real=12, clusters=(8, 16), config=_TINY_HUNYUAN_CONFIG, calls_per_step=1,
                         scenarios=[(0.25, 0.1), (0.12, 0.1)]),
}


def _model_class(spec: dict[str, Any]) -> type:
    import diffusers

    return {"wan": diffusers.WanTransformer3DModel,
            "hunyuan_video": diffusers.HunyuanVideoTransformer3DModel}[spec["family"]]


def random_transformer(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of ``spec`` with random weights, built on ``device`` in ``dtype``; the modules diffusers keeps
    in float32 when loading (``_keep_in_fp32_modules``) are float32, as in a loaded checkpoint."""
    cls = _model_class(spec)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**spec["config"])
    finally:
        torch.set_default_dtype(prev)
    keep = set(model._keep_in_fp32_modules or [])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if keep & set(name.split(".")):
            t.data = t.data.float()
    return model.eval().requires_grad_(False)


def _patch(spec: dict[str, Any]) -> tuple[int, int, int]:
    c = spec["config"]
    if spec["family"] == "wan":
        return tuple(int(x) for x in c["patch_size"])  # type: ignore[return-value]
    return int(c.get("patch_size_t", 1)), int(c["patch_size"]), int(c["patch_size"])


def video_tokens(spec: dict[str, Any]) -> int:
    (f, h, w), (pt, ph, pw) = spec["latent"], _patch(spec)
    return (f // pt) * (h // ph) * (w // pw)


def attention_layers(spec: dict[str, Any]) -> int:
    """Self-attention calls per forward (every one goes through SVG2; layer indices 0..n-1)."""
    c = spec["config"]
    return int(c["num_layers"]) + int(c.get("num_single_layers", 0) if spec["family"] == "hunyuan_video" else 0)


def attention_shape(spec: dict[str, Any]) -> tuple[int, int, int, int | None]:
    """(heads, seqlen, head dim, real text tokens or None) of one self-attention call: Wan attends over the video
    tokens; HunyuanVideo over [video, text] with padded text keys masked."""
    c = spec["config"]
    s = video_tokens(spec)
    if spec["family"] == "hunyuan_video":
        return int(c["num_attention_heads"]), s + int(spec["text_len"]), int(c["attention_head_dim"]), \
            int(spec["text_real"])
    return int(c["num_attention_heads"]), s, int(c["attention_head_dim"]), None


def transformer_inputs(spec: dict[str, Any], device: torch.device, dtype: torch.dtype,
                       seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one forward of ``spec``: batch 1 (one CFG branch), timestep 500."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = spec["config"]
    f, h, w = spec["latent"]
    latents = torch.randn(1, int(c["in_channels"]), f, h, w, generator=g, device=device).to(dtype)
    common = dict(hidden_states=latents, timestep=torch.tensor([500.0], device=device), return_dict=False)
    if spec["family"] == "wan":
        text = torch.randn(1, spec["text_len"], c["text_dim"], generator=g, device=device).to(dtype)
        return {**common, "encoder_hidden_states": text}
    n = int(spec["text_len"])
    mask = (torch.arange(n, device=device) < int(spec["text_real"])).to(torch.int64)[None]
    return {
        **common,
        "encoder_hidden_states": torch.randn(1, n, c["text_embed_dim"], generator=g, device=device).to(dtype),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, c["pooled_projection_dim"], generator=g, device=device).to(dtype),
        "guidance": torch.tensor([6000.0], device=device),  # guidance_scale 6.0 x 1000, as the pipeline passes it
    }
