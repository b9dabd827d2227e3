"""Caption adherence of the testbed model: object colour and motion direction read back from frames.

Single-object captions ("a red circle moves left over a blue world"): segmentation is the brightness
threshold of the mini checker (objects bright, world and occluders dark: ``svg2.testbed.data``'s contract);
the colour is the palette colour nearest to the median of the more saturated half of the segmented pixels
(textures mix the object colour towards a lighter tint). Objects wrap around the frame edges,
so the direction is read from the *median* of the per-frame centroid steps (a wrap is one outlier step),
not from a line fit through the centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from svg2.mini.checker import FG_THRESHOLD, EvalPrompt, direction_of, eval_triples, nearest_color, score_with
from svg2.mini.data import BG_COLORS, DIRECTIONS, OBJECT_COLORS, SHAPES

__all__ = ["Reading", "read_video", "EvalPrompt", "eval_prompts", "score"]

MIN_STEP = 0.002  # median centroid step in frame heights per frame below which the object counts as still


@dataclass
class Reading:
    color: str | None
    direction: str | None
    step: tuple[float, float]  # median (dx, dy) per frame, frame heights, x right, y down
    coverage: float


def read_video(frames: np.ndarray) -> Reading:
    """frames: (F, H, W, 3) float in [0, 1]."""
    frames = np.asarray(frames, dtype=np.float32)
    f_, h, w, _ = frames.shape
    mask = frames.max(-1) > FG_THRESHOLD
    coverage = float(mask.mean())
    min_px = max(2, int(0.002 * h * w))
    if mask.sum() < min_px:
        return Reading(None, None, (0.0, 0.0), coverage)
    # textures mix the object colour towards a lighter tint: its own colour is in the most saturated half
    px = frames[mask]
    sat = px.max(-1) - px.min(-1)
    color = nearest_color(np.median(px[sat >= np.median(sat)], axis=0))
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / h
    cents: list[tuple[int, float, float]] = []
    for i in range(f_):
        n = mask[i].sum()
        if n >= min_px:
            cents.append((i, float((mask[i].sum(0) * xs).sum() / n), float((mask[i].sum(1) * ys).sum() / n)))
    steps = [((x1 - x0) / (i1 - i0), (y1 - y0) / (i1 - i0))
             for (i0, x0, y0), (i1, x1, y1) in zip(cents, cents[1:])]
    if len(steps) < max(2, f_ // 3):
        return Reading(color, None, (0.0, 0.0), coverage)
    dx, dy = (float(np.median([s[j] for s in steps])) for j in (0, 1))
    return Reading(color, direction_of(dx, dy, MIN_STEP), (dx, dy), coverage)


def eval_prompts(n_per_triple: int = 2, held_out: bool = True, seed: int = 0) -> list[EvalPrompt]:
    """Single-object captions with a direction and a still camera. ``held_out=True``: the 12 (colour, shape,
    direction) triples never shown in training; else 12 seen ones."""
    rng = np.random.default_rng(seed)
    out = []
    for c, s, d in eval_triples(held_out, rng):
        color = list(OBJECT_COLORS)[c]
        for _ in range(n_per_triple):
            bg = str(rng.choice([n for n in BG_COLORS if n != color]))
            size = str(rng.choice(["", "big"]))
            first = size or color
            words = ["an" if first[0] in "aeiou" else "a"] + ([size] if size else [])
            prompt = " ".join(words + [color, SHAPES[s], "moves", DIRECTIONS[d]]) + f" over a {bg} world"
            spec = {"objects": [{"color": color, "shape": SHAPES[s], "motion": f"moves {DIRECTIONS[d]}",
                                 "size": size}], "bg_color": bg}
            out.append(EvalPrompt(prompt, color, SHAPES[s], DIRECTIONS[d], held_out, spec))
    return out


def score(prompts: list[EvalPrompt], videos: np.ndarray | torch.Tensor) -> dict:
    """videos: (N, F, H, W, 3) in [0, 1], one per prompt. Accuracies and per-video readings."""
    return score_with(read_video, prompts, videos)
