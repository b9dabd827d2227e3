"""svg2.mini pipeline: Wan-like call sequence, output shapes, loading errors, shipped weights."""

from __future__ import annotations

import pytest
import torch

from svg2.mini.model import build_transformer
from svg2.mini.pipeline import MiniPipeline, default_weights_path, load_mini_pipeline
from svg2.mini.text import CaptionTokenizer, MiniTextEncoder

PROMPT = "a red circle moves left over a flat blue background"


def _tiny_pipe() -> MiniPipeline:
    tok = CaptionTokenizer()
    tr = build_transformer(num_layers=2, num_attention_heads=2, ffn_dim=128, text_dim=32)
    te = MiniTextEncoder(len(tok), dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    return MiniPipeline(tr.eval(), te.eval(), tok)


def test_call_shape_and_cfg_call_order():
    pipe = _tiny_pipe()
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(float(kwargs["encoder_hidden_states"].abs().sum())),
        with_kwargs=True)
    set_calls = []
    orig = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda *a, **k: (set_calls.append(a), orig(*a, **k))[1]
    out = pipe(PROMPT, num_frames=3, height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 3, 64, 64, 3)
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    assert len(set_calls) == 1 and len(calls) == 6
    cond, uncond = calls[0::2], calls[1::2]
    assert all(c == cond[0] for c in cond) and all(u == uncond[0] for u in uncond) and cond[0] != uncond[0]
    # no CFG: one call per step
    calls.clear()
    pt = pipe([PROMPT, PROMPT], num_frames=2, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
              output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert len(calls) == 2 and isinstance(pt, torch.Tensor) and pt.shape == (2, 2, 64, 64, 3)


def test_seeded_and_validated():
    pipe = _tiny_pipe()
    kw = dict(num_frames=2, height=64, width=64, num_inference_steps=2)
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames
    b = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames
    assert (a == b).all()
    with pytest.raises(ValueError, match="vocabulary"):
        pipe("a magenta blob", **kw)
    with pytest.raises(ValueError, match="divisible"):
        pipe(PROMPT, num_frames=2, height=60, width=64)


def test_list_of_generators_gives_each_item_its_own_noise():
    """A batched call with one generator per prompt starts item i from the single call's noise (diffusers'
    ``generator=[...]`` convention) and ends within float tolerance of it; negative prompts may be a list."""
    pipe = _tiny_pipe()
    first_inputs = []
    pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: first_inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    kw = dict(num_frames=2, height=64, width=64, num_inference_steps=2, guidance_scale=4.0)
    prompts = [PROMPT, "a green square moves right over a flat red background"]
    negatives = ["", "a red circle"]
    batch = pipe(prompts, negative_prompt=negatives, generator=[torch.Generator().manual_seed(s) for s in (3, 7)],
                 **kw).frames
    batch_start = first_inputs[0]
    assert batch.shape[0] == 2 and batch_start.shape[0] == 2
    for i, (prompt, neg, seed) in enumerate(zip(prompts, negatives, (3, 7))):
        first_inputs.clear()
        single = pipe(prompt, negative_prompt=neg, generator=torch.Generator().manual_seed(seed), **kw).frames
        assert torch.equal(first_inputs[0][0], batch_start[i])  # bit-identical initial noise
        assert abs(single[0] - batch[i]).max() < 1e-4
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(prompts, generator=[torch.Generator().manual_seed(0)], **kw)


def test_save_load_roundtrip_and_missing_weights(tmp_path):
    pipe = _tiny_pipe()
    pipe.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = load_mini_pipeline("long", path=tmp_path)
    kw = dict(num_frames=2, height=64, width=64, num_inference_steps=2)
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames
    b = loaded(PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames
    assert abs(a - b).max() < 1e-5
    assert loaded.defaults["height"] == 128
    with pytest.raises(FileNotFoundError, match="train_mini"):
        load_mini_pipeline(path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="variant"):
        load_mini_pipeline("medium", path=tmp_path)


@pytest.mark.skipif(not (default_weights_path() / "transformer").is_dir(), reason="weights not shipped")
def test_shipped_weights_size_and_load():
    files = [p for p in default_weights_path().rglob("*.safetensors")]
    assert sum(p.stat().st_size for p in files) <= 30 * 10**6
    pipe = load_mini_pipeline("quick")
    assert pipe.transformer.config.attention_head_dim == 64 and pipe.transformer.config.patch_size == (1, 2, 2)
    assert pipe.tokens() <= 2048 and load_mini_pipeline("long").tokens() >= 8192
