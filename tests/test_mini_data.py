"""svg2.mini: procedural data, captions, pixel packing, text encoder, checker on ground truth."""

from __future__ import annotations

import torch

from svg2.mini import checker
from svg2.mini.data import (
    BG_MAX_CHANNEL,
    caption_vocabulary,
    captions,
    held_out_triples,
    render,
    sample_scenes,
    scenes_from_spec,
)
from svg2.mini.model import num_tokens, pack, unpack
from svg2.mini.text import CaptionTokenizer, MiniTextEncoder


def test_render_is_deterministic_and_in_range():
    a = render(sample_scenes(4, torch.Generator().manual_seed(3)), 6, 64, 64)
    b = render(sample_scenes(4, torch.Generator().manual_seed(3)), 6, 64, 64)
    assert a.shape == (4, 3, 6, 64, 64)
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_captions_use_the_vocabulary_and_skip_held_out_triples():
    scene = sample_scenes(256, torch.Generator().manual_seed(0))
    vocab = set(caption_vocabulary())
    for cap in captions(scene):
        assert set(cap.split()) <= vocab, cap
    held = held_out_triples()
    assert len(held) == 12
    for b in range(256):
        for k in range(3):
            if scene.active[b, k] and scene.motion[b, k] < 4:
                triple = (int(scene.color[b, k]), int(scene.shape[b, k]), int(scene.motion[b, k]))
                assert triple not in held


def test_background_stays_dark():
    spec = {"objects": [{"color": "white", "shape": "circle", "motion": "moves left", "size": "small"}],
            "bg_style": "striped", "bg_color": "gray", "pan": "up"}
    scene = scenes_from_spec([spec], torch.Generator().manual_seed(0))
    scene.active[:] = False  # background only
    v = render(scene, 4, 64, 64)
    assert float(v.max()) <= BG_MAX_CHANNEL + 1e-6


def test_pack_roundtrip_and_token_count():
    v = torch.rand(2, 3, 5, 64, 128)
    lat = pack(v)
    assert lat.shape == (2, 48, 5, 16, 32)
    assert float(lat.abs().max()) <= 1.0
    torch.testing.assert_close(unpack(lat), v)
    assert num_tokens(16, 64, 64) == 1024 and num_tokens(32, 128, 128) == 8192


def test_text_encoder_zeroes_padding_and_null_caption():
    tok = CaptionTokenizer()
    ids, mask = tok(["a red circle moves left over a flat blue background", ""])
    assert mask[0].sum() == 10 and mask[1].sum() == 1 and ids[1, 0] == tok.index["<null>"]
    enc = MiniTextEncoder(len(tok), dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    with torch.no_grad():
        out = enc(ids, mask)
    assert out.shape == (2, 32, 32)
    assert float(out[0, 10:].abs().max()) == 0.0
    assert tok.unknown_words("a magenta circle") == ["magenta"]


def test_checker_reads_ground_truth_renders():
    prompts = checker.eval_prompts(1, held_out=True) + checker.eval_prompts(1, held_out=False)
    scene = scenes_from_spec([p.spec for p in prompts], torch.Generator().manual_seed(0))
    assert captions(scene) == [p.prompt for p in prompts]
    videos = render(scene, 12, 64, 64).permute(0, 2, 3, 4, 1)
    result = checker.score(prompts, videos)
    assert result["color_acc"] == 1.0 and result["direction_acc"] == 1.0
    # a static frame sequence has no direction
    still = videos[:1, :1].expand(1, 12, 64, 64, 3)
    assert checker.read_video(still[0].numpy()).direction is None
