"""Procedural text-to-video data: scenes of 1-3 moving shapes over varied backgrounds, with captions.

Everything is vectorised in torch so a GPU renders a training batch in milliseconds. Scene parameters are
drawn on the CPU from a seeded ``torch.Generator`` (deterministic on any device); rendering is plain
arithmetic on the target device. Coordinates are normalised: the frame spans [0, 1] x [0, 1], x to the
right, y downwards. A clip always spans the same scene time, so ``num_frames`` acts like a frame rate.

Contract the caption-adherence checker relies on: objects are bright and saturated (max RGB channel >= 0.9
in their interior) and backgrounds are dark (max channel <= ``BG_MAX_CHANNEL``), so a brightness threshold
segments objects exactly on rendered clips.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "OBJECT_COLORS",
    "BG_COLORS",
    "SHAPES",
    "MOTIONS",
    "DIRECTIONS",
    "BG_STYLES",
    "SIZES",
    "PAN_DIRS",
    "Scene",
    "sample_scenes",
    "scenes_from_spec",
    "render",
    "trajectories",
    "captions",
    "caption_vocabulary",
    "held_out_triples",
    "avoid_held_out",
    "draw_radius",
    "object_phrases",
]

# name -> RGB in [0, 1]. Objects: bright, saturated. Backgrounds: dark shades.
OBJECT_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.20, 0.90, 0.25),
    "blue": (0.25, 0.45, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.75, 0.30, 0.95),
    "orange": (1.00, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.15, 0.90, 0.90),
}
BG_COLORS: dict[str, tuple[float, float, float]] = {
    "gray": (0.32, 0.32, 0.32),
    "blue": (0.10, 0.16, 0.40),
    "green": (0.10, 0.32, 0.14),
    "red": (0.40, 0.10, 0.10),
    "purple": (0.28, 0.12, 0.36),
    "brown": (0.34, 0.22, 0.10),
}
BG_MAX_CHANNEL = 0.6
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "bounces", "grows", "shrinks", "rotates")
DIRECTIONS = ("left", "right", "up", "down")  # the first four motions, in order
BG_STYLES = ("flat", "gradient", "striped", "noisy")
SIZES = ("small", "", "big")  # caption word; "" = medium
SIZE_RADIUS = ((0.07, 0.09), (0.11, 0.14), (0.16, 0.19))
PAN_DIRS = ("", "left", "right", "up", "down")  # "" = no camera pan
MAX_OBJECTS = 3

_OBJ_NAMES = tuple(OBJECT_COLORS)
_BG_NAMES = tuple(BG_COLORS)
_OBJ_RGB = torch.tensor(list(OBJECT_COLORS.values()))
_BG_RGB = torch.tensor(list(BG_COLORS.values()))
# unit vectors of the four directions (x right, y down)
_DIR_VEC = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])


@functools.lru_cache(maxsize=1)
def held_out_triples() -> frozenset[tuple[int, int, int]]:
    """(colour, shape, direction) index triples never shown in training: the adherence test set.

    12 of the 128 combinations, fixed by a seed; no two held-out triples share (shape, direction) with
    colours one apart, so resampling a held-out colour to its neighbour always leaves the held-out set.
    """
    g = torch.Generator().manual_seed(1234)
    picked: list[tuple[int, int, int]] = []
    for idx in torch.randperm(len(_OBJ_NAMES) * len(SHAPES) * len(DIRECTIONS), generator=g).tolist():
        c, rest = divmod(idx, len(SHAPES) * len(DIRECTIONS))
        s, d = divmod(rest, len(DIRECTIONS))
        if any(s == s2 and d == d2 and abs(c - c2) % len(_OBJ_NAMES) in (1, len(_OBJ_NAMES) - 1)
               for c2, s2, d2 in picked):
            continue
        picked.append((c, s, d))
        if len(picked) == 12:
            break
    return frozenset(picked)


def avoid_held_out(color: torch.Tensor, shape: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """``color`` with every object that would show a held-out (colour, shape, direction) triple moved to the next
    colour (never held out with the same shape and direction, see :func:`held_out_triples`). Motions 0-3 must be
    the four ``DIRECTIONS``, in order. All (B, K) long."""
    held = torch.zeros(len(_OBJ_NAMES), len(SHAPES), len(DIRECTIONS), dtype=torch.bool)
    for c, s, d in held_out_triples():
        held[c, s, d] = True
    bad = (motion < 4) & held[color, shape, motion.clamp(max=3)]
    return torch.where(bad, (color + 1) % len(_OBJ_NAMES), color)


def draw_radius(size_class: torch.Tensor, size_radius: tuple[tuple[float, float], ...],
                g: torch.Generator) -> torch.Tensor:
    """Radii drawn uniformly in each object's ``size_radius[size_class]`` (lo, hi) range; shaped like
    ``size_class``."""
    lo = torch.tensor([a for a, _ in size_radius])[size_class]
    hi = torch.tensor([b for _, b in size_radius])[size_class]
    return lo + (hi - lo) * torch.rand(size_class.shape, generator=g)


def object_phrases(scene: Any, b: int, sizes: tuple[str, ...], motions: tuple[str, ...]) -> list[str]:
    """The caption of every active object of scene ``b`` in slot order, e.g. 'a small red circle moves left',
    'an orange cross bounces' (size "": medium). ``scene``: a batch with (B, K) ``active``, ``size_class``,
    ``color``, ``shape`` and ``motion`` (a :class:`Scene` or a testbed ``WorldScene``), indices into ``sizes``,
    the object colours, ``SHAPES`` and ``motions``."""
    out = []
    for k in range(scene.active.shape[1]):
        if not scene.active[b, k]:
            continue
        size, color = sizes[scene.size_class[b, k]], _OBJ_NAMES[scene.color[b, k]]
        first = size or color
        words = ["an" if first[0] in "aeiou" else "a"] + ([size] if size else [])
        out.append(" ".join(words + [color, SHAPES[scene.shape[b, k]], motions[scene.motion[b, k]]]))
    return out


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the text encoder's vocabulary)."""
    words: list[str] = ["a", "an", "and", "over", "background", "while", "the", "camera", "pans"]
    words += [s for s in SIZES if s]
    words += list(_OBJ_NAMES) + [c for c in _BG_NAMES if c not in _OBJ_NAMES]
    words += list(SHAPES) + list(BG_STYLES)
    for m in MOTIONS:
        words += [w for w in m.split() if w not in words]
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


