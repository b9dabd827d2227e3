"""The project's own small text-to-video model: quality evidence without downloads.

``load_mini_pipeline(variant="quick" | "long", device, dtype)`` loads the shipped weights (weights/mini/)
as a :class:`MiniPipeline` whose ``transformer`` is a diffusers ``WanTransformer3DModel``.
Modules: ``data`` (procedural clips and captions), ``text`` (tokenizer, text encoder), ``model``
(config, pixel-unshuffle latents, flow-matching loss), ``pipeline``, ``checker`` (caption adherence),
``structure`` (attention concentration).
"""

from svg2.mini.pipeline import OPERATING_POINTS, MiniPipeline, MiniPipelineOutput, load_mini_pipeline

__all__ = ["OPERATING_POINTS", "MiniPipeline", "MiniPipelineOutput", "load_mini_pipeline"]
