"""experiments/train_mini.py: a tiny CPU run trains, resumes, exports shards and assembles a loadable folder."""

from __future__ import annotations

import json

import torch

from experiments import train_mini
from svg2.mini.pipeline import load_mini_pipeline


def test_tiny_training_resume_and_assemble(tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "ck.pt"
    common = ["--tiny", "--device", "cpu", "--out", str(out), "--ckpt", str(ckpt), "--tokens-per-step", "512",
              "--samples", "0", "--eval-prompts", "0"]
    assert train_mini.main([*common, "--steps", "2"]) == 0
    assert train_mini.main([*common, "--steps", "3", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert list(out.glob("mini_ema-*.safetensors")) and (out / "loss.png").is_file()
    assert train_mini.main(["--out", str(out), "--assemble", str(tmp_path / "w")]) == 0
    pipe = load_mini_pipeline("quick", path=tmp_path / "w")
    frames = pipe("a red circle moves left over a flat blue background", num_frames=2, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 2, 64, 64, 3)
