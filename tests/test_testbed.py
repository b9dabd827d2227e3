"""The testbed model: data contract, weights format, shipped weights, training stretch, structure probe."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from svg2.attention_structure import head_stats
from svg2.mini.checker import FG_THRESHOLD
from svg2.mini.data import DIRECTIONS, OBJECT_COLORS, SHAPES, held_out_triples
from svg2.testbed import data
from svg2.testbed.model import (
    TESTBED_POINTS,
    caption_tokenizer,
    default_testbed_path,
    dequantize_state,
    load_testbed_pipeline,
    load_testbed_state,
    quantize_state,
    save_testbed,
)


def _scenes(n=6, seed=0, **kw):
    return data.sample_scenes(n, torch.Generator().manual_seed(seed), **kw)


def test_scenes_are_deterministic_and_captions_tokenize():
    a, b = _scenes(seed=3), _scenes(seed=3)
    assert data.captions(a) == data.captions(b)
    assert torch.equal(data.render(a, 4, 32, 32), data.render(b, 4, 32, 32))
    tok = caption_tokenizer()
    for c in data.captions(_scenes(64, seed=1)):
        assert tok.unknown_words(c) == []
        assert len(c.split()) <= tok.max_len, c


def test_render_contract_world_dark_objects_bright():
    """The checker's contract: dark world and occluders, bright objects whose own colour stays nearest."""
    scene = _scenes(1, seed=5)
    scene.active[:] = False
    scene.active[0, 0] = True
    scene.radius[0, 0] = 0.16
    scene.x0[0, 0], scene.y0[0, 0], scene.vx[0, 0], scene.vy[0, 0] = 0.5, 0.5, 0.0, 0.0
    scene.occ_active[:] = False
    v = data.render(scene, 3, 64, 64)  # (1, 3, F, H, W)
    assert v.min() >= 0 and v.max() <= 1
    mx = v.amax(1)[0]  # (F, H, W)
    centre = v[0, :, :, 28:36, 28:36]
    assert (centre.amax(0) >= 0.9).all(), "object interior must be bright"
    border = torch.cat([mx[:, :4].flatten(), mx[:, -4:].flatten()])
    assert (border <= data.BG_MAX_CHANNEL + 1e-6).all(), "world must stay dark"
    # the median interior colour is nearest to the object's palette colour
    palette = torch.tensor(list(OBJECT_COLORS.values()))
    med = centre.flatten(1).median(dim=1).values
    assert int(((palette - med) ** 2).sum(-1).argmin()) == int(scene.color[0, 0])
    assert FG_THRESHOLD > data.BG_MAX_CHANNEL


def test_world_detail_variant_adds_token_scale_texture_and_keeps_the_contract():
    """The data variant (train_testbed.py --world-detail): world brightness varies from one video token (8x8
    pixels at the eval point's 128 x 128) to the next, object interiors are untouched, the world stays dark,
    and 0 renders the original data exactly."""
    scene = _scenes(2, seed=9)
    scene.occ_active[:] = False
    base = data.render(scene, 2, 128, 128)
    assert torch.equal(data.render(scene, 2, 128, 128, world_detail=0.0), base)
    var = data.render(scene, 2, 128, 128, world_detail=0.8)
    assert var.min() >= 0 and var.max() <= 1
    # object interiors (bright, away from anti-aliased edges) are painted over the world: unchanged
    bright = (base.amax(1) >= 0.9).float().flatten(0, 1)[:, None]
    inner = (-torch.nn.functional.max_pool2d(-bright, 5, stride=1, padding=2) > 0.5).reshape(base.amax(1).shape)
    assert inner.any() and torch.equal(var.amax(1)[inner], base.amax(1)[inner])

    world = _scenes(2, seed=9)
    world.active[:] = False
    world.occ_active[:] = False

    def token_contrast(v: torch.Tensor) -> float:  # std of per-token means around their 3x3-token smooth
        tok = torch.nn.functional.avg_pool2d(v.mean(1).flatten(0, 1)[:, None], 8)
        smooth = torch.nn.functional.avg_pool2d(tok, 3, stride=1, padding=1, count_include_pad=False)
        return float((tok - smooth).std())

    plain, detailed = data.render(world, 2, 128, 128), data.render(world, 2, 128, 128, world_detail=0.8)
    assert detailed.max() <= data.BG_MAX_CHANNEL + 1e-6
    assert token_contrast(detailed) > 2 * token_contrast(plain)
    with pytest.raises(ValueError, match="world_detail"):
        data.render(scene, 2, 32, 32, world_detail=1.5)


