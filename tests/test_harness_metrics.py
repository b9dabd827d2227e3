"""Metric functions: exact values on identical and noisy videos, clear errors, LPIPS skip with a reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svg2.harness.metrics import LpipsScorer, MetricSuite, as_video, psnr_per_frame, ssim_per_frame


def _video(f=3, h=32, w=40, seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=(f, h, w, 3)).astype(np.float32)


def test_identical_videos():
    v = _video()
    assert torch.isinf(psnr_per_frame(v, v)).all()
    assert torch.allclose(ssim_per_frame(v, v), torch.ones(3))
    assert torch.allclose(ssim_per_frame(v, v, "box"), torch.ones(3))
    suite = MetricSuite(lpips_nets=["alex"], lpips_random_backbone=True)
    scalars, per_frame = suite(v, v)
    assert scalars["psnr"] == math.inf and scalars["ssim"] == pytest.approx(1.0) and scalars["lpips_alex"] == 0.0
    assert len(per_frame["psnr_frames"]) == 3 and per_frame["lpips_frames"] == [0.0, 0.0, 0.0]
    assert suite.describe()["lpips_alex_status"] == "random_backbone"


def test_known_noise_gives_analytic_psnr():
    # A constant offset of 0.05 (no clipping: values in [0.2, 0.8]) -> MSE 0.0025 -> PSNR = 10 log10(1/MSE).
    v = _video()
    out = v + 0.05
    assert psnr_per_frame(v, out).numpy() == pytest.approx(np.full(3, 10 * math.log10(1 / 0.0025)), abs=1e-3)
    # Frame-wise different noise levels are averaged over frames.
    out = v.copy()
    out[0] += 0.01
    out[1] += 0.02
    out[2] += 0.04
    expected = [10 * math.log10(1 / d**2) for d in (0.01, 0.02, 0.04)]
    assert psnr_per_frame(v, out).numpy() == pytest.approx(expected, abs=1e-3)
    scalars, _ = MetricSuite(convention="svg", lpips_nets=[], ssim=False)(v, out)
    assert scalars["psnr"] == pytest.approx(np.mean(expected), abs=1e-3)  # the authors': mean of per-frame PSNRs
    scalars, _ = MetricSuite(convention="standard", lpips_nets=[], ssim=False)(v, out)
    pooled = 10 * math.log10(1 / np.mean([d**2 for d in (0.01, 0.02, 0.04)]))  # the error pooled over frames
    assert scalars["psnr"] == pytest.approx(pooled, abs=1e-3)


def test_ssim_windows_differ_and_drop_with_noise():
    v = _video(h=32, w=32)
    noisy = np.clip(v + np.random.default_rng(1).normal(0, 0.1, v.shape), 0, 1).astype(np.float32)
    g, b = ssim_per_frame(v, noisy, "gaussian"), ssim_per_frame(v, noisy, "box")
    assert (g < 0.99).all() and (b < 0.99).all() and not torch.allclose(g, b)


def test_uint8_is_accepted():
    v = _video()
    u8 = (v * 255).round().astype(np.uint8)
    assert as_video(u8).max() <= 1.0


@pytest.mark.parametrize("bad,match", [
    (np.full((2, 16, 16, 3), 255.0, np.float32), "divide by 255"),
    (np.full((2, 16, 16, 3), -1.0, np.float32), r"\[-1, 1\]"),
    (np.full((2, 16, 16, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 3, 16, 16), np.float32), "channels last"),
    (np.zeros((16, 16, 3), np.float32), "frames, height, width, 3"),
])
def test_range_and_shape_errors_are_clear(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        psnr_per_frame(bad, bad)


def test_shape_mismatch_and_small_frames():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_per_frame(_video(f=3), _video(f=4))
    small = _video(h=8, w=8)
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_frame(small, small)
    small = _video(h=16, w=16)
    with pytest.raises(ValueError, match="32x32"):
        LpipsScorer("alex", random_backbone=True).per_frame(small, small)
    with pytest.raises(ValueError, match="window"):
        ssim_per_frame(_video(), _video(), "hann")


def test_lpips_without_weights_is_skipped_with_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    s = LpipsScorer("vgg", allow_download=False)
    assert not s.available and s.status == "skipped"
    assert "vgg16" in s.skip_reason and "lpips_allow_download" in s.skip_reason
    suite = MetricSuite(lpips_nets=["alex"])
    scalars, _ = suite(_video(), _video())
    assert "lpips_alex" not in scalars  # skipped, never a silent 0
    assert suite.describe()["lpips_alex_status"] == "skipped"
