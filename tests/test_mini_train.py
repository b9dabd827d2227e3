"""svg2.mini.train: a tiny CPU run trains, resumes, exports shards and assembles a loadable folder."""

from __future__ import annotations

import json

import torch

from svg2.mini.pipeline import load_mini_pipeline
from svg2.mini.train import TrainConfig, assemble, train


def test_tiny_training_resume_and_assemble(tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "ck.pt"
    common = dict(tiny=True, device="cpu", out=str(out), ckpt=str(ckpt), tokens_per_step=512, samples=0,
                  eval_prompts=0)
    train(TrainConfig(**common, steps=2))
    result = train(TrainConfig(**common, steps=3, resume=True))
    assert result["meta"]["step"] == 3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert list(out.glob("mini_ema-*.safetensors")) and (out / "loss.png").is_file()
    assemble(out, tmp_path / "w")
    pipe = load_mini_pipeline("quick", path=tmp_path / "w")
    frames = pipe("a red circle moves left over a flat blue background", num_frames=2, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 2, 64, 64, 3)

