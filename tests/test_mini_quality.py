"""CPU quality regression: SVG2 at its defaults on the shipped mini model (quick) stays close to dense.

Measured when the floor was set (CPU, float32, torch 2.14, mini weights of stage 2): PSNR 28.79 dB
(density 0.62); with k-means seed 1: 28.01 dB. For scale: a degraded SVG2 (target_density=0.05, density
0.20) scores 24.89 dB, top_p=0.5 scores 17.27 dB, and an unrelated dense video (another seed) 15.50 dB.
The floor leaves ~2.8 dB of margin for platform differences in k-means and BLAS rounding.
"""

from __future__ import annotations

import pytest
import torch

from svg2 import SVG2Config
from svg2.harness.metrics import mean_psnr
from svg2.mini.pipeline import default_weights_path, load_mini_pipeline

PSNR_FLOOR_DB = 26.0
PROMPT = "a red circle moves right over a flat blue background"

pytestmark = pytest.mark.skipif(not (default_weights_path() / "transformer").is_dir(),
                                reason="mini weights not shipped in this checkout")



def test_svg2_defaults_on_mini_quick_stay_above_psnr_floor():
    from svg2.integrations import enable_svg2

    pipe = load_mini_pipeline("quick")
    dense = pipe(PROMPT, generator=torch.Generator().manual_seed(0)).frames[0]
    handle = enable_svg2(pipe, SVG2Config())
    try:
        sparse = pipe(PROMPT, generator=torch.Generator().manual_seed(0)).frames[0]
        stats = handle.stats()
    finally:
        handle.remove()
    psnr = mean_psnr(sparse, dense)
    assert stats["mean_sparse_density"] < 1.0, "SVG2 never ran sparse: the hooks did not see the steps"
    assert psnr >= PSNR_FLOOR_DB, f"SVG2 vs dense PSNR {psnr:.2f} dB < floor {PSNR_FLOOR_DB} dB"
