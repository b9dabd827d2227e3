"""One timed generation: call kwargs from a model preset, per-step clock, frames out.

Timing adds no synchronisation inside the denoising loop: on CUDA, events are recorded around the call and at
every ``callback_on_step_end`` and resolved once after the call; on the CPU ``time.perf_counter`` is used.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from svg2.harness.prompts import Prompt

__all__ = ["GenerationResult", "StepClock", "build_call_kwargs", "generate"]


class StepClock:
    """Marks the start, every step end and the end of one generation; ``resolve()`` returns seconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.mark()
        return {}

    def resolve(self) -> tuple[float, list[float]]:
        """(total seconds from first to last mark, per-step seconds between step marks)."""
        if len(self.marks) < 2:
            return float("nan"), []
        if self.cuda:
            torch.cuda.synchronize()
            t = [0.0] + [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks[1:]]
        else:
            t = [m - self.marks[0] for m in self.marks]
        steps = [b - a for a, b in zip(t[:-2], t[1:-1])]  # marks: start, step ends..., end
        return t[-1], steps


@dataclass
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] float32 in [0, 1]
    latency_s: float
    step_s: list[float] = field(default_factory=list)
    peak_mem_gb: float | None = None


def _accepts(fn: Any) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_call_kwargs(pipe: Any, mcfg: Any, prompt: Prompt, seed: int) -> dict[str, Any]:
    """Pipeline-call kwargs for one (prompt, seed) under a model preset, filtered to what ``pipe`` accepts."""
    kw: dict[str, Any] = dict(
        prompt=prompt.text, negative_prompt=mcfg.negative_prompt or None, height=mcfg.height, width=mcfg.width,
        num_frames=mcfg.num_frames, num_inference_steps=mcfg.num_steps, guidance_scale=mcfg.guidance_scale,
        # A CPU generator gives the same initial noise on every device.
        generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="np",
    )
    if mcfg.get("guidance_scale_2") is not None:
        kw["guidance_scale_2"] = mcfg.guidance_scale_2
    if getattr(pipe, "_svg2_max_sequence_length", None):
        kw["max_sequence_length"] = pipe._svg2_max_sequence_length
    if prompt.image is not None and mcfg.task in ("i2v", "ti2v"):
        from PIL import Image

        kw["image"] = Image.open(prompt.image).convert("RGB").resize((mcfg.width, mcfg.height))
    kw.update(dict(mcfg.get("call_kwargs") or {}))
    names, var_kw = _accepts(pipe.__call__)
    if not var_kw:
        dropped = {k for k in kw if k not in names} - {"negative_prompt", "guidance_scale_2", "max_sequence_length"}
        if "image" in dropped:
            raise TypeError(f"{type(pipe).__name__} takes no `image`: the model preset's task {mcfg.task!r} does "
                            "not match the pipeline")
        kw = {k: v for k, v in kw.items() if k in names}
    return kw


def _frames_of(output: Any) -> np.ndarray:
    frames = output.frames if hasattr(output, "frames") else output[0]
    frames = frames[0]
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
        if frames.shape[-1] != 3 and frames.shape[1] == 3:  # [F, 3, H, W]
            frames = frames.transpose(0, 2, 3, 1)
    elif isinstance(frames, list):  # PIL images
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames]).astype(np.float32) / 255.0
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"pipeline returned frames of shape {frames.shape}; expected [F, H, W, 3]")
    return frames


def generate(pipe: Any, mcfg: Any, prompt: Prompt, seed: int, device: torch.device,
             per_step: bool = True) -> GenerationResult:
    """Run the pipeline once and time it (whole call and per denoising step); peak memory on CUDA."""
    kw = build_call_kwargs(pipe, mcfg, prompt, seed)
    clock = StepClock(device)
    names, var_kw = _accepts(pipe.__call__)
    if per_step and ("callback_on_step_end" in names or var_kw) and "callback_on_step_end" not in kw:
        kw["callback_on_step_end"] = clock.callback
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock.mark()
    with torch.inference_mode():
        out = pipe(**kw)
    clock.mark()
    total, steps = clock.resolve()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GenerationResult(frames=_frames_of(out), latency_s=total, step_s=steps, peak_mem_gb=peak)
