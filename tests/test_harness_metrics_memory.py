"""Metric memory (the full-size dry run was OOM-killed after its denoising steps): PSNR and SSIM run on chunks of
frames, with per-frame values equal to whole-video computations, and the metric path's peak memory does not grow
with the video's length beyond a few copies of the video (measured in a fresh process, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svg2.harness import metrics
from svg2.harness.metrics import MetricSuite, as_video, mean_psnr, psnr_per_frame, ssim_per_frame, ssim_svg_per_frame


def _pair(f=7, h=40, w=56, seed=0, noise=0.08):
    rng = np.random.default_rng(seed)
    ref = rng.random((f, h, w, 3), dtype=np.float32)
    out = np.clip(ref + rng.normal(0, noise, ref.shape), 0, 1).astype(np.float32)
    out[1] = ref[1]  # an identical frame: PSNR inf, SSIM 1
    return ref, out


def _whole(ref, out):
    """The per-frame metrics computed over the whole video at once (the computation before chunking)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    r = torch.from_numpy(ref).permute(0, 3, 1, 2).contiguous().double()  # as as_video(...).double() was
    o = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().double()
    psnr = peak_signal_noise_ratio(o, r, data_range=1.0, reduction="none", dim=(1, 2, 3)).float()
    ssim = {w: structural_similarity_index_measure(o, r, data_range=1.0, kernel_size=11, sigma=1.5,
                                                   gaussian_kernel=(w == "gaussian"), reduction="none").float()
            for w in ("gaussian", "box")}
    pool = lambda x: F.avg_pool2d(x, kernel_size=11, stride=1, padding=5)  # noqa: E731
    mu1, mu2 = pool(r), pool(o)
    s11, s22, s12 = pool(r * r) - mu1**2, pool(o * o) - mu2**2, pool(r * o) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    mse = ((o - r) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return {"psnr": psnr, "ssim_gaussian": ssim["gaussian"], "ssim_box": ssim["box"],
            "ssim_svg": m.flatten(1).mean(1).float(), "mean_psnr": float((10 * torch.log10(1.0 / mse)).mean())}


@pytest.mark.parametrize("shape", [(7, 40, 56), (5, 33, 47)])
@pytest.mark.parametrize("chunk", [1, 2, 3, None])
def test_chunked_per_frame_metrics_equal_whole_video(shape, chunk):
    ref, out = _pair(*shape)
    want = _whole(ref, out)
    r, o = metrics._pair(ref, out)
    got = {"psnr": metrics._psnr_frames(r, o, chunk_frames=chunk),
           "ssim_gaussian": metrics._ssim_frames(r, o, "gaussian", chunk_frames=chunk),
           "ssim_box": metrics._ssim_frames(r, o, "box", chunk_frames=chunk),
           "ssim_svg": metrics._ssim_svg_frames(r, o, chunk_frames=chunk)}
    for name, v in got.items():
        assert v.dtype == torch.float32 and v.shape == (shape[0],)
        assert torch.equal(v, want[name]), (name, chunk, (v - want[name]).abs().max())
    assert torch.isinf(got["psnr"][1]) and got["ssim_gaussian"][1] == 1.0


@pytest.mark.parametrize("budget", [1, 3 * 40 * 56 * 160, 1 << 40])  # one frame, 3 frames of PSNR, no chunking
def test_public_functions_and_suite_do_not_depend_on_the_chunk_budget(monkeypatch, budget):
    ref, out = _pair()
    want = _whole(ref, out)
    monkeypatch.setattr(metrics, "METRIC_CHUNK_BYTES", budget)
    assert torch.equal(psnr_per_frame(ref, out), want["psnr"])
    assert torch.equal(ssim_per_frame(ref, out), want["ssim_gaussian"])
    assert torch.equal(ssim_per_frame(ref, out, "box"), want["ssim_box"])
    assert torch.equal(ssim_svg_per_frame(ref, out), want["ssim_svg"])
    assert mean_psnr(ref, out) == want["mean_psnr"]
    for conv, ssim in (("standard", "ssim_gaussian"), ("svg", "ssim_svg")):
        scalars, frames = MetricSuite(convention=conv, lpips_nets=[])(ref, out)
        assert frames["psnr_frames"] == want["psnr"].tolist() and frames["ssim_frames"] == want[ssim].tolist()
        assert scalars["ssim"] == metrics.mean_finite(want[ssim])


def test_chunk_size_follows_the_budget():
    # 81 frames of 480x832: torchmetrics' SSIM unfolds ~2 GiB per frame on the CPU -> one frame at a time
    assert metrics._chunk_frames((81, 3, 480, 832), "ssim") == 1
    assert metrics._chunk_frames((81, 3, 480, 832), "ssim", budget=1 << 50) == 81  # never more than F
    assert metrics._chunk_frames((81, 3, 480, 832), "ssim", budget=0) == 1  # never fewer than 1
    n = metrics._chunk_frames((81, 3, 480, 832), "psnr")
    assert 1 < n < 81 and n * 160 * 480 * 832 <= metrics.METRIC_CHUNK_BYTES < (n + 1) * 160 * 480 * 832


def test_metric_calls_see_at_most_one_chunk_in_float64(monkeypatch):
    """Counting what the metric kernels receive: no whole-video float64 tensor, ceil(F / chunk) calls."""
    import torchmetrics.functional.image as tmi

    seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, tuple(args[0].shape), args[0].dtype))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(tmi, "peak_signal_noise_ratio", spy("psnr", tmi.peak_signal_noise_ratio))
    monkeypatch.setattr(tmi, "structural_similarity_index_measure",
                        spy("ssim", tmi.structural_similarity_index_measure))
    monkeypatch.setattr(F, "avg_pool2d", spy("pool", F.avg_pool2d))
    ref, out = _pair(f=10, h=32, w=48)
    # 3 frames per chunk for SSIM, the budget in the units _chunk_frames uses
    monkeypatch.setattr(metrics, "METRIC_CHUNK_BYTES", 3 * 32 * 48 * metrics._BYTES_PER_PIXEL["ssim"])
    for conv in ("standard", "svg"):
        MetricSuite(convention=conv, lpips_nets=[])(ref, out)
    assert {n for n, _, _ in seen} == {"psnr", "ssim", "pool"}
    for name, shape, dtype in seen:
        assert dtype == torch.float64 and shape[1:] == (3, 32, 48)
        assert shape[0] <= metrics._chunk_frames((10, 3, 32, 48), {"pool": "ssim_svg"}.get(name, name)), (name, shape)
    assert [s[0] for n, s, _ in seen if n == "ssim"] == [3, 3, 3, 1]


