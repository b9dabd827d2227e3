"""The one place that imports Triton (optional: CPU-only installs run the torch variants).

Kernel modules do ``from svg2_kernels._triton import HAS_TRITON, triton, tl`` and define their
``@triton.jit`` functions under ``if HAS_TRITON:``; variants refuse with :data:`TRITON_MISSING` otherwise.
"""

from __future__ import annotations

import os

__all__ = ["HAS_TRITON", "HAS_TMA", "TRITON_MISSING", "TensorDescriptor", "interpreting", "tl", "triton"]

TRITON_MISSING = "Triton is not installed (pip install triton; it ships with torch's CUDA wheels on Linux)"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on installs without Triton
    triton = None
    tl = None
    HAS_TRITON = False

try:  # tensor descriptors (TMA on sm_90+): Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TMA = True
except ImportError:  # pragma: no cover - Triton < 3.4 or none
    TensorDescriptor = None
    HAS_TMA = False


def interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