def test_training_scenes_avoid_held_out_triples():
    scene = _scenes(512, seed=2)
    held = held_out_triples()
    for b in range(scene.batch_size):
        for k in range(data.MAX_OBJECTS):
            m = int(scene.motion[b, k])
            if scene.active[b, k] and m < len(DIRECTIONS):
                assert (int(scene.color[b, k]), int(scene.shape[b, k]), m) not in held


def test_objects_wrap_around_and_bounce_inside():
    scene = _scenes(64, seed=4)
    tr = data.object_tracks(scene, 64)
    lo, hi = -0.2 - 1e-5, 1.2 + 1e-5
    assert tr["cx"].min() >= lo and tr["cx"].max() <= hi and tr["cy"].min() >= lo and tr["cy"].max() <= hi
    bounce = scene.motion == 4
    r = scene.radius[..., None]
    inside = (tr["cx"] >= r - 1e-5) & (tr["cx"] <= 1 - r + 1e-5)
    assert inside[bounce].all()


def test_scenes_from_spec_sets_content():
    spec = [{"objects": [{"color": "red", "shape": "circle", "motion": "moves left", "size": "small"}],
             "bg_color": "blue", "pan": "up"}]
    scene = data.scenes_from_spec(spec, torch.Generator().manual_seed(0))
    cap = data.captions(scene)[0]
    assert cap.startswith("a small red circle moves left over a blue world while the camera pans up"), cap
    assert float(scene.vx[0, 0]) < 0 and float(scene.vy[0, 0]) == 0
    with pytest.raises(ValueError, match="1..6 objects"):
        data.scenes_from_spec([{"objects": [], "bg_color": "blue"}], torch.Generator())


def test_quantize_round_trip_error_is_small():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(256, 128, generator=g), "b": torch.randn(256, generator=g)}
    q = quantize_state(state)
    assert q["w"].dtype == torch.int8 and q["b"].dtype == torch.bfloat16
    back = dequantize_state(q)
    rel = (back["w"] - state["w"]).norm() / state["w"].norm()
    assert rel < 0.01
    del q["w.__scale__"]
    with pytest.raises(ValueError, match="damaged"):
        dequantize_state(q)


def test_shipped_weights_load_and_generate_a_tiny_clip():
    pipe = load_testbed_pipeline("quick")
    assert pipe.defaults == TESTBED_POINTS["quick"]
    out = pipe("a red circle moves left over a blue world", num_frames=2, height=32, width=32,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 2, 32, 32, 3) and float(out.min()) >= 0 and float(out.max()) <= 1
    meta = json.loads((default_testbed_path() / "training_meta.json").read_text())
    assert meta["steps"] > 0
    with pytest.raises(ValueError, match="caption vocabulary"):
        pipe("a red dragon", num_frames=2, height=32, width=32, num_inference_steps=1)


def test_missing_weights_error_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_testbed.py"):
        load_testbed_state(tmp_path)


