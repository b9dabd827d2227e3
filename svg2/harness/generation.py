"""One timed generation: call kwargs from a model preset, per-step clock, frames out.

:func:`generate_batch` runs several (prompt, seed) pairs in one pipeline call: prompts (and negative prompts)
as lists and one CPU generator per item (diffusers' ``generator=[...]``), so every item starts from exactly
the noise it gets alone. A batch of one is :func:`generate`, call for call.

Timing adds no synchronisation inside the denoising loop: on CUDA, events are recorded around the call and at
every ``callback_on_step_end`` and resolved once after the call; on the CPU ``time.perf_counter`` is used. Stages
(``GenerationResult.stage_s``): ``text_encode`` (the text encoder's forwards, through module hooks) and
``decode`` (from the last step's end to the end of the call: VAE decode and conversion of the frames).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from svg2.harness.prompts import Prompt

__all__ = ["GenerationResult", "StepClock", "build_call_kwargs", "generate", "generate_batch"]


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
        t = self._seconds(self.marks)
        steps = [b - a for a, b in zip(t[:-2], t[1:-1])]  # marks: start, step ends..., end
        return t[-1], steps

    def _seconds(self, marks: list[Any]) -> list[float]:
        """Seconds of ``marks`` since the first mark of the clock."""
        if self.cuda:
            torch.cuda.synchronize()
            return [0.0 if m is self.marks[0] else self.marks[0].elapsed_time(m) / 1e3 for m in marks]
        return [m - self.marks[0] for m in marks]

    def span_s(self, spans: list[tuple[Any, Any]]) -> float:
        """Total seconds of (start mark, end mark) pairs recorded by :meth:`new_mark`."""
        flat = self._seconds([m for pair in spans for m in pair])
        return float(sum(b - a for a, b in zip(flat[0::2], flat[1::2])))

    def new_mark(self) -> Any:
        """A mark outside the step sequence (for stage spans)."""
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()


def _hook_spans(module: Any, clock: StepClock, spans: list[tuple[Any, Any]]) -> list[Any]:
    """Forward hooks that append (start, end) marks of every forward of ``module`` to ``spans``; returns the
    hook handles (remove them after the call)."""
    if not isinstance(module, torch.nn.Module):
        return []
    pending: list[Any] = []

    def pre(*_: Any) -> None:
        pending.append(clock.new_mark())

    def post(*_: Any) -> None:
        if pending:
            spans.append((pending.pop(), clock.new_mark()))

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@dataclass
class GenerationResult:
    """One video. In a batch, ``latency_s`` is this item's share (batch total / batch size); the batch's total,
    per-step times and peak memory are the whole call's."""

    frames: np.ndarray  # [F, H, W, 3] float32 in [0, 1]
    latency_s: float
    step_s: list[float] = field(default_factory=list)
    peak_mem_gb: float | None = None
    batch_size: int = 1  # videos in the pipeline call that made this one
    batch_latency_s: float | None = None  # that call's total; None: same as latency_s (batch of one)
    stage_s: dict[str, float] = field(default_factory=dict)  # the call's text_encode / decode seconds


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


def _videos_of(output: Any) -> Any:
    """The batch of videos a pipeline call returned (an array, tensor or list indexed by item)."""
    return output.frames if hasattr(output, "frames") else output[0]


def _frames_of(output: Any, index: int = 0) -> np.ndarray:
    frames = _videos_of(output)[index]
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
    out, total, steps, peak, stages = _timed_call(pipe, kw, device, per_step)
    return GenerationResult(frames=_frames_of(out), latency_s=total, step_s=steps, peak_mem_gb=peak, stage_s=stages)


def batch_call_kwargs(pipe: Any, mcfg: Any, items: list[tuple[Prompt, int]]) -> dict[str, Any]:
    """Pipeline-call kwargs for several (prompt, seed) pairs in one call: ``prompt`` and ``negative_prompt`` as
    lists, ``generator`` as one CPU generator per item (each seeded as :func:`build_call_kwargs` seeds it)."""
    if any(p.image is not None for p, _ in items):
        # diffusers' image-to-video pipelines encode one conditioning image and repeat it over the batch.
        raise ValueError("batch_size > 1 is not supported for image-conditioned prompts (i2v/ti2v): the "
                         "pipelines repeat one image over the batch. Set batch_size=1.")
    names, var_kw = _accepts(pipe.__call__)
    if not var_kw and "generator" not in names:
        raise TypeError(f"{type(pipe).__name__} takes no `generator`, so a batch cannot give each item its own "
                        "noise. Set batch_size=1.")
    per_item = [build_call_kwargs(pipe, mcfg, p, s) for p, s in items]
    kw = dict(per_item[0])
    kw["prompt"] = [k["prompt"] for k in per_item]
    kw["generator"] = [k["generator"] for k in per_item]
    if kw.get("negative_prompt") is not None:
        kw["negative_prompt"] = [k["negative_prompt"] for k in per_item]
    return kw


def generate_batch(pipe: Any, mcfg: Any, items: list[tuple[Prompt, int]], device: torch.device,
                   per_step: bool = True) -> list[GenerationResult]:
    """Generate ``items`` ((prompt, seed) pairs) in one timed pipeline call; one result per item, in order.

    Every item starts from the noise of its own seed (one CPU generator each). ``latency_s`` of each result
    is the call's total divided by the number of items; the per-step clock and peak memory are the call's.
    A batch of one is exactly :func:`generate`. Raises ValueError when the pipeline returns another number of
    videos than it was asked for (it does not take lists).
    """
    if not items:
        return []
    if len(items) == 1:
        return [generate(pipe, mcfg, items[0][0], items[0][1], device, per_step=per_step)]
    kw = batch_call_kwargs(pipe, mcfg, items)
    out, total, steps, peak, stages = _timed_call(pipe, kw, device, per_step)
    n = len(items)
    got = len(_videos_of(out))
    if got != n:
        raise ValueError(f"{type(pipe).__name__} returned {got} videos for a batch of {n} prompts: it does not take "
                         "lists of prompts and generators. Set batch_size=1.")
    return [GenerationResult(frames=_frames_of(out, i), latency_s=total / n, step_s=steps, peak_mem_gb=peak,
                             batch_size=n, batch_latency_s=total, stage_s=stages) for i in range(n)]


def _timed_call(pipe: Any, kw: dict[str, Any], device: torch.device,
                per_step: bool) -> tuple[Any, float, list[float], float | None, dict[str, float]]:
    """Call ``pipe(**kw)`` under the step clock: (output, total seconds, per-step seconds, peak GiB on CUDA,
    stage seconds: ``text_encode`` when the pipeline has a ``text_encoder`` module, ``decode`` with steps)."""
    clock = StepClock(device)
    names, var_kw = _accepts(pipe.__call__)
    if per_step and ("callback_on_step_end" in names or var_kw) and "callback_on_step_end" not in kw:
        kw["callback_on_step_end"] = clock.callback
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    text_spans: list[tuple[Any, Any]] = []
    hooks = _hook_spans(getattr(pipe, "text_encoder", None), clock, text_spans)
    clock.mark()
    try:
        with torch.inference_mode():
            out = pipe(**kw)
    finally:
        for h in hooks:
            h.remove()
    clock.mark()
    total, steps = clock.resolve()
    stages: dict[str, float] = {}
    if hooks:
        stages["text_encode"] = clock.span_s(text_spans)
    if steps:  # marks: start, step ends..., end: after the last step come the VAE decode and the frames
        stages["decode"] = clock.span_s([(clock.marks[-2], clock.marks[-1])])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, total, steps, peak, stages
