"""Random-number isolation: nothing a method does (k-means cold starts, sampled rows, ...) draws from the
generation's random stream.

A method that draws from the global torch RNG shifts every later draw of the pipeline; with a stochastic
sampler (noise drawn at every step from the global stream) that alone costs several dB against the dense
reference. Tested on the tiny random Wan pipeline (``model=tiny``) with FlowMatch Euler stochastic sampling,
which draws its per-step noise from the global stream: dense with SVG2's clustering and sparse attention run
on every call and their result discarded must equal dense bit for bit; a method drawing one global random
number must not (the test can see the defect). Every registered method leaves the global torch, numpy and
Python random states untouched.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from svg2 import SVG2Config
from svg2.harness.models import tiny_wan_pipeline
from svg2.harness.runner import method_spec
from svg2.harness.schema import register_configs
from svg2.integrations import enable_svg2
from svg2.methods import AttentionContext, AttentionMethod
from svg2.methods.dense import DenseMethod
from svg2.methods.svg2 import SVG2Method

ROOT = Path(__file__).resolve().parents[1]
register_configs()

SIZE = dict(height=32, width=32, num_frames=5, num_inference_steps=3)  # 32 video tokens, 3 steps
# Every call sparse, cold k-means starts at the first step (the draws a careless seeding would take).
ALWAYS_SPARSE = SVG2Config(num_q_centroids=4, num_k_centroids=8, kmeans_iters_init=5, kmeans_iters_step=2,
                           dense_steps_frac=0.0, dense_layers=0, seed_centroids_in_warmup=False)


class DiscardedSVG2(AttentionMethod):
    """Dense attention, after SVG2 (clustering, selection, sparse attention) ran on the same q, k, v and its
    result was thrown away."""

    name = "discarded_svg2"

    def __init__(self, draw_global: bool = False) -> None:
        self.svg2, self.dense, self.draw_global = SVG2Method(ALWAYS_SPARSE), DenseMethod(), draw_global

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        self.svg2(q, k, v, ctx)  # discarded
        if self.draw_global:
            torch.rand(1)  # the defect this file guards against: one draw from the generation's stream
        return self.dense(q, k, v, ctx)


def _stochastic_tiny():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_wan_pipeline(init_seed=0)
    # Noise at every step from the global torch RNG (the pipeline passes no generator to scheduler.step).
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    return pipe


def _generate(pipe, method: AttentionMethod | None) -> np.ndarray:
    handle = enable_svg2(pipe, method=method) if method is not None else None
    try:
        torch.manual_seed(1234)  # the global stream the sampler draws from
        out = pipe(prompt="a red ball rolls", generator=torch.Generator().manual_seed(0), output_type="np",
                   guidance_scale=1.0, max_sequence_length=16, **SIZE)
    finally:
        if handle is not None:
            handle.remove()
    return np.asarray(out.frames[0])


def test_discarded_svg2_equals_dense_bit_for_bit():
    pipe = _stochastic_tiny()
    dense = _generate(pipe, DenseMethod())
    assert np.array_equal(dense, _generate(pipe, DenseMethod()))  # deterministic under the global seed
    with_svg2 = _generate(pipe, DiscardedSVG2())
    assert np.array_equal(dense, with_svg2), f"max |diff| {np.abs(dense - with_svg2).max():.3g}"
    # The check is sensitive: one global draw per attention call changes the video.
    drawn = _generate(pipe, DiscardedSVG2(draw_global=True))
    assert np.abs(dense - drawn).max() > 1e-3


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


# Block and tile sizes that fit the tiny video (5 latent frames -> 2 x 16 x 16 / (1, 2, 2) patches = 2 x 8 x 8).
TINY_METHODS = {
    "svg2": [],
    "svg1": ["method.cfg.block_size=16", "method.cfg.num_sampled_rows=8"],
    "positional": ["method.cfg.block_size=16"],
    "radial": ["method.cfg.block_size=16"],
    "sliding_tile": ["method.cfg.tile_size=[1,4,4]", "method.cfg.window=[1,1,1]"],
    "oracle": ["method.cfg.block_size=16"],
    "svg_ear": [],
    "sol_attn": ["method.cfg.block_size=16"],
}


def _global_states(cuda: bool = False) -> tuple:
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return (*states, torch.cuda.get_rng_state()) if cuda else states


def _states_around_a_generation(name: str, device: str = "cpu") -> tuple[tuple, tuple]:
    cfg = _compose(["model=tiny", f"method={name}", "method.cfg.dense_steps_frac=0.0", "method.cfg.dense_layers=0",
                    *TINY_METHODS[name]])
    method = method_spec(cfg).build()
    pipe = tiny_wan_pipeline(init_seed=0).to(device)  # UniPC: the pipeline itself draws nothing from the stream
    handle = enable_svg2(pipe, method=method)
    try:
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        before = _global_states(cuda=device == "cuda")
        pipe(prompt="a red ball rolls", generator=torch.Generator().manual_seed(0), output_type="np",
             guidance_scale=1.0, max_sequence_length=16, **SIZE)
        after = _global_states(cuda=device == "cuda")
        st = handle.stats()
        assert st["num_calls"] > 0 and st["num_dense_calls"] == 0  # every call took the method's own path
    finally:
        handle.remove()
    return before, after


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_methods_leave_the_global_random_state_alone(name):
    before, after = _states_around_a_generation(name)
    assert torch.equal(before[0], after[0]), f"{name} drew from the global torch RNG"
    assert np.array_equal(before[1], after[1]), f"{name} drew from numpy's global RNG"
    assert before[2] == after[2], f"{name} drew from Python's random module"


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_methods_leave_the_cuda_random_state_alone(name):
    """On a GPU the pipeline's noise may come from the CUDA generator: no method (Triton kernels, k-means on
    the device) may advance it."""
    before, after = _states_around_a_generation(name, device="cuda")
    assert torch.equal(before[0], after[0]), f"{name} drew from the global torch RNG"
    assert torch.equal(before[3], after[3]), f"{name} drew from the CUDA RNG"
