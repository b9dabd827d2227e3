"""Video quality against the dense reference: PSNR, SSIM, LPIPS per frame, then averaged over frames.

Videos are ``[F, H, W, 3]`` arrays (numpy or torch), float in [0, 1] (uint8 is accepted and divided by 255).
PSNR uses data range 1.0. SSIM uses an 11x11 window: Gaussian (sigma 1.5, torchmetrics' default) or box
(uniform, as in the authors' evaluation scripts) -- the choice is recorded with the value. LPIPS needs the
torchvision backbone weights; when they are absent (no download allowed) it is *skipped with the reason*,
never reported as 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["as_video", "psnr_per_frame", "mean_psnr", "ssim_per_frame", "LpipsScorer", "MetricSuite", "mean_finite"]

SSIM_WINDOWS = ("gaussian", "box")


def as_video(x: Any, name: str = "video") -> torch.Tensor:
    """Validate a video and return it as float32 ``[F, 3, H, W]`` in [0, 1] on the CPU."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor of shape [F, H, W, 3], got {type(x).__name__}")
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [frames, height, width, 3] (channels last), got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise TypeError(f"{name}: expected float in [0, 1] or uint8, got dtype {t.dtype}")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: holds NaN or inf values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        hint = ""
        if hi > 2:
            hint = " (looks like 0-255: divide by 255)"
        elif lo < -0.5:
            hint = " (looks like [-1, 1]: map it with (x + 1) / 2)"
        raise ValueError(f"{name}: values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")
    return t.clamp_(0, 1).permute(0, 3, 1, 2).contiguous()