def test_save_and_load_sharded(tmp_path, monkeypatch):
    import svg2.testbed.model as model

    monkeypatch.setattr(model, "SHARD_BYTES", 40_000)
    from svg2.mini.text import MiniTextEncoder

    cfg = dict(model.TESTBED_TRANSFORMER_CONFIG, num_layers=1, num_attention_heads=2, ffn_dim=64, text_dim=32)
    tf = model.build_testbed(**cfg)
    tok = caption_tokenizer(8)
    te_cfg = {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "max_len": 8}
    te = MiniTextEncoder(len(tok), **te_cfg)
    save_testbed(tf, te, tok, tmp_path, cfg, te_cfg, {"steps": 1})
    files = sorted((tmp_path / "transformer").glob("*.safetensors"))
    assert len(files) > 1 and "-of-" in files[0].name
    state, _, _, te_cfg_back = load_testbed_state(tmp_path)
    ref = tf.state_dict()
    for k, v in state.items():
        assert torch.allclose(v, ref[k].float(), rtol=0.02, atol=0.02 * float(ref[k].abs().max()) + 1e-3), k
    files[0].unlink()
    with pytest.raises(FileNotFoundError, match="shards present"):
        load_testbed_state(tmp_path)


def test_training_stretch_resumes_and_accumulates(tmp_path):
    from svg2.testbed.train import LOG_NAME, TrainConfig, read_log, train

    ck = tmp_path / "ck.pt"
    s1 = train(TrainConfig(out=str(tmp_path / "a"), ckpt=str(ck), device="cpu", tiny=True, max_steps=2,
                           tokens_per_step=256, time_budget=60))
    assert s1["end_step"] == 2 and ck.is_file()
    s2 = train(TrainConfig(out=str(tmp_path / "b"), ckpt=str(ck), device="cpu", tiny=True, max_steps=3,
                           tokens_per_step=256, time_budget=60))
    assert s2["start_step"] == 2 and s2["end_step"] == 3
    # a new stretch without the checkpoint continues from the exported weights and their log
    s3 = train(TrainConfig(out=str(tmp_path / "c"), init_from=str(tmp_path / "b" / "weights"), device="cpu",
                           tiny=True, max_steps=4, tokens_per_step=256, time_budget=60))
    assert s3["start_step"] == 3 and s3["end_step"] == 4
    log = read_log(tmp_path / "c" / "weights" / LOG_NAME)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in log)


