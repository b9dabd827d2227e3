"""Video quality against the dense reference: PSNR, SSIM, LPIPS under a named convention.

Videos are ``[F, H, W, 3]`` arrays (numpy or torch), float in [0, 1] (uint8 is accepted and divided by 255).
Published numbers disagree because their conventions do, so every number is computed under a named
:class:`MetricConvention` (``metrics.convention``), recorded in every row (``metric_convention``):

- ``svg``: the authors' ``svg/utils/metric.py`` exactly: PSNR per frame (data range 1) averaged over frames;
  SSIM with an 11x11 mean filter (``avg_pool2d``, zero padding counted, the whole map averaged, C1=0.01^2,
  C2=0.03^2) per frame, averaged; LPIPS VGG fed the [0, 1] frames as they are (no ``normalize=True``). They
  compare decoded MP4s: our ``*_mp4`` columns.
- ``standard``: as torchmetrics' accumulating metrics (the authors' group's later Quant-VideoGen): PSNR of the
  squared error pooled over all frames; Gaussian SSIM (11x11, sigma 1.5) averaged over frames; LPIPS AlexNet
  on frames mapped to [-1, 1] (``normalize=True``).

Per-frame values are kept (``psnr_frames``: per-frame PSNR whatever the pooling, so a pooled or averaged PSNR
can be recomputed; ``ssim_frames`` and ``lpips_frames`` as the convention computes them). LPIPS needs the
torchvision backbone weights: downloaded on first use when allowed (``metrics.lpips_allow_download``, default
on; ``SVG2_OFFLINE=1`` forbids it), otherwise *skipped with the reason*, never reported as 0.

Memory: a metric call holds one float32 copy of each video; PSNR and SSIM then run on chunks of frames, cast to
float64 only while measured (:data:`METRIC_CHUNK_BYTES`), LPIPS on batches of 16 frames, on the suite's device
(``metrics.device``). Working memory therefore does not grow with the number of frames, and the per-frame values
are those of a whole-video computation.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["as_video", "psnr_per_frame", "mean_psnr", "pooled_psnr", "pool_psnr", "ssim_per_frame",
           "ssim_svg_per_frame",
           "MetricConvention", "CONVENTIONS", "get_convention", "metrics_identity", "LpipsScorer", "MetricSuite",
           "mean_finite", "fetch_backbone"]

SSIM_WINDOWS = ("gaussian", "box")
LPIPS_NETS = ("alex", "vgg", "squeeze")


def as_video(x: Any, name: str = "video") -> torch.Tensor:
    """Validate a video and return it as float32 ``[F, 3, H, W]`` in [0, 1] on the CPU.

    Makes one copy of the video (the returned tensor) and leaves the input as it is."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor of shape [F, H, W, 3], got {type(x).__name__}")
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [frames, height, width, 3] (channels last), got {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise TypeError(f"{name}: expected float in [0, 1] or uint8, got dtype {t.dtype}")
    # The channels-first float32 copy in one pass (uint8 then divided in place: the values of t.float() / 255);
    # NaN and inf show in its min and max, so no mask of the whole video is needed.
    v = t.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if t.dtype == torch.uint8:
        v.div_(255.0)
    if not v.numel():
        return v
    lo, hi = (float(x) for x in torch.aminmax(v))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: holds NaN or inf values")
    if lo < -1e-4 or hi > 1 + 1e-4:
        hint = ""
        if hi > 2:
            hint = " (looks like 0-255: divide by 255)"
        elif lo < -0.5:
            hint = " (looks like [-1, 1]: map it with (x + 1) / 2)"
        raise ValueError(f"{name}: values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")
    return v.clamp_(0, 1)


def _pair(ref: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    r, o = as_video(ref, "reference"), as_video(out, "video")
    if r.shape != o.shape:
        raise ValueError(f"reference and video differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)} "
                         "([frames, height, width, 3]); generate both at the same resolution and frame count")
    return r, o


# Memory: every per-frame metric runs on chunks of frames, each cast to float64 (on the metric device) only
# while it is measured, so the working memory does not grow with the number of frames. A chunk's estimated
# working set (the bytes per pixel of one frame below, times its pixels and frames) stays under
# METRIC_CHUNK_BYTES; a chunk holds at least one frame. Every frame is computed alone by the same operations
# whatever the chunk, so the per-frame values do not depend on the chunking (tests/test_harness_metrics_memory.py
# compares them with whole-video calls).
METRIC_CHUNK_BYTES = 512 * 2**20
# Peak working bytes per pixel of one frame (3 channels), measured on the CPU and rounded up (an upper bound on
# CUDA too). On the CPU torchmetrics' SSIM convolution (F.conv2d in float64) unfolds the 11x11 window over its 5
# stacked inputs (im2col): 5 * 121 * 8 bytes per pixel and channel group, some 2 GiB for one 480x832 frame.
_BYTES_PER_PIXEL = {"psnr": 160, "ssim_svg": 400, "ssim": 5600}


def _chunk_frames(shape: tuple[int, ...], cost: str, budget: int | None = None) -> int:
    """Frames per chunk for the metric ``cost`` names (a key of ``_BYTES_PER_PIXEL``), of videos of ``shape``
    ``[F, 3, H, W]``: as many as fit in ``budget`` (default :data:`METRIC_CHUNK_BYTES`), at least one."""
    per_frame = _BYTES_PER_PIXEL[cost] * shape[-2] * shape[-1]
    budget = METRIC_CHUNK_BYTES if budget is None else budget
    return max(1, min(shape[0], budget // per_frame))


def _per_frame(fn: Any, r: torch.Tensor, o: torch.Tensor, cost: str, device: Any = "cpu",
               chunk_frames: int | None = None) -> torch.Tensor:
    """``fn(ref, out) -> [n]`` over chunks of the validated videos ``r``, ``o`` (``[F, 3, H, W]`` float32), each
    chunk cast to float64 on ``device``: ``[F]`` float64 on the CPU. ``chunk_frames``: frames per chunk (None:
    sized by :data:`METRIC_CHUNK_BYTES`)."""
    dev = torch.device(device)
    n = chunk_frames or _chunk_frames(tuple(r.shape), cost)
    vals = []
    for i in range(0, r.shape[0], n):
        a = r[i:i + n].to(dev, torch.float64)
        b = o[i:i + n].to(dev, torch.float64)
        vals.append(fn(a, b).cpu())
        del a, b
    return torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)


def _psnr_chunk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))


def _psnr_frames(r: torch.Tensor, o: torch.Tensor, device: Any = "cpu",
                 chunk_frames: int | None = None) -> torch.Tensor:
    return _per_frame(_psnr_chunk, r, o, "psnr", device, chunk_frames).float()


def psnr_per_frame(ref: Any, out: Any) -> torch.Tensor:
    """PSNR in dB per frame, data range 1.0: ``[F]`` (inf where a frame is identical)."""
    r, o = _pair(ref, out)
    return _psnr_frames(r, o)


def _mse_chunk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((b - a) ** 2).flatten(1).mean(1)


def mean_psnr(ref: Any, out: Any) -> float:
    """PSNR in dB per frame (data range 1.0) averaged over frames, the authors' convention, without the
    ``eval`` extra; an identical frame counts as 120 dB (MSE floored at 1e-12) so the mean stays finite."""
    r, o = _pair(ref, out)
    mse = _per_frame(_mse_chunk, r, o, "psnr").clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def pooled_psnr(psnr_frames: Any) -> float:
    """PSNR (data range 1) of the squared error pooled over all frames, from per-frame PSNRs (equal-size frames):
    ``10 log10(1 / mean_f(10^(-psnr_f / 10)))``; inf only when every frame is identical."""
    p = torch.as_tensor(psnr_frames, dtype=torch.float64)
    if not p.numel():
        return math.nan
    mse = float(torch.pow(10.0, -p / 10).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def pool_psnr(psnr_frames: Any, pooling: str) -> float:
    """A video's PSNR from its per-frame PSNRs under a convention's pooling: ``"frames"`` (mean of the per-frame
    values, the authors') or ``"video"`` (:func:`pooled_psnr`). The run and ``svg2-report --psnr-pooling`` both
    pool through here, so a re-pooled table equals a run under that pooling."""
    if pooling == "frames":
        return mean_finite(psnr_frames)
    if pooling == "video":
        return pooled_psnr(psnr_frames)
    raise ValueError(f"psnr pooling {pooling!r}: use 'frames' (mean of per-frame PSNRs) or 'video' (error pooled "
                     "over all frames)")


def _check_ssim_size(r: torch.Tensor) -> None:
    if min(r.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels (11x11 window), got {tuple(r.shape[-2:])}")


def _ssim_svg_chunk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    pool = lambda x: F.avg_pool2d(x, kernel_size=11, stride=1, padding=5)  # noqa: E731
    mu1, mu2 = pool(a), pool(b)
    s11, s22, s12 = pool(a * a) - mu1**2, pool(b * b) - mu2**2, pool(a * b) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return m.flatten(1).mean(1)


def _ssim_svg_frames(r: torch.Tensor, o: torch.Tensor, device: Any = "cpu",
                     chunk_frames: int | None = None) -> torch.Tensor:
    _check_ssim_size(r)
    return _per_frame(_ssim_svg_chunk, r, o, "ssim_svg", device, chunk_frames).float()


def ssim_svg_per_frame(ref: Any, out: Any) -> torch.Tensor:
    """SSIM per frame as the authors' ``svg/utils/metric.py``: means, variances and covariance from an 11x11
    ``avg_pool2d`` (stride 1, zero padding 5, the padding counted), C1 = 0.01^2, C2 = 0.03^2, and the map
    averaged over channels and every pixel, borders included: ``[F]``."""
    r, o = _pair(ref, out)
    return _ssim_svg_frames(r, o)


def _ssim_frames(r: torch.Tensor, o: torch.Tensor, window: str = "gaussian", device: Any = "cpu",
                 chunk_frames: int | None = None) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    def chunk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return structural_similarity_index_measure(b, a, data_range=1.0, kernel_size=11, sigma=1.5,
                                                   gaussian_kernel=(window == "gaussian"), reduction="none")

    _check_ssim_size(r)
    return _per_frame(chunk, r, o, "ssim", device, chunk_frames).float()


def ssim_per_frame(ref: Any, out: Any, window: str = "gaussian") -> torch.Tensor:
    """SSIM per frame, torchmetrics' implementation with an 11x11 window (``gaussian``: sigma 1.5; ``box``:
    uniform; the border the window does not cover is left out): ``[F]``. The authors' variant (zero-padded
    mean filter) is :func:`ssim_svg_per_frame`."""
    if window not in SSIM_WINDOWS:
        raise ValueError(f"unknown SSIM window {window!r}; use one of {SSIM_WINDOWS}")
    r, o = _pair(ref, out)
    return _ssim_frames(r, o, window)


def _torchvision_weights_file(net: str) -> tuple[str, str, Path]:
    """(url, file name, path in the torch hub cache) of a backbone's torchvision weights."""
    from torchvision import models

    w = {"alex": models.AlexNet_Weights.IMAGENET1K_V1, "vgg": models.VGG16_Weights.IMAGENET1K_V1,
         "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1}[net]
    fname = Path(w.url).name
    return w.url, fname, Path(torch.hub.get_dir()) / "checkpoints" / fname


def offline() -> str | None:
    """Why downloads are off in this process (``SVG2_OFFLINE=1``), or None."""
    v = os.environ.get("SVG2_OFFLINE", "").strip().lower()
    return "SVG2_OFFLINE=1" if v not in ("", "0", "false", "no") else None


def fetch_backbone(net: str, timeout_s: float = 60.0) -> Path:
    """Download a backbone's torchvision weights into the torch hub cache (where torchvision looks), checking
    the sha256 prefix in the file name as ``torch.hub`` does; atomic (a partial file never has the final
    name). ``timeout_s`` bounds each network wait, so a machine without network fails fast. Returns the path."""
    url, fname, path = _torchvision_weights_file(net)
    if path.is_file():
        return path
    why = offline()
    if why:
        raise RuntimeError(f"downloads are off ({why})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{fname}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as f:  # noqa: S310 - fixed https URL
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
        prefix = re.search(r"-([a-f0-9]+)\.", fname)
        if prefix and not h.hexdigest().startswith(prefix.group(1)):
            raise RuntimeError(f"{fname}: sha256 {h.hexdigest()[:12]}... does not match the file name's "
                               f"{prefix.group(1)} (a corrupted download)")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class LpipsScorer:
    """LPIPS with one backbone (``alex``, ``vgg`` or ``squeeze``).

    ``normalize``: True maps the [0, 1] frames to [-1, 1], LPIPS' input range (``normalize=True`` of lpips and
    torchmetrics); False feeds them as they are (the authors' scripts). When the backbone weights are absent
    they are downloaded if ``allow_download`` and the process is not offline; otherwise (or when the download
    fails) ``available`` is False, with ``skip_reason``. ``random_backbone=True`` (tests) uses randomly
    initialised backbone and linear layers: values are only meaningful as 0 for identical inputs."""

    def __init__(self, net: str = "alex", *, normalize: bool = True, random_backbone: bool = False,
                 allow_download: bool = True, device: str | torch.device = "cpu") -> None:
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS backbone {net!r}; use one of {LPIPS_NETS}")
        self.net, self.normalize, self.random_backbone = net, bool(normalize), random_backbone
        self.device = torch.device(device)
        self.model = None
        self.skip_reason: str | None = None
        try:
            import lpips
        except ImportError:
            self.skip_reason = f"LPIPS({net}): the lpips package is not installed (pip install 'svg2[eval]')"
            return
        if not random_backbone:
            _, fname, path = _torchvision_weights_file(net)
            if not path.is_file():
                if not allow_download:
                    self.skip_reason = (f"LPIPS({net}): torchvision backbone weights {fname} not in {path.parent} and "
                                        "downloads are off (metrics.lpips_allow_download=false; set it true, or "
                                        "place the file there)")
                    return
                try:
                    fetch_backbone(net)
                except Exception as e:  # noqa: BLE001 - offline, no network, bad file: record, never crash the run
                    self.skip_reason = (f"LPIPS({net}): torchvision backbone weights {fname} not in {path.parent} and "
                                        f"could not be downloaded ({type(e).__name__}: {e}); place the file there "
                                        "or rerun with network (metrics.lpips_allow_download=true)")
                    return
        try:
            with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" chatter
                warnings.simplefilter("ignore", UserWarning)
                model = lpips.LPIPS(net=net, pretrained=not random_backbone, pnet_rand=random_backbone, verbose=False)
        except Exception as e:  # noqa: BLE001
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
        return self._per_frame(r, o, batch)

    @torch.no_grad()
    def _per_frame(self, r: torch.Tensor, o: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """:meth:`per_frame` of videos validated by ``_pair`` (``[F, 3, H, W]`` float32): ``batch`` frames at a
        time on the scorer's device, so memory is bounded by the batch, not the video."""
        if self.model is None:
            raise RuntimeError(f"LPIPS({self.net}) is unavailable: {self.skip_reason}")
        if min(r.shape[-2:]) < 32:
            raise ValueError(f"LPIPS({self.net}) needs frames of at least 32x32 pixels, got {tuple(r.shape[-2:])}; "
                             "set metrics.lpips_nets=[] for smaller videos")
        scale = (lambda x: x * 2 - 1) if self.normalize else (lambda x: x)
        vals = []
        for i in range(0, r.shape[0], batch):
            rb = scale(r[i:i + batch].to(self.device))
            ob = scale(o[i:i + batch].to(self.device))
            vals.append(self.model(ob, rb).flatten().float().cpu())
        return torch.cat(vals)


def mean_finite(x: torch.Tensor | list[float]) -> float:
    """Mean over frames; inf if any frame is inf (identical frames under PSNR)."""
    t = torch.as_tensor(x, dtype=torch.float64)
    return float(t.mean()) if t.numel() else math.nan


@dataclass(frozen=True)
class MetricConvention:
    """How PSNR, SSIM and LPIPS are computed and pooled over frames (see the module doc)."""

    name: str
    psnr_pooling: str  # "frames": mean of per-frame PSNRs | "video": PSNR of the error pooled over all frames
    ssim: str  # "svg_box": zero-padded 11x11 mean filter (the authors') | "gaussian": torchmetrics, sigma 1.5
    lpips_net: str  # the backbone of the ``lpips`` column
    lpips_normalize: bool  # frames mapped to [-1, 1] before LPIPS (True) or fed as [0, 1] (False)
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "psnr_pooling": self.psnr_pooling, "ssim": self.ssim,
                "lpips_net": self.lpips_net, "lpips_normalize": self.lpips_normalize}


CONVENTIONS: dict[str, MetricConvention] = {
    "svg": MetricConvention(
        "svg", "frames", "svg_box", "vgg", False,
        "svg (the authors' svg/utils/metric.py): PSNR per frame averaged over frames; SSIM 11x11 box "
        "(zero-padded mean filter); LPIPS VGG on [0,1] inputs (no normalize); the authors compare decoded MP4s"),
    "standard": MetricConvention(
        "standard", "video", "gaussian", "alex", True,
        "standard (torchmetrics, as Quant-VideoGen): PSNR of the error pooled over all frames; SSIM 11x11 "
        "Gaussian (sigma 1.5) averaged over frames; LPIPS AlexNet on [-1,1] inputs (normalize=True)"),
}


def get_convention(name: str) -> MetricConvention:
    if name not in CONVENTIONS:
        raise ValueError(f"metrics.convention={name!r}: use one of {sorted(CONVENTIONS)} "
                         "(svg: the authors' evaluation script; standard: torchmetrics-style pooling)")
    return CONVENTIONS[name]


def _resolved_nets(conv: MetricConvention, lpips_nets: Any) -> list[str]:
    nets = [conv.lpips_net] if lpips_nets is None else list(lpips_nets)
    bad = [n for n in nets if n not in LPIPS_NETS]
    if bad:
        raise ValueError(f"metrics.lpips_nets has {bad}; use backbones of {LPIPS_NETS} (or [] for no LPIPS)")
    return list(dict.fromkeys(nets))


def metrics_identity(cfg: Any) -> dict[str, Any]:
    """What changes the numbers of a ``metrics`` config (for row keys), without loading any backbone."""
    if cfg.get("ssim_window") is not None:
        raise ValueError(f"metrics.ssim_window={cfg.ssim_window!r} is replaced by metrics.convention: svg (the "
                         "authors' 11x11 box SSIM) or standard (11x11 Gaussian); remove metrics.ssim_window")
    conv = get_convention(cfg.get("convention", "standard"))
    return {"convention": conv.to_dict(), "psnr": bool(cfg.psnr), "ssim": bool(cfg.ssim),
            "lpips_nets": _resolved_nets(conv, cfg.get("lpips_nets")),
            "lpips_random_backbone": bool(cfg.lpips_random_backbone),
            "compare_on": list(cfg.get("compare_on", ["memory", "mp4"]))}


@dataclass
class MetricSuite:
    """The metrics of one run under one convention, built once per job (LPIPS backbones load once).

    ``lpips_nets``: the backbones measured (``lpips_<net>`` columns); None = the convention's only; [] = none.
    The ``lpips`` column is the convention's backbone when measured, else the first measured one
    (``lpips_net`` says which). ``device``: where PSNR, SSIM and LPIPS run (``metrics.device``; auto: CUDA when
    there is one); the videos are validated on the CPU and go there a chunk of frames at a time."""

    convention: str = "standard"
    psnr: bool = True
    ssim: bool = True
    lpips_nets: list[str] | None = None
    lpips_random_backbone: bool = False
    lpips_allow_download: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.conv = get_convention(self.convention)
        self.nets = _resolved_nets(self.conv, self.lpips_nets)
        self._lpips = {n: LpipsScorer(n, normalize=self.conv.lpips_normalize,
                                      random_backbone=self.lpips_random_backbone,
                                      allow_download=self.lpips_allow_download, device=self.device)
                       for n in self.nets}

    @classmethod
    def from_config(cls, cfg: Any) -> MetricSuite:
        metrics_identity(cfg)  # validates (metrics.ssim_window, convention, backbones) before anything loads
        dev = cfg.get("device", "auto")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        nets = cfg.get("lpips_nets")
        return cls(convention=cfg.get("convention", "standard"), psnr=cfg.psnr, ssim=cfg.ssim,
                   lpips_nets=None if nets is None else list(nets), lpips_random_backbone=cfg.lpips_random_backbone,
                   lpips_allow_download=cfg.lpips_allow_download, device=dev)


    @property
    def primary(self) -> LpipsScorer | None:
        """The scorer behind the ``lpips`` column: the convention's backbone, else the first measured one."""
        s = self._lpips.get(self.conv.lpips_net)
        if s is not None and s.available:
            return s
        return next((s for s in self._lpips.values() if s.available), None)

    def lpips_skipped(self) -> str | None:
        """Why the ``lpips`` column is empty, or None when it is measured."""
        if self.primary is not None:
            return None
        if not self._lpips:
            return "LPIPS off (metrics.lpips_nets=[])"
        return "; ".join(s.skip_reason or f"LPIPS({n}) unavailable" for n, s in self._lpips.items())

    def describe(self) -> dict[str, Any]:
        """Row fields that say how the numbers were computed (the convention, the LPIPS backbone or why none)."""
        c, p = self.conv, self.primary
        d: dict[str, Any] = {
            "metric_convention": c.name, "metric_convention_desc": c.description, "psnr_pooling": c.psnr_pooling,
            "ssim_window": ({"svg_box": "box11x11_zeropad", "gaussian": "gaussian11x11"}[c.ssim]
                            if self.ssim else None),
            "lpips_net": p.net if p is not None else None,
            "lpips_normalize": c.lpips_normalize if p is not None else None,
            "lpips_skipped": self.lpips_skipped(),
        }
        for n, s in self._lpips.items():
            d[f"lpips_{n}_status"] = s.status
            d[f"lpips_{n}_skip_reason"] = s.skip_reason
        return d

    def __call__(self, ref: Any, out: Any, suffix: str = "") -> tuple[dict[str, float], dict[str, list[float]]]:
        """Scalar metrics (``psnr{suffix}``, ``ssim{suffix}``, ``lpips{suffix}``, ``lpips_<net>{suffix}``) under
        the convention, and per-frame lists (``psnr{suffix}_frames``, ``ssim{suffix}_frames``,
        ``lpips{suffix}_frames``; other measured backbones as ``lpips_<net>{suffix}_frames``)."""
        scalars: dict[str, float] = {}
        frames: dict[str, list[float]] = {}
        # Validated once (one float32 copy of each video); every metric then works on chunks of frames on the
        # suite's device (float64 for PSNR and SSIM), so memory stays a few copies of the video whatever its length.
        r, o = _pair(ref, out)
        dev = self.device
        if self.psnr:
            v = _psnr_frames(r, o, dev)
            scalars["psnr" + suffix] = pool_psnr(v, self.conv.psnr_pooling)
            frames[f"psnr{suffix}_frames"] = v.tolist()
        if self.ssim:
            v = _ssim_svg_frames(r, o, dev) if self.conv.ssim == "svg_box" else _ssim_frames(r, o, "gaussian", dev)
            scalars["ssim" + suffix], frames[f"ssim{suffix}_frames"] = mean_finite(v), v.tolist()
        primary = self.primary
        for n, s in self._lpips.items():
            if s.available:
                v = s._per_frame(r, o)
                scalars[f"lpips_{n}{suffix}"] = mean_finite(v)
                if s is primary:
                    scalars["lpips" + suffix], frames[f"lpips{suffix}_frames"] = mean_finite(v), v.tolist()
                else:
                    frames[f"lpips_{n}{suffix}_frames"] = v.tolist()
        return scalars, frames