def _pair(ref: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    r, o = as_video(ref, "reference"), as_video(out, "video")
    if r.shape != o.shape:
        raise ValueError(f"reference and video differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)} "
                         "([frames, height, width, 3]); generate both at the same resolution and frame count")
    return r, o


def psnr_per_frame(ref: Any, out: Any) -> torch.Tensor:
    """PSNR in dB per frame, data range 1.0: ``[F]`` (inf where a frame is identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    r, o = _pair(ref, out)
    return peak_signal_noise_ratio(o.double(), r.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)).float()


def mean_psnr(ref: Any, out: Any) -> float:
    """PSNR in dB per frame (data range 1.0) averaged over frames, the authors' convention, without the
    ``eval`` extra; an identical frame counts as 120 dB (MSE floored at 1e-12) so the mean stays finite."""
    r, o = _pair(ref, out)
    mse = ((o.double() - r.double()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def ssim_per_frame(ref: Any, out: Any, window: str = "gaussian") -> torch.Tensor:
    """SSIM per frame with an 11x11 window (``gaussian``: sigma 1.5; ``box``: uniform): ``[F]``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if window not in SSIM_WINDOWS:
        raise ValueError(f"unknown SSIM window {window!r}; use one of {SSIM_WINDOWS}")
    r, o = _pair(ref, out)
    if min(r.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels (11x11 window), got {tuple(r.shape[-2:])}")
    vals = structural_similarity_index_measure(o.double(), r.double(), data_range=1.0, kernel_size=11, sigma=1.5,
                                               gaussian_kernel=(window == "gaussian"), reduction="none")
    return vals.float()


def _torchvision_weights_file(net: str) -> tuple[str, Path]:
    from torchvision import models

    w = {"alex": models.AlexNet_Weights.IMAGENET1K_V1, "vgg": models.VGG16_Weights.IMAGENET1K_V1,
         "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1}[net]
    fname = Path(w.url).name
    return fname, Path(torch.hub.get_dir()) / "checkpoints" / fname


class LpipsScorer:
    """LPIPS with one backbone (``alex`` or ``vgg``). ``available`` is False, with ``skip_reason``, when the
    backbone weights are absent and downloading is not allowed. ``random_backbone=True`` (tests) uses
    randomly initialised backbone and linear layers: values are only meaningful as 0 for identical inputs."""

    def __init__(self, net: str = "alex", *, random_backbone: bool = False, allow_download: bool = False,
                 device: str | torch.device = "cpu") -> None:
        if net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"unknown LPIPS backbone {net!r}; use alex, vgg or squeeze")
        self.net, self.random_backbone, self.device = net, random_backbone, torch.device(device)
        self.model = None
        self.skip_reason: str | None = None
        try:
            import lpips
        except ImportError:
            self.skip_reason = "the lpips package is not installed (pip install 'svg2[eval]')"
            return
        if not random_backbone:
            fname, path = _torchvision_weights_file(net)
            if not path.is_file() and not allow_download:
                self.skip_reason = (f"torchvision backbone weights {fname} not found in {path.parent} and downloads "
                                    "are off (metrics.lpips_allow_download=true, or place the file there)")
                return
        try:
            with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" chatter
                warnings.simplefilter("ignore", UserWarning)
                model = lpips.LPIPS(net=net, pretrained=not random_backbone, pnet_rand=random_backbone, verbose=False)
        except Exception as e:  # noqa: BLE001 - e.g. a failed download: record, never crash the run
            self.skip_reason = f"could not build LPIPS({net}): {type(e).__name__}: {e}"
            return
        self.model = model.eval().to(self.device)

    @property
    def available(self) -> bool:
        return self.model is not None

    @property
    def status(self) -> str:
        return "skipped" if not self.available else ("random_backbone" if self.random_backbone else "ok")

    @torch.no_grad()
    def per_frame(self, ref: Any, out: Any, batch: int = 16) -> torch.Tensor:
        """LPIPS distance per frame ``[F]`` (lower is better, 0 for identical frames)."""
        if self.model is None:
            raise RuntimeError(f"LPIPS({self.net}) is unavailable: {self.skip_reason}")
        r, o = _pair(ref, out)
        if min(r.shape[-2:]) < 32:
            raise ValueError(f"LPIPS({self.net}) needs frames of at least 32x32 pixels, got {tuple(r.shape[-2:])}; "
                             "set metrics.lpips_nets=[] for smaller videos")
        vals = []
        for i in range(0, r.shape[0], batch):
            rb = r[i:i + batch].to(self.device) * 2 - 1
            ob = o[i:i + batch].to(self.device) * 2 - 1
            vals.append(self.model(ob, rb).flatten().float().cpu())
        return torch.cat(vals)


def mean_finite(x: torch.Tensor | list[float]) -> float:
    """Mean over frames; inf if any frame is inf (identical frames under PSNR)."""
    t = torch.as_tensor(x, dtype=torch.float64)
    return float(t.mean()) if t.numel() else math.nan


@dataclass
class MetricSuite:
    """The metrics of one run, built once per job (LPIPS backbones load once)."""

    psnr: bool = True
    ssim: bool = True
    ssim_window: str = "gaussian"
    lpips_nets: list[str] = field(default_factory=lambda: ["alex", "vgg"])
    lpips_random_backbone: bool = False
    lpips_allow_download: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.ssim_window not in SSIM_WINDOWS:
            raise ValueError(f"metrics.ssim_window={self.ssim_window!r}; use one of {SSIM_WINDOWS}")
        self._lpips = {n: LpipsScorer(n, random_backbone=self.lpips_random_backbone,
                                      allow_download=self.lpips_allow_download, device=self.device)
                       for n in self.lpips_nets}

    @classmethod
    def from_config(cls, cfg: Any) -> MetricSuite:
        dev = cfg.get("device", "auto")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(psnr=cfg.psnr, ssim=cfg.ssim, ssim_window=cfg.ssim_window, lpips_nets=list(cfg.lpips_nets),
                   lpips_random_backbone=cfg.lpips_random_backbone, lpips_allow_download=cfg.lpips_allow_download,
                   device=dev)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ssim_window": f"{self.ssim_window}11x11" if self.ssim else None}
        for n, s in self._lpips.items():
            d[f"lpips_{n}_status"] = s.status
            d[f"lpips_{n}_skip_reason"] = s.skip_reason
        return d

    def __call__(self, ref: Any, out: Any, suffix: str = "") -> tuple[dict[str, float], dict[str, list[float]]]:
        """Scalar metrics (``psnr{suffix}``, ``ssim{suffix}``, ``lpips_<net>{suffix}``) and per-frame lists."""
        scalars: dict[str, float] = {}
        frames: dict[str, list[float]] = {}
        r, o = _pair(ref, out)
        rv, ov = r.permute(0, 2, 3, 1), o.permute(0, 2, 3, 1)
        if self.psnr:
            v = psnr_per_frame(rv, ov)
            scalars["psnr" + suffix], frames["psnr" + suffix] = mean_finite(v), v.tolist()
        if self.ssim:
            v = ssim_per_frame(rv, ov, self.ssim_window)
            scalars["ssim" + suffix], frames["ssim" + suffix] = mean_finite(v), v.tolist()
        for n, s in self._lpips.items():
            if s.available:
                v = s.per_frame(rv, ov)
                scalars[f"lpips_{n}{suffix}"], frames[f"lpips_{n}{suffix}"] = mean_finite(v), v.tolist()
        return scalars, frames