@dataclass
class Scene:
    """Parameters of a batch of B scenes (all tensors on the CPU; K = MAX_OBJECTS object slots).

    active (B, K) bool; color, shape, size_class, motion (B, K) long; radius, x0, y0, disp, theta0, omega,
    bounce_h, bounce_n (B, K) float; bg_style, bg_color, pan (B,) long; bg_angle, stripe_period,
    stripe_phase, pan_speed (B,) float; noise (B, 1, 8, 8) float in [0, 1].
    """

    active: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    size_class: torch.Tensor
    motion: torch.Tensor
    radius: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    disp: torch.Tensor
    theta0: torch.Tensor
    omega: torch.Tensor
    bounce_h: torch.Tensor
    bounce_n: torch.Tensor
    bg_style: torch.Tensor
    bg_color: torch.Tensor
    bg_angle: torch.Tensor
    stripe_period: torch.Tensor
    stripe_phase: torch.Tensor
    pan: torch.Tensor
    pan_speed: torch.Tensor
    noise: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.active.shape[0]


def _u(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _layout(scene: Scene, g: torch.Generator) -> None:
    """Draw positions, displacements and motion constants consistent with each object's motion."""
    B, K = scene.active.shape
    r = scene.radius
    m = scene.motion
    disp = _u(g, (B, K), 0.35, 0.5)
    # Moving objects: start so the whole path stays inside the frame.
    lo, hi = 1.3 * r + 0.02, 1.0 - 1.3 * r - 0.02
    along_lo = torch.where((m == 0) | (m == 2), lo + disp, lo)  # left/up start far, move towards 0
    along_hi = torch.where((m == 0) | (m == 2), hi, hi - disp)
    along = along_lo + (along_hi - along_lo).clamp(min=0) * torch.rand((B, K), generator=g)
    across = lo + (hi - lo) * torch.rand((B, K), generator=g)
    free_x = lo + (hi - lo) * torch.rand((B, K), generator=g)
    free_y = lo + (hi - lo) * torch.rand((B, K), generator=g)
    horizontal = (m == 0) | (m == 1)
    vertical = (m == 2) | (m == 3)
    scene.x0 = torch.where(horizontal, along, torch.where(vertical, across, free_x))
    scene.y0 = torch.where(vertical, along, torch.where(horizontal, across, free_y))
    scene.disp = torch.where(horizontal | vertical, disp, torch.zeros_like(disp))
    # Bouncing: the floor is y0 (low in the frame), the object rises by bounce_h.
    bounce_h = _u(g, (B, K), 0.25, 0.45)
    floor = hi
    bounce = m == 4
    scene.y0 = torch.where(bounce, floor, scene.y0)
    scene.bounce_h = torch.where(bounce, torch.minimum(bounce_h, floor - lo), torch.zeros_like(bounce_h))
    scene.bounce_n = torch.randint(2, 4, (B, K), generator=g).float()
    scene.theta0 = _u(g, (B, K), 0.0, 2 * math.pi)
    sign = torch.where(torch.rand((B, K), generator=g) < 0.5, -1.0, 1.0)
    scene.omega = torch.where(m == 7, sign * _u(g, (B, K), 0.6 * math.pi, 1.2 * math.pi), torch.zeros(B, K))


def sample_scenes(batch_size: int, generator: torch.Generator, *, train: bool = True) -> Scene:
    """Draw ``batch_size`` random scenes. With ``train=True`` no object uses a held-out triple."""
    g, B, K = generator, batch_size, MAX_OBJECTS
    n_obj = 1 + torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), B, replacement=True, generator=g)
    active = torch.arange(K)[None, :] < n_obj[:, None]
    color = torch.randint(len(_OBJ_NAMES), (B, K), generator=g)
    shape = torch.randint(len(SHAPES), (B, K), generator=g)
    motion = torch.randint(len(MOTIONS), (B, K), generator=g)
    # a circle that rotates looks still: give it another motion
    motion = torch.where((shape == 0) & (motion == 7), torch.randint(0, 7, (B, K), generator=g), motion)
    if train:
        color = avoid_held_out(color, shape, motion)
    size_class = torch.randint(len(SIZES), (B, K), generator=g)
    radius = draw_radius(size_class, SIZE_RADIUS, g)
    bg_color = torch.randint(len(_BG_NAMES), (B,), generator=g)
    # never an object colour name equal to the background's ("a green square over a green background")
    bg_as_obj = torch.tensor([_OBJ_NAMES.index(n) if n in _OBJ_NAMES else -1 for n in _BG_NAMES])
    for _ in range(len(_BG_NAMES)):
        clash = ((color == bg_as_obj[bg_color][:, None]) & active).any(1)
        bg_color = torch.where(clash, (bg_color + 1) % len(_BG_NAMES), bg_color)
    scene = _empty_scene(B)
    scene.active, scene.color, scene.shape, scene.size_class = active, color, shape, size_class
    scene.motion, scene.radius, scene.bg_color = motion, radius, bg_color
    scene.bg_style = torch.randint(len(BG_STYLES), (B,), generator=g)
    scene.pan = torch.where(torch.rand(B, generator=g) < 0.25,
                            torch.randint(1, len(PAN_DIRS), (B,), generator=g), torch.zeros(B, dtype=torch.long))
    _fill_background(scene, g)
    _layout(scene, g)
    return scene