def test_as_video_copies_once_and_leaves_the_input_alone():
    v = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    v[0, 0, 0, 0], v[0, 0, 0, 1] = 1 + 5e-5, -5e-5  # inside the tolerance: clamped in the copy only
    before = v.copy()
    t = as_video(v)
    assert np.array_equal(v, before)
    assert t.shape == (3, 3, 16, 16) and t.is_contiguous() and t.dtype == torch.float32
    assert float(t.max()) <= 1.0 and float(t.min()) >= 0.0
    assert torch.equal(t, torch.from_numpy(before).clamp(0, 1).permute(0, 3, 1, 2))
    u8 = (before.clip(0, 1) * 255).round().astype(np.uint8)
    assert torch.equal(as_video(u8), (torch.from_numpy(u8).float() / 255.0).permute(0, 3, 1, 2))
    f64 = before.clip(0, 1).astype(np.float64)
    assert torch.equal(as_video(f64), torch.from_numpy(f64).float().permute(0, 3, 1, 2))
    for bad in (np.inf, -np.inf, np.nan):
        w = before.copy()
        w[2, 5, 5, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            as_video(w)
    with pytest.raises(ValueError, match="NaN or inf"):  # finite in float64, inf once float32
        as_video(np.full((1, 16, 16, 3), 1e300))


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from svg2.harness import metrics
    frames, h, w = (int(a) for a in sys.argv[1:4])
    metrics.METRIC_CHUNK_BYTES = int(sys.argv[4])

    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    suite = metrics.MetricSuite(convention="standard", lpips_nets=["alex"], lpips_random_backbone=True)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand((frames, h, w, 3), generator=g).numpy()  # in-place ops only: no set-up peak
    out = torch.rand((frames, h, w, 3), generator=g).mul_(0.1).add_(torch.from_numpy(ref)).clamp_(0, 1).numpy()
    suite(ref[:2], out[:2])  # warm-up: kernels, thread pools, LPIPS
    try:  # reset the peak RSS (VmHWM) to the current RSS; where that is refused, the peak keeps the set-up's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = kib("VmRSS")
    scalars, per_frame = suite(ref, out)
    assert len(per_frame["ssim_frames"]) == frames and np.isfinite(scalars["ssim"])
    print(json.dumps({"base_kib": base, "peak_kib": kib("VmHWM"), "video_bytes": ref.nbytes}))
""")


def _peaks_above_base(lengths: tuple[int, ...], h: int, w: int, budget: int) -> list[tuple[float, int]]:
    """Per video length: (peak RSS above the RSS before the call, in bytes; the video's bytes) of MetricSuite
    (standard: PSNR, Gaussian SSIM, LPIPS alex) over a video of that many frames, each in a fresh process (run
    side by side, one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           # large blocks mmapped and unmapped on free (no dynamic threshold): RSS follows the live bytes
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    procs = [subprocess.Popen([sys.executable, "-c", _PEAK_SCRIPT, str(n), str(h), str(w), str(budget)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1]) for n in lengths]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        m = json.loads(stdout.strip().splitlines()[-1])
        results.append(((m["peak_kib"] - m["base_kib"]) * 1024.0, m["video_bytes"]))
    return results


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_metric_peak_memory_grows_with_the_video_not_with_float64_copies_of_it():
    """Peak RSS of the metric path (not timed). Before chunking, torchmetrics' SSIM alone needed ~440x the video
    (float64 im2col of every frame at once: 2 GiB per 480x832 frame, the OOM at 81 frames). Now a long video costs
    a few float32 copies of itself above what a short one of the same frame size costs (one chunk, one LPIPS
    batch: constant in the length)."""
    # 96x128 frames, 1-frame SSIM chunks (5 * 121 * 8 bytes a pixel: 60 MB of im2col); 160 frames: 22.5 MiB a video
    (short, _), (long, video) = _peaks_above_base((16, 160), 96, 128, 16 << 20)
    # the long video adds its two validated float32 copies (2x its size) and allocator noise; ~440x before
    assert long - short <= 4 * video + (24 << 20), (long / 2**20, short / 2**20, video / 2**20)
    assert long <= short + 6 * video, (long / 2**20, short / 2**20, video / 2**20)


def test_reference_cache_never_keeps_a_non_finite_reference(tmp_path):
    """A diverged pipeline's NaN/inf video is not cached as the dense reference (every comparison with it would
    fail, on every relaunch); an entry holding one (written before this check) is a miss, so it is regenerated."""
    from svg2.harness.reference import ReferenceCache

    cache = ReferenceCache(tmp_path)
    good = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    frames, _ = cache.put("good", good, {}, fps=8, write_video=False)
    assert np.array_equal(frames, good.astype(np.float16).astype(np.float32))
    assert cache.get("good") is not None
    for bad in (np.nan, np.inf):
        v = good.copy()
        v[1, 2, 3, 0] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            cache.put("bad", v, {}, fps=8, write_video=False)
        assert not cache.entry("bad").exists()
    # an old entry with NaN frames: not returned
    cache.put("stale", good, {}, fps=8, write_video=False)
    v = good.astype(np.float16)
    v[0, 0, 0, 0] = np.nan
    np.save(cache.entry("stale") / "frames.npy", v)
    assert cache.get("stale") is None
    u8 = ReferenceCache(tmp_path / "u8", dtype="uint8")
    frames, _ = u8.put("k", good, {}, fps=8, write_video=False)
    assert frames.dtype == np.float32 and np.array_equal(frames, u8.get("k")[0])
    assert np.array_equal(frames, ((np.clip(good, 0, 1) * 255 + 0.5).astype(np.uint8)).astype(np.float32) / 255.0)