def test_head_stats_separates_local_and_content_heads():
    f, r, c, d = 4, 4, 4, 16
    s = f * r * c
    pos = torch.arange(s)
    # head 0: each token attends only to itself (local); head 1: token i attends to token (i + s/2) mod s,
    # two frames away (content far away); logits sharp enough that all mass sits on one key
    eye = torch.eye(s)
    k = torch.randn(1, 2, s, d)
    q = torch.zeros(1, 2, s, d)
    q[0, 0] = 60 * k[0, 0] / k[0, 0].norm(dim=-1, keepdim=True) ** 2 * math.sqrt(d)
    partner = (pos + s // 2) % s
    q[0, 1] = 60 * k[0, 1, partner] / k[0, 1, partner].norm(dim=-1, keepdim=True) ** 2 * math.sqrt(d)
    del eye
    st = head_stats(q, k, (f, r, c), top_frac=0.1, num_rows=32)
    assert st.top_mass.min() > 0.9
    assert st.outside_local[0] < 0.1 and st.outside_local[1] > 0.9
    with pytest.raises(ValueError, match="grid"):
        head_stats(q, k, (3, 4, 4))


def test_shapes_and_directions_are_the_minis():
    """Held-out triples index the mini palette, shapes and directions: the testbed must use the same lists."""
    assert data.MOTIONS[: len(DIRECTIONS)] == tuple(f"moves {d}" for d in DIRECTIONS)
    assert set(SHAPES) <= set(data.caption_vocabulary())


def test_checker_reads_ground_truth_renders():
    """On rendered clips of its own captions the checker is (nearly) always right, wraps and occluders included."""
    from svg2.testbed import checker

    eps = checker.eval_prompts(1, held_out=True) + checker.eval_prompts(1, held_out=False)
    scene = data.scenes_from_spec([e.spec for e in eps], torch.Generator().manual_seed(1))
    assert data.captions(scene) == [e.prompt for e in eps]
    sc = checker.score(eps, data.render(scene, 16, 64, 64).permute(0, 2, 3, 4, 1))
    assert sc["n"] == 24 and sc["color_acc"] >= 0.9 and sc["direction_acc"] >= 0.9
    blank = checker.read_video(np.zeros((4, 16, 16, 3), dtype=np.float32))
    assert blank.color is None and blank.direction is None


def test_qk_norm_lr_multiplier_groups_and_schedule(tmp_path):
    from svg2.testbed.model import build_testbed
    from svg2.testbed.train import TrainConfig, is_self_attention_qk_norm, param_groups, train

    tf = build_testbed(num_layers=2, num_attention_heads=2, ffn_dim=128, text_dim=64)
    mods = {"transformer": tf}
    plain = param_groups(mods, TrainConfig(out="x"))
    assert len(plain) == 2  # the shipped training's layout (its checkpoints' optimizer state fits)
    groups = param_groups(mods, TrainConfig(out="x", qk_norm_lr_mult=10.0))
    qk = {id(p) for n, p in tf.named_parameters() if is_self_attention_qk_norm(f"transformer.{n}")}
    assert len(qk) == 4 and {id(p) for p in groups[2]["params"]} == qk  # 2 blocks x (norm_q, norm_k)
    assert groups[2]["lr_mult"] == 10.0 and groups[2]["weight_decay"] == 0.0
    assert not qk & {id(p) for g in groups[:2] for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(tf.parameters()))
    assert not is_self_attention_qk_norm("transformer.blocks.0.attn2.norm_q.weight")  # cross-attention: not it
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="qk_norm_lr_mult"):
            param_groups(mods, TrainConfig(out="x", qk_norm_lr_mult=bad))
    assert param_groups(mods, TrainConfig(out="x", qk_norm_lr_mult=0))[2]["lr_mult"] == 0  # frozen
    s = train(TrainConfig(out=str(tmp_path / "m"), device="cpu", tiny=True, max_steps=1, tokens_per_step=256,
                          time_budget=60, qk_norm_lr_mult=10.0, warmup=1))
    assert s["end_step"] == 1


def test_qk_norm_init_scale_multiplies_self_attention_logit_scale_only(tmp_path):
    from svg2.testbed.model import build_testbed
    from svg2.testbed.train import scale_self_attention_qk_norm

    tf = build_testbed(num_layers=2, num_attention_heads=2, ffn_dim=128, text_dim=64)
    before = {n: p.detach().clone() for n, p in tf.named_parameters()}
    assert scale_self_attention_qk_norm(tf, 1.0) == 0
    assert scale_self_attention_qk_norm(tf, 1.5) == 4  # 2 blocks x (norm_q, norm_k)
    for n, p in tf.named_parameters():
        want = before[n] * 1.5 if ".attn1.norm_q." in n or ".attn1.norm_k." in n else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="qk_norm_init_scale"):
            scale_self_attention_qk_norm(tf, bad)


def test_resume_with_other_qk_norm_groups_says_which_flag_to_pass(tmp_path):
    from svg2.testbed.train import TrainConfig, train

    base = dict(out=str(tmp_path / "m"), ckpt=str(tmp_path / "ck.pt"), device="cpu", tiny=True, tokens_per_step=256,
                time_budget=60, warmup=1)
    assert train(TrainConfig(**base, max_steps=1, qk_norm_lr_mult=0.0))["end_step"] == 1
    with pytest.raises(ValueError, match="pass the checkpoint's --qk-norm-lr-mult"):
        train(TrainConfig(**base, max_steps=2))
    assert train(TrainConfig(**base, max_steps=2, qk_norm_lr_mult=0.0))["end_step"] == 2
