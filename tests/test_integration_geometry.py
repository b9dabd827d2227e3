"""The integration hands the video geometry (frames, height, width in tokens) to methods that need it."""

from __future__ import annotations

import pytest
import torch

from svg2 import enable_svg2
from tests.tiny_diffusers import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("sliding_tile", dict(tile_size=(2, 4, 4), window=(1, 1, 1))),
        ("radial", dict(block_size=16)),
        ("svg1", dict(block_size=16, num_sampled_rows=8)),
    ],
)
def test_geometric_baselines_run_inside_wan(method, kwargs):
    model = tiny_wan()
    inputs = wan_inputs(frames=4, size=16)  # 4 x 8 x 8 tokens
    with enable_svg2(model, method=method, num_steps=1, dense_steps_frac=0.0, dense_layers=0, **kwargs) as h:
        with torch.no_grad():
            out = model(**inputs)[0]
        recs = h.records()
    assert torch.isfinite(out).all()
    assert recs and all(r["density"] <= 1.0 for r in recs)
    assert h.tracker.video_shape == (4, 8, 8)


def test_video_shape_hunyuan():
    model = tiny_hunyuan()
    with enable_svg2(model, method="dense", num_steps=1) as h:
        with torch.no_grad():
            model(**hunyuan_inputs(frames=3, size=16))
        assert h.tracker.video_shape == (3, 8, 8)
