"""Model families that ``enable_svg2`` supports: how to recognise each transformer and where its
self-attention sites are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from svg2.integrations.cogvideox import (
    SVG2CogVideoXAttnProcessor,
    cogvideox_self_attention_sites,
    cogvideox_video_shape,
)
from svg2.integrations.hunyuan import SVG2HunyuanVideoAttnProcessor, hunyuan_self_attention_sites, hunyuan_video_shape
from svg2.integrations.ltx import SVG2LTXVideoAttnProcessor, ltx_self_attention_sites, ltx_video_shape
from svg2.integrations.wan import SVG2WanAttnProcessor, wan_self_attention_sites, wan_video_shape

__all__ = ["ModelFamily", "FAMILIES", "detect_family", "supported_models", "unwrap_compiled"]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    class_names: tuple[str, ...]  # exact class names: subclasses may lay out their blocks differently
    pipelines: str  # what users run it through (for error messages and docs)
    sites: Callable[[torch.nn.Module], list[tuple[int, torch.nn.Module]]]
    processor_cls: type
    # (transformer, forward args, forward kwargs) -> (frames, height, width) in tokens, for geometric methods
    video_shape: Callable[[torch.nn.Module, tuple, dict], tuple[int, int, int] | None]


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("wan", ("WanTransformer3DModel",),
                "Wan 2.1 / 2.2 T2V, I2V, TI2V and the A14B two-expert pipelines (WanPipeline, "
                "WanImageToVideoPipeline)", wan_self_attention_sites, SVG2WanAttnProcessor, wan_video_shape),
    ModelFamily("hunyuan_video", ("HunyuanVideoTransformer3DModel",),
                "HunyuanVideo T2V / I2V (HunyuanVideoPipeline, HunyuanVideoImageToVideoPipeline)",
                hunyuan_self_attention_sites, SVG2HunyuanVideoAttnProcessor, hunyuan_video_shape),
    ModelFamily("ltx_video", ("LTXVideoTransformer3DModel",),
                "LTX-Video T2V / I2V (LTXPipeline, LTXImageToVideoPipeline)",
                ltx_self_attention_sites, SVG2LTXVideoAttnProcessor, ltx_video_shape),
    ModelFamily("cogvideox", ("CogVideoXTransformer3DModel",),
                "CogVideoX 1.0 / 1.5 T2V, I2V (CogVideoXPipeline, CogVideoXImageToVideoPipeline)",
                cogvideox_self_attention_sites, SVG2CogVideoXAttnProcessor, cogvideox_video_shape),
)


def supported_models() -> list[str]:
    return [f"{c} ({f.pipelines})" for f in FAMILIES for c in f.class_names]


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` wrapper (OptimizedModule), or the module itself."""
    return getattr(module, "_orig_mod", module)


def detect_family(transformer: torch.nn.Module) -> ModelFamily:
    name = type(unwrap_compiled(transformer)).__name__
    for family in FAMILIES:
        if name in family.class_names:
            return family
    raise TypeError(f"svg2 has no integration for {name}. Supported transformers: "
                    + "; ".join(supported_models()))