def _empty_scene(B: int) -> Scene:
    K = MAX_OBJECTS
    zf, zl = torch.zeros(B, K), torch.zeros(B, K, dtype=torch.long)
    return Scene(
        active=torch.zeros(B, K, dtype=torch.bool), color=zl, shape=zl.clone(), size_class=zl.clone(),
        motion=zl.clone(), radius=zf, x0=zf, y0=zf, disp=zf, theta0=zf, omega=zf, bounce_h=zf,
        bounce_n=zf, bg_style=torch.zeros(B, dtype=torch.long), bg_color=torch.zeros(B, dtype=torch.long),
        bg_angle=torch.zeros(B), stripe_period=torch.zeros(B), stripe_phase=torch.zeros(B),
        pan=torch.zeros(B, dtype=torch.long), pan_speed=torch.zeros(B), noise=torch.zeros(B, 1, 8, 8),
    )


def _fill_background(scene: Scene, g: torch.Generator) -> None:
    B = scene.batch_size
    scene.bg_angle = _u(g, (B,), 0.0, 2 * math.pi)
    # stripes: horizontal, vertical or diagonal
    scene.bg_angle = torch.where(scene.bg_style == 2,
                                 torch.randint(0, 4, (B,), generator=g).float() * (math.pi / 4), scene.bg_angle)
    scene.stripe_period = _u(g, (B,), 0.12, 0.25)
    scene.stripe_phase = _u(g, (B,), 0.0, 1.0)
    scene.pan_speed = _u(g, (B,), 0.25, 0.45)
    scene.noise = torch.rand((B, 1, 8, 8), generator=g)


