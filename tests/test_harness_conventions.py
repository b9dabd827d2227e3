"""Metric conventions and LPIPS availability.

``svg`` is the authors' evaluation script (per-frame PSNR averaged; zero-padded 11x11 box SSIM; LPIPS VGG fed
[0, 1]); ``standard`` is torchmetrics' accumulating metrics (PSNR pooled over frames; Gaussian SSIM; LPIPS
AlexNet on [-1, 1]). Both are checked against independent implementations (scipy filters, torchmetrics'
classes). Rows record the convention and keep per-frame values, from which either pooling is recomputed.
LPIPS backbones are fetched when allowed and never under SVG2_OFFLINE=1 (set for every test); a skipped LPIPS
says why in the row.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import svg2.harness.metrics as metrics
from svg2.harness.metrics import (
    CONVENTIONS,
    LpipsScorer,
    MetricSuite,
    fetch_backbone,
    metrics_identity,
    pooled_psnr,
    psnr_per_frame,
    ssim_per_frame,
    ssim_svg_per_frame,
)
from svg2.harness.runner import job_identity, method_spec, run_job
from svg2.harness.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()

TINY = ["model=tiny", "prompts.limit=1", "model.num_steps=2", "model.num_frames=5", "model.height=32",
        "model.width=32", "metrics.compare_on=[memory]", "store.save_videos=false", "progress=false"]


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


def _pair(f=4, h=24, w=28, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0.1, 0.9, size=(f, h, w, 3)).astype(np.float32)
    noise = rng.normal(0, 1, size=ref.shape) * np.array([0.01, 0.03, 0.06, 0.1])[:f, None, None, None]
    return ref, np.clip(ref + noise, 0, 1).astype(np.float32)


def _rows(store: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((store / "rows").glob("*.json"))]


def test_svg_ssim_is_the_zero_padded_box_filter():
    from scipy.ndimage import uniform_filter

    ref, out = _pair()
    # Independent: scipy's 11x11 mean filter with zero padding per channel = avg_pool2d(padding=5), pad counted.
    box = lambda x: uniform_filter(x, size=11, mode="constant", cval=0.0)  # noqa: E731
    expected = []
    for a, b in zip(ref.astype(np.float64), out.astype(np.float64)):
        vals = []
        for c in range(3):
            x, y = a[..., c], b[..., c]
            mx, my = box(x), box(y)
            sxx, syy, sxy = box(x * x) - mx**2, box(y * y) - my**2, box(x * y) - mx * my
            c1, c2 = 0.01**2, 0.03**2
            vals.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2)))
        expected.append(np.mean(vals))
    got = ssim_svg_per_frame(ref, out).numpy()
    assert got == pytest.approx(expected, abs=1e-6)
    # ... and it is not torchmetrics' box or Gaussian SSIM (which leave the border out / weight the window).
    assert not np.allclose(got, ssim_per_frame(ref, out, "box").numpy(), atol=1e-4)
    assert not np.allclose(got, ssim_per_frame(ref, out, "gaussian").numpy(), atol=1e-4)
    assert ssim_svg_per_frame(ref, ref).numpy() == pytest.approx(np.ones(4))


def test_standard_matches_torchmetrics_accumulating_metrics():
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    ref, out = _pair()
    r, o = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (ref, out))
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    for i in range(0, 4, 3):  # batches of frames, as Quant-VideoGen feeds them
        psnr.update(o[i:i + 3], r[i:i + 3])
        ssim.update(o[i:i + 3], r[i:i + 3])
    scalars, frames = MetricSuite(convention="standard", lpips_nets=[])(ref, out)
    assert scalars["psnr"] == pytest.approx(float(psnr.compute()), abs=1e-4)
    assert scalars["ssim"] == pytest.approx(float(ssim.compute()), abs=1e-5)
    # The svg convention averages per-frame PSNRs instead: higher here (noise grows over the frames).
    svg, svg_frames = MetricSuite(convention="svg", lpips_nets=[])(ref, out)
    per = psnr_per_frame(ref, out).numpy()
    assert svg["psnr"] == pytest.approx(per.mean(), abs=1e-5) and svg["psnr"] > scalars["psnr"] + 1
    # Either pooling is recomputed from the stored per-frame PSNRs.
    assert pooled_psnr(svg_frames["psnr_frames"]) == pytest.approx(scalars["psnr"], abs=1e-6)
    assert np.mean(frames["psnr_frames"]) == pytest.approx(svg["psnr"], abs=1e-6)
    assert pooled_psnr([math.inf, math.inf]) == math.inf and pooled_psnr([math.inf, 20.0]) == pytest.approx(
        20 + 10 * math.log10(2))


def test_lpips_input_scaling_follows_the_convention():
    ref, out = _pair(h=32, w=32)
    raw = LpipsScorer("alex", normalize=False, random_backbone=True)
    r, o = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (ref, out))
    with torch.no_grad():
        direct_raw = raw.model(o, r).flatten()  # [0, 1] fed as is (the authors)
        direct_norm = raw.model(o * 2 - 1, r * 2 - 1).flatten()  # normalize=True
    assert raw.per_frame(ref, out) == pytest.approx(direct_raw, abs=1e-6)
    raw.normalize = True
    assert raw.per_frame(ref, out) == pytest.approx(direct_norm, abs=1e-6)
    assert not torch.allclose(direct_raw, direct_norm)
    assert CONVENTIONS["svg"].lpips_net == "vgg" and not CONVENTIONS["svg"].lpips_normalize
    assert CONVENTIONS["standard"].lpips_net == "alex" and CONVENTIONS["standard"].lpips_normalize


def test_config_conventions_and_clear_errors():
    cfg = _compose([])
    assert cfg.metrics.convention == "standard" and cfg.metrics.lpips_allow_download is True
    assert _compose(["metrics=paper"]).metrics.convention == "svg"
    assert _compose(["metrics=svg"]).metrics.convention == "svg"
    ident = metrics_identity(cfg.metrics)
    assert ident["lpips_nets"] == ["alex"] and ident["convention"]["psnr_pooling"] == "video"
    assert metrics_identity(_compose(["metrics=svg"]).metrics)["lpips_nets"] == ["vgg"]
    # The convention is part of the row key.
    a, b = _compose(["method=svg2"]), _compose(["method=svg2", "metrics=svg"])
    assert job_identity(a, method_spec(a)) != job_identity(b, method_spec(b))
    with pytest.raises(ValueError, match="metrics.convention"):
        metrics_identity(_compose(["metrics.ssim_window=box"]).metrics)
    with pytest.raises(ValueError, match="svg.*standard|standard.*svg"):
        metrics_identity(_compose(["metrics.convention=ffmpeg"]).metrics)
    with pytest.raises(ValueError, match="lpips_nets"):
        MetricSuite(lpips_nets=["resnet"])


@pytest.mark.parametrize("convention", ["svg", "standard"])
def test_rows_record_convention_and_per_frame_values(tmp_path, convention):
    cfg = _compose([*TINY, f"metrics.convention={convention}", "metrics.lpips_random_backbone=true",
                    "method=svg2", "method.cfg.num_q_centroids=4", "method.cfg.num_k_centroids=4",
                    f"cache.dir={tmp_path / 'cache'}"])
    assert run_job(cfg, tmp_path / "store")["ok"] == 1
    (row,) = _rows(tmp_path / "store")
    conv = CONVENTIONS[convention]
    assert row["metric_convention"] == convention and row["metric_convention_desc"] == conv.description
    assert len(row["psnr_frames"]) == len(row["ssim_frames"]) == len(row["lpips_frames"]) == 5
    psnr_f = [float(x) for x in row["psnr_frames"]]
    expected = np.mean(psnr_f) if convention == "svg" else pooled_psnr(psnr_f)
    assert row["psnr"] == pytest.approx(expected, rel=1e-6)
    assert row["ssim"] == pytest.approx(np.mean(row["ssim_frames"]), rel=1e-6)
    assert row["lpips_net"] == conv.lpips_net and row[f"lpips_{conv.lpips_net}"] == row["lpips"]
    assert row["lpips"] == pytest.approx(np.mean(row["lpips_frames"]), rel=1e-6)
    assert row["lpips_skipped"] is None


# ---- LPIPS backbones: fetched when allowed, a recorded skip otherwise -------------------------------------------

def _no_network(*a, **k):
    raise AssertionError("a test tried to reach the network")


def test_offline_lpips_is_skipped_with_the_reason_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no backbone weights here
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    s = LpipsScorer("alex")  # downloads allowed by default, but the process is offline (SVG2_OFFLINE=1)
    assert not s.available and "alexnet-owt-7be5be79.pth" in s.skip_reason and "SVG2_OFFLINE=1" in s.skip_reason
    cfg = _compose([*TINY, "method=dense", f"cache.dir={tmp_path / 'cache'}"])
    assert cfg.metrics.lpips_allow_download  # the default: on
    assert run_job(cfg, tmp_path / "store")["ok"] == 1
    (row,) = _rows(tmp_path / "store")
    assert "lpips" not in row and row["lpips_net"] is None  # never a silent 0
    assert "LPIPS(alex)" in row["lpips_skipped"] and "SVG2_OFFLINE=1" in row["lpips_skipped"]
    assert row["lpips_alex_status"] == "skipped"
    off = MetricSuite(lpips_nets=[])
    assert off.describe()["lpips_skipped"] == "LPIPS off (metrics.lpips_nets=[])"


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_backbone_is_fetched_when_allowed_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SVG2_OFFLINE", "0")
    content = b"backbone weights" * 1000
    good = hashlib.sha256(content).hexdigest()[:8]
    ckpt = tmp_path / "checkpoints"
    names = {"alex": f"fake-{good}.pth", "vgg": "fake-00000000.pth"}
    monkeypatch.setattr(metrics, "_torchvision_weights_file",
                        lambda net: (f"https://example.invalid/{names[net]}", names[net], ckpt / names[net]))
    urls = []

    def fake_urlopen(url, timeout):
        urls.append((url, timeout))
        return _Response(content)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = fetch_backbone("alex")
    assert path.read_bytes() == content and urls == [(f"https://example.invalid/{names['alex']}", 60.0)]
    assert fetch_backbone("alex") == path and len(urls) == 1  # present: not fetched again
    # A file whose content does not match the hash in its name is rejected and not left behind.
    with pytest.raises(RuntimeError, match="corrupted"):
        fetch_backbone("vgg")
    assert sorted(p.name for p in ckpt.iterdir()) == [names["alex"]]
    # A failed download (no network) is a recorded skip, not a crash.
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    s = LpipsScorer("vgg")
    assert not s.available and "could not be downloaded" in s.skip_reason and "no route" in s.skip_reason
    # With downloads off, the reason names the switch.
    s = LpipsScorer("vgg", allow_download=False)
    assert "metrics.lpips_allow_download" in s.skip_reason
