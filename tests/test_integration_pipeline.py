"""A full tiny WanPipeline call with SVG2 enabled: tiny VAE, tiny UMT5 and tokenizer built locally."""

from __future__ import annotations

import pytest
import torch

from svg2 import enable_svg2
from svg2.harness.models import tiny_wan_pipeline
from tests.tiny_diffusers import TINY_CFG

CALL = dict(prompt="a red ball moves left", negative_prompt="a blue cube", height=64, width=64, num_frames=5,
            num_inference_steps=4, guidance_scale=5.0, output_type="pt", max_sequence_length=16)


@pytest.mark.parametrize("two_experts", [False, True], ids=["wan2.1", "wan2.2_a14b"])
def test_wan_pipeline_end_to_end(two_experts):
    pipe = tiny_wan_pipeline(two_experts=two_experts)
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = pipe(**CALL, generator=g()).frames
    h = enable_svg2(pipe, TINY_CFG.replace(dense_steps_frac=0.25, dense_layers=1))
    with torch.no_grad():
        out = pipe(**CALL, generator=g()).frames
    assert out.shape == ref.shape == (1, 5, 3, 64, 64) and torch.isfinite(out).all()
    rows = h.records()
    s = h.stats()
    assert s["num_steps"] == 4 and s["num_calls"] == 4 * 2 * 2  # steps x CFG branches x blocks
    assert {(r["step"], r["branch"]) for r in rows} == {(i, b) for i in range(4) for b in ("cond", "uncond")}
    for r in rows:
        assert r["dense"] == (r["step"] == 0 or r["layer"] == 0), r
    assert 0 < s["mean_sparse_density"] < 1
    if two_experts:  # boundary 0.6 of 1000 train steps: high-noise expert first, then the low-noise one
        experts = {r["expert"] for r in rows}
        assert experts == {"transformer", "transformer_2"}
        first = max(r["step"] for r in rows if r["expert"] == "transformer")
        assert all(r["step"] > first for r in rows if r["expert"] == "transformer_2")
        # each expert has its own centroid state
        assert h.targets[1].state.cluster_state(1, "cond").calls > 0

    # A second call starts from fresh state (reset through the scheduler's set_timesteps).
    with torch.no_grad():
        out2 = pipe(**CALL, generator=g()).frames
    assert h.stats()["num_calls"] == 16
    torch.testing.assert_close(out2, out)  # same seed, same cold start: same video

    h.remove()
    assert "set_timesteps" not in vars(pipe.scheduler)
    with torch.no_grad():
        assert torch.equal(pipe(**CALL, generator=g()).frames, ref)