def scenes_from_spec(specs: list[dict], generator: torch.Generator) -> Scene:
    """Scenes with chosen content: one dict per scene with keys ``objects`` (a list of dicts with
    ``color``, ``shape``, ``motion``, optional ``size``), ``bg_style``, ``bg_color``, optional ``pan``.
    Positions and the remaining constants are drawn from ``generator``.
    """
    B = len(specs)
    scene = _empty_scene(B)
    for b, spec in enumerate(specs):
        objs = spec["objects"]
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{MAX_OBJECTS} objects, got {len(objs)}")
        for k, o in enumerate(objs):
            scene.active[b, k] = True
            scene.color[b, k] = _OBJ_NAMES.index(o["color"])
            scene.shape[b, k] = SHAPES.index(o["shape"])
            scene.motion[b, k] = MOTIONS.index(o["motion"])
            scene.size_class[b, k] = SIZES.index(o.get("size", ""))
        scene.bg_style[b] = BG_STYLES.index(spec["bg_style"])
        scene.bg_color[b] = _BG_NAMES.index(spec["bg_color"])
        scene.pan[b] = PAN_DIRS.index(spec.get("pan", ""))
    scene.radius = draw_radius(scene.size_class, SIZE_RADIUS, generator)
    _fill_background(scene, generator)
    _layout(scene, generator)
    return scene


def captions(scene: Scene) -> list[str]:
    """One caption per scene, e.g. 'a small red circle moves left over a striped blue background'."""
    out = []
    for b in range(scene.batch_size):
        text = " and ".join(object_phrases(scene, b, SIZES, MOTIONS))
        text += f" over a {BG_STYLES[scene.bg_style[b]]} {_BG_NAMES[scene.bg_color[b]]} background"
        pan = PAN_DIRS[scene.pan[b]]
        if pan:
            text += f" while the camera pans {pan}"
        out.append(text)
    return out


def trajectories(scene: Scene, num_frames: int) -> dict[str, torch.Tensor]:
    """Per-frame object state: cx, cy, radius, theta, each (B, K, F)."""
    tau = torch.linspace(0.0, 1.0, num_frames)[None, None, :]
    m = scene.motion[..., None]
    d = scene.disp[..., None]
    dir_vec = _DIR_VEC[scene.motion.clamp(max=3)]  # (B, K, 2)
    moving = (m < 4).float()
    cx = scene.x0[..., None] + moving * dir_vec[..., 0, None] * d * tau
    cy = scene.y0[..., None] + moving * dir_vec[..., 1, None] * d * tau
    bounce = scene.bounce_h[..., None] * torch.sin(math.pi * scene.bounce_n[..., None] * tau).abs()
    cy = cy - bounce
    scale = torch.where(m == 5, 0.55 + 0.9 * tau, torch.where(m == 6, 1.45 - 0.9 * tau, torch.ones_like(tau)))
    radius = scene.radius[..., None] * scale
    theta = scene.theta0[..., None] + scene.omega[..., None] * tau
    return {"cx": cx, "cy": cy, "radius": radius, "theta": theta}


def _box(px: torch.Tensor, py: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # equilateral triangle pointing up (y down in image space, hence -py), circumradius-like size r
    k = math.sqrt(3.0)
    x = px.abs() - r
    y = -py + r / k
    flip = (x + k * y) > 0
    x2 = torch.where(flip, (x - k * y) / 2, x)
    y2 = torch.where(flip, (-k * x - y) / 2, y)
    x2 = x2 - torch.clamp(x2, min=-2 * r, max=torch.zeros_like(x2))
    return -torch.sqrt(x2**2 + y2**2) * torch.sign(y2)


def _sdf(shape: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    circle = torch.sqrt(lx**2 + ly**2) - r
    square = _box(lx, ly, 0.85 * r, 0.85 * r)
    tri = _triangle(lx, ly + 0.25 * r, 1.25 * r)
    cross = torch.minimum(_box(lx, ly, r, 0.36 * r), _box(lx, ly, 0.36 * r, r))
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, tri, cross)))


