"""Caption-adherence checker: read object colour and motion direction back from generated frames.

Relies on the renderer's contract (see ``svg2.mini.data``): objects are bright (max RGB channel >= 0.9)
and backgrounds dark (max channel <= 0.6). Segmentation is a brightness threshold between the two; the
object colour is the palette colour nearest to the median colour of the segmented pixels; the direction
is the sign of the dominant axis of a least-squares line through the per-frame mask centroids.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from svg2.mini.data import BG_COLORS, BG_STYLES, DIRECTIONS, OBJECT_COLORS, SHAPES, held_out_triples

__all__ = ["Reading", "read_video", "EvalPrompt", "eval_prompts", "score", "nearest_color", "direction_of",
           "eval_triples", "score_with"]

FG_THRESHOLD = 0.75  # between the background's max channel (0.6) and the objects' (>= 0.9)
MIN_DISPLACEMENT = 0.08  # in frame widths over the clip; the renderer's motions travel 0.35-0.5
_PALETTE_NAMES = list(OBJECT_COLORS)
_PALETTE = np.array(list(OBJECT_COLORS.values()), dtype=np.float32)


def nearest_color(rgb: np.ndarray) -> str:
    """The object palette colour nearest to ``rgb`` (3,)."""
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def direction_of(dx: float, dy: float, still_below: float) -> str | None:
    """left / right / up / down along the dominant axis of (dx, dy) (x right, y down); None if both are
    below ``still_below`` in magnitude."""
    if max(abs(dx), abs(dy)) < still_below:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def eval_triples(held_out: bool, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(colour, shape, direction) index triples of the adherence test: the 12 never shown in training
    (``held_out``), or 12 seen ones drawn with ``rng``."""
    held = sorted(held_out_triples())
    if held_out:
        return held
    rest = [t for t in itertools.product(range(len(_PALETTE_NAMES)), range(len(SHAPES)), range(len(DIRECTIONS)))
            if t not in set(held)]
    return [rest[i] for i in sorted(rng.choice(len(rest), size=len(held), replace=False))]


def score_with(read: Callable[[np.ndarray], Any], prompts: list[EvalPrompt],
               videos: np.ndarray | torch.Tensor) -> dict:
    """Accuracies and per-video readings of ``videos`` (N, F, H, W, 3) in [0, 1], one per prompt, read by
    ``read`` (a checker's ``read_video``: a dataclass with ``color`` and ``direction``)."""
    if isinstance(videos, torch.Tensor):
        videos = videos.float().cpu().numpy()
    rows = []
    for p, v in zip(prompts, videos):
        r = read(v)
        rows.append({"prompt": p.prompt, **dataclasses.asdict(r), "color_ok": r.color == p.color,
                     "direction_ok": r.direction == p.direction})
    n = max(len(rows), 1)
    return {
        "n": len(rows),
        "color_acc": sum(r["color_ok"] for r in rows) / n,
        "direction_acc": sum(r["direction_ok"] for r in rows) / n,
        "both_acc": sum(r["color_ok"] and r["direction_ok"] for r in rows) / n,
        "rows": rows,
    }


@dataclass
class EvalPrompt:
    prompt: str
    color: str
    shape: str
    direction: str
    held_out: bool
    spec: dict  # for the data module's scenes_from_spec (ground-truth renders)


@dataclass
class Reading:
    color: str | None  # nearest palette colour, None if no object was found
    direction: str | None  # left/right/up/down, None if the object does not move enough (or is absent)
    displacement: tuple[float, float]  # (dx, dy) over the clip, frame units, x right, y down
    coverage: float  # mean fraction of pixels segmented as object


def read_video(frames: np.ndarray) -> Reading:
    """frames: (F, H, W, 3) float in [0, 1]."""
    frames = np.asarray(frames, dtype=np.float32)
    F_, H, W, _ = frames.shape
    mask = frames.max(-1) > FG_THRESHOLD  # (F, H, W)
    coverage = float(mask.mean())
    min_px = max(2, int(0.002 * H * W))
    if mask.sum() < min_px:
        return Reading(None, None, (0.0, 0.0), coverage)
    color = nearest_color(np.median(frames[mask], axis=0))
    ys, xs = (np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W
    taus, cx, cy = [], [], []
    for f in range(F_):
        n = mask[f].sum()
        if n < min_px:
            continue
        taus.append(f / max(F_ - 1, 1))
        cx.append(float((mask[f].sum(0) * xs).sum() / n))
        cy.append(float((mask[f].sum(1) * ys).sum() / n))
    if len(taus) < max(2, F_ // 2):
        return Reading(color, None, (0.0, 0.0), coverage)
    dx = float(np.polyfit(taus, cx, 1)[0])
    dy = float(np.polyfit(taus, cy, 1)[0])
    return Reading(color, direction_of(dx, dy, MIN_DISPLACEMENT), (dx, dy), coverage)


def eval_prompts(n_per_triple: int = 4, held_out: bool = True, seed: int = 0) -> list[EvalPrompt]:
    """Single-object captions with a direction. ``held_out=True``: the 12 (colour, shape, direction)
    combinations never seen in training; else 12 seen combinations. Sizes small/medium, no camera pan."""
    rng = np.random.default_rng(seed)
    out = []
    for c, s, d in eval_triples(held_out, rng):
        color = _PALETTE_NAMES[c]
        for _ in range(n_per_triple):
            bg_color = str(rng.choice([n for n in BG_COLORS if n != color]))
            bg_style = str(rng.choice(BG_STYLES))
            size = str(rng.choice(["small", ""]))
            first = size or color
            article = "an" if first[0] in "aeiou" else "a"
            words = [article] + ([size] if size else []) + [color, SHAPES[s], "moves", DIRECTIONS[d]]
            prompt = " ".join(words) + f" over a {bg_style} {bg_color} background"
            spec = {"objects": [{"color": color, "shape": SHAPES[s], "motion": f"moves {DIRECTIONS[d]}",
                                 "size": size}], "bg_style": bg_style, "bg_color": bg_color}
            out.append(EvalPrompt(prompt, color, SHAPES[s], DIRECTIONS[d], held_out, spec))
    return out


def score(prompts: list[EvalPrompt], videos: np.ndarray | torch.Tensor) -> dict:
    """videos: (N, F, H, W, 3) in [0, 1], one per prompt. Returns accuracies and per-video readings."""
    return score_with(read_video, prompts, videos)
