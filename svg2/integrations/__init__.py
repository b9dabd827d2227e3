"""diffusers integration: ``enable_svg2(pipe_or_transformer, cfg, method="svg2") -> SVG2Handle``.

Our attention processors go on self-attention only (Wan ``attn1``; HunyuanVideo's joint video+text
attention); cross-attention keeps the stock processors. See ``enable.py`` and ``handle.py``.
"""

from svg2.integrations.enable import enable_svg2
from svg2.integrations.handle import StepTracker, SVG2Handle
from svg2.integrations.registry import FAMILIES, detect_family, supported_models

__all__ = ["enable_svg2", "SVG2Handle", "StepTracker", "FAMILIES", "detect_family", "supported_models"]