def render(scene: Scene, num_frames: int, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Render the scenes: returns (B, 3, F, H, W) float32 in [0, 1] on ``device``."""
    dev = torch.device(device)
    B, F_ = scene.batch_size, num_frames
    tau = torch.linspace(0.0, 1.0, F_, device=dev)
    v = ((torch.arange(height, device=dev) + 0.5) / height)[:, None].expand(height, width)
    u = ((torch.arange(width, device=dev) + 0.5) / width)[None, :].expand(height, width)
    px_scale = float(min(height, width))  # normalised distance -> pixels, for anti-aliasing

    # --- background, in world coordinates that scroll with the camera pan ---
    pan_vec = torch.cat([torch.zeros(1, 2), -_DIR_VEC], 0)[scene.pan].to(dev)  # content moves opposite
    off = pan_vec * scene.pan_speed.to(dev)[:, None]  # (B, 2)
    wu = u[None, None] + off[:, 0, None, None, None] * tau[None, :, None, None]  # (B, F, H, W)
    wv = v[None, None] + off[:, 1, None, None, None] * tau[None, :, None, None]
    ang = scene.bg_angle.to(dev)[:, None, None, None]
    proj = wu * torch.cos(ang) + wv * torch.sin(ang)
    gradient = 0.45 + 0.8 * (proj - proj.amin(dim=(-1, -2), keepdim=True)) / 1.5
    period = scene.stripe_period.to(dev)[:, None, None, None]
    phase = scene.stripe_phase.to(dev)[:, None, None, None]
    stripe = 0.5 + 0.5 * torch.tanh(4.0 * torch.sin(2 * math.pi * (proj / period + phase)))
    stripes = 0.5 + 0.85 * stripe
    grid = torch.stack([wu, wv], -1).reshape(B, F_, height * width, 2) * 2 - 1
    grid = grid * 0.45  # the 8x8 texture covers a little over twice the frame, so pans stay inside it
    noise = F.grid_sample(scene.noise.to(dev), grid, mode="bicubic", padding_mode="reflection",
                          align_corners=False).reshape(B, F_, height, width)
    noisy = 0.45 + 0.9 * noise.clamp(0, 1)
    style = scene.bg_style.to(dev)[:, None, None, None]
    factor = torch.where(style == 0, torch.ones_like(proj),
                         torch.where(style == 1, gradient, torch.where(style == 2, stripes, noisy)))
    bg_rgb = _BG_RGB.to(dev)[scene.bg_color.to(dev)]  # (B, 3)
    img = (bg_rgb[:, :, None, None, None] * factor[:, None]).clamp(0.0, BG_MAX_CHANNEL)

    # --- objects, painted in slot order ---
    tr = {k: t.to(dev) for k, t in trajectories(scene, F_).items()}
    obj_rgb = _OBJ_RGB.to(dev)[scene.color.to(dev)]  # (B, K, 3)
    for k in range(MAX_OBJECTS):
        if not bool(scene.active[:, k].any()):
            continue
        cx = tr["cx"][:, k, :, None, None]
        cy = tr["cy"][:, k, :, None, None]
        r = tr["radius"][:, k, :, None, None]
        th = tr["theta"][:, k, :, None, None]
        dx, dy = u[None, None] - cx, v[None, None] - cy
        lx = torch.cos(th) * dx + torch.sin(th) * dy
        ly = -torch.sin(th) * dx + torch.cos(th) * dy
        sdf = _sdf(scene.shape.to(dev)[:, k, None, None, None], lx, ly, r)
        alpha = (0.5 - sdf * px_scale).clamp(0.0, 1.0)
        alpha = alpha * scene.active.to(dev)[:, k, None, None, None].float()
        img = img * (1 - alpha[:, None]) + obj_rgb[:, k, :, None, None, None] * alpha[:, None]
    return img
