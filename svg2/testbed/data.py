"""Procedural "world" clips that force content-based, non-local attention (the testbed's training data).

Why these clips: to denoise a token a model should have to find *the same thing elsewhere in the clip*.
Every clip therefore has
- a textured world 4x the frame (fBm of several octaves in two dark colours, no flat areas) seen through a
  camera that pans (and sometimes zooms): background content recurs in every frame at a clip-specific
  offset;
- 1-6 objects with per-clip random textures (stripes, checker, dots, rings) painted in object coordinates,
  so a texture can only be copied from the object's other appearances; objects move fast (0.3-2 frame
  widths per clip), wrap around the frame edges (leave and re-enter) or bounce, and sometimes come as
  identical duplicates far apart;
- 0-2 occluders fixed in the world, which objects pass behind.

Contract the caption checker relies on (as in ``svg2.mini.data``): objects are bright (max RGB channel
>= 0.9 everywhere in their interior, textures mix the object colour towards white only); the world and the
occluders are dark (max channel <= ``BG_MAX_CHANNEL``).

Scene parameters are drawn on the CPU from a seeded ``torch.Generator`` (same clips on any device);
``render`` is vectorised torch arithmetic on the target device. Coordinates are in frame heights: a frame
spans x in [0, aspect], y in [0, 1] (y down); a clip spans scene time tau in [0, 1] whatever its frame
count, so the frame count acts like a frame rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from svg2.mini.data import BG_COLORS, OBJECT_COLORS, SHAPES, avoid_held_out, draw_radius, object_phrases

__all__ = [
    "MOTIONS",
    "SIZES",
    "PANS",
    "MAX_OBJECTS",
    "BG_MAX_CHANNEL",
    "WorldScene",
    "sample_scenes",
    "scenes_from_spec",
    "captions",
    "caption_vocabulary",
    "render",
    "object_tracks",
]

MOTIONS = ("moves left", "moves right", "moves up", "moves down", "bounces", "spins")
SIZES = ("small", "", "big")  # caption word; "" = medium
SIZE_RADIUS = ((0.06, 0.08), (0.09, 0.12), (0.13, 0.16))  # in frame heights
PANS = ("", "left", "right", "up", "down")  # "" = still camera
MAX_OBJECTS = 6
MAX_OCCLUDERS = 2
BG_MAX_CHANNEL = 0.6
WORLD_SIZE = 4.0  # world side in frame heights
NUM_TEXTURES = 4  # stripes, checker, dots, rings
_OBJ_NAMES = tuple(OBJECT_COLORS)
_BG_NAMES = tuple(BG_COLORS)
_OBJ_RGB = torch.tensor(list(OBJECT_COLORS.values()))
_BG_RGB = torch.tensor(list(BG_COLORS.values()))
_DIR_VEC = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # left, right, up, down
_WRAP_MARGIN = 0.2  # objects leave the frame completely before they re-enter


@dataclass
class WorldScene:
    """A batch of B scenes (CPU tensors; K = MAX_OBJECTS object slots, J = MAX_OCCLUDERS).

    Objects: active, color, shape, size_class, motion, texture (B, K) long; radius, x0, y0, speed, vx, vy,
    theta0, omega, tex_freq, tex_angle, tex_phase, tex_mix (B, K) float.
    World: bg_color, pan (B,) long; tint (B, 3) second dark colour; pan_speed, zoom (B,) float; cam_x, cam_y
    (B,) camera start (frame-centre, world units); fbm (B, 1, 64, 64) float seed texture.
    Occluders: occ_active (B, J) bool; occ_vertical (B, J) bool; occ_pos, occ_width (B, J) float (world
    units); occ_rgb (B, J, 3).
    """

    active: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    size_class: torch.Tensor
    motion: torch.Tensor
    texture: torch.Tensor
    radius: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    vx: torch.Tensor
    vy: torch.Tensor
    theta0: torch.Tensor
    omega: torch.Tensor
    tex_freq: torch.Tensor
    tex_angle: torch.Tensor
    tex_phase: torch.Tensor
    tex_mix: torch.Tensor
    bg_color: torch.Tensor
    tint: torch.Tensor
    pan: torch.Tensor
    pan_speed: torch.Tensor
    zoom: torch.Tensor
    cam_x: torch.Tensor
    cam_y: torch.Tensor
    fbm: torch.Tensor
    occ_active: torch.Tensor
    occ_vertical: torch.Tensor
    occ_pos: torch.Tensor
    occ_width: torch.Tensor
    occ_rgb: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.active.shape[0]

    def slice(self, idx: slice | list[int]) -> WorldScene:
        return WorldScene(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _u(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _draw_world(B: int, g: torch.Generator, aspect: torch.Tensor) -> dict[str, torch.Tensor]:
    """World colours, texture seed, camera path and occluders (everything but the objects)."""
    out: dict[str, torch.Tensor] = {}
    out["bg_color"] = torch.randint(len(_BG_NAMES), (B,), generator=g)
    out["tint"] = _u(g, (B, 3), 0.02, 0.35)  # second dark colour, blended in by the fBm
    out["fbm"] = torch.rand((B, 1, 64, 64), generator=g)
    pan = torch.randint(len(PANS), (B,), generator=g)
    pan = torch.where(torch.rand(B, generator=g) < 0.2, torch.zeros_like(pan), pan)
    out["pan"] = pan
    out["pan_speed"] = _u(g, (B,), 0.3, 1.2)  # frame heights per clip
    zoom = torch.exp(_u(g, (B,), -0.3, 0.3))
    out["zoom"] = torch.where(torch.rand(B, generator=g) < 0.3, zoom, torch.ones(B))
    # the camera path is centred in the world (4 frame heights): pan and zoom stay inside it
    pan_vec = torch.cat([torch.zeros(1, 2), _DIR_VEC], 0)[pan] * out["pan_speed"][:, None]
    out["cam_x"] = 0.5 * WORLD_SIZE - 0.5 * pan_vec[:, 0] + _u(g, (B,), -0.3, 0.3)
    out["cam_y"] = 0.5 * WORLD_SIZE - 0.5 * pan_vec[:, 1] + _u(g, (B,), -0.3, 0.3)
    J = MAX_OCCLUDERS
    n_occ = torch.multinomial(torch.tensor([0.45, 0.35, 0.2]), B, replacement=True, generator=g)
    out["occ_active"] = torch.arange(J)[None, :] < n_occ[:, None]
    out["occ_vertical"] = torch.rand((B, J), generator=g) < 0.5
    # occluders cross the frame's starting view (world units around the camera start)
    centre = torch.where(out["occ_vertical"], out["cam_x"][:, None], out["cam_y"][:, None])
    span = torch.where(out["occ_vertical"], aspect[:, None].expand(B, J), torch.ones(B, J))
    out["occ_pos"] = centre + (torch.rand((B, J), generator=g) - 0.5) * 0.8 * span
    out["occ_width"] = _u(g, (B, J), 0.05, 0.11)
    out["occ_rgb"] = _u(g, (B, J, 3), 0.05, 0.5)
    return out


def _draw_objects(B: int, g: torch.Generator, train: bool, aspect: torch.Tensor) -> dict[str, torch.Tensor]:
    K = MAX_OBJECTS
    out: dict[str, torch.Tensor] = {}
    n_obj = 1 + torch.multinomial(torch.tensor([0.12, 0.14, 0.18, 0.2, 0.18, 0.18]), B, replacement=True,
                                  generator=g)
    out["active"] = torch.arange(K)[None, :] < n_obj[:, None]
    color = torch.randint(len(_OBJ_NAMES), (B, K), generator=g)
    shape = torch.randint(len(SHAPES), (B, K), generator=g)
    motion = torch.randint(len(MOTIONS), (B, K), generator=g)
    motion = torch.where(torch.rand((B, K), generator=g) < 0.25, torch.randint(0, 4, (B, K), generator=g), motion)
    out["color"], out["shape"], out["motion"] = color, shape, motion
    size_class = torch.randint(len(SIZES), (B, K), generator=g)
    out["size_class"] = size_class
    out["radius"] = draw_radius(size_class, SIZE_RADIUS, g)
    out["x0"] = torch.rand((B, K), generator=g) * aspect[:, None]
    out["y0"] = torch.rand((B, K), generator=g)
    speed = _u(g, (B, K), 0.3, 2.0)  # frame heights per clip
    dvec = _DIR_VEC[motion.clamp(max=3)]
    ang = _u(g, (B, K), 0.0, 2 * math.pi)
    bounce = motion == 4
    spin = motion == 5
    out["vx"] = torch.where(bounce, speed * torch.cos(ang), torch.where(spin, 0.1 * speed * torch.cos(ang),
                                                                        speed * dvec[..., 0]))
    out["vy"] = torch.where(bounce, speed * torch.sin(ang), torch.where(spin, 0.1 * speed * torch.sin(ang),
                                                                        speed * dvec[..., 1]))
    out["theta0"] = _u(g, (B, K), 0.0, 2 * math.pi)
    sign = torch.where(torch.rand((B, K), generator=g) < 0.5, -1.0, 1.0)
    out["omega"] = torch.where(spin, sign * _u(g, (B, K), 1.0 * math.pi, 3.0 * math.pi),
                               sign * _u(g, (B, K), 0.0, 0.5 * math.pi))
    out["texture"] = torch.randint(NUM_TEXTURES, (B, K), generator=g)
    out["tex_freq"] = _u(g, (B, K), 0.6, 1.6)  # cycles per radius: >= 3 pixels a period at the quick point
    out["tex_angle"] = _u(g, (B, K), 0.0, math.pi)
    out["tex_phase"] = _u(g, (B, K), 0.0, 1.0)
    out["tex_mix"] = _u(g, (B, K), 0.4, 0.7)  # how far the pattern moves the colour towards its tint
    # duplicates: sometimes slot 1 copies slot 0's look (colour, shape, size, texture) elsewhere in the frame
    dup = (torch.rand(B, generator=g) < 0.2) & out["active"][:, 1]
    for key in ("color", "shape", "size_class", "radius", "texture", "tex_freq", "tex_angle", "tex_phase",
                "tex_mix"):
        out[key][:, 1] = torch.where(dup, out[key][:, 0], out[key][:, 1])
    out["x0"][:, 1] = torch.where(dup, (out["x0"][:, 0] + 0.5 * aspect) % aspect, out["x0"][:, 1])
    if train:  # after the duplicates, which copy a look onto another slot's motion
        out["color"] = avoid_held_out(out["color"], out["shape"], out["motion"])
    return out


def sample_scenes(batch_size: int, generator: torch.Generator, *, aspect: float = 1.0,
                  train: bool = True) -> WorldScene:
    """Draw ``batch_size`` random scenes for frames of width/height ``aspect``. With ``train=True`` no
    directional object uses a held-out (colour, shape, direction) triple (the adherence test set)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    asp = torch.full((batch_size,), float(aspect))
    parts = _draw_world(batch_size, generator, asp)
    parts.update(_draw_objects(batch_size, generator, train, asp))
    bg_as_obj = torch.tensor([_OBJ_NAMES.index(n) if n in _OBJ_NAMES else -1 for n in _BG_NAMES])
    for _ in range(len(_BG_NAMES)):  # no "a blue circle ... over a blue world"
        clash = ((parts["color"] == bg_as_obj[parts["bg_color"]][:, None]) & parts["active"]).any(1)
        parts["bg_color"] = torch.where(clash, (parts["bg_color"] + 1) % len(_BG_NAMES), parts["bg_color"])
    return WorldScene(**parts)


def scenes_from_spec(specs: list[dict], generator: torch.Generator, *, aspect: float = 1.0) -> WorldScene:
    """Scenes with chosen content: one dict per scene with ``objects`` (list of dicts with ``color``,
    ``shape``, ``motion``, optional ``size``), ``bg_color``, optional ``pan`` and ``zoom`` (default: a still
    camera); the rest (positions, speeds,
    textures, occluders) is drawn from ``generator``."""
    scene = sample_scenes(len(specs), generator, aspect=aspect, train=False)
    for b, spec in enumerate(specs):
        objs = spec["objects"]
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{MAX_OBJECTS} objects, got {len(objs)}")
        scene.active[b] = torch.arange(MAX_OBJECTS) < len(objs)
        for k, o in enumerate(objs):
            scene.color[b, k] = _OBJ_NAMES.index(o["color"])
            scene.shape[b, k] = SHAPES.index(o["shape"])
            m = MOTIONS.index(o["motion"])
            if m != int(scene.motion[b, k]):
                speed = float(torch.hypot(scene.vx[b, k], scene.vy[b, k]).clamp(min=0.3))
                if m < 4:
                    scene.vx[b, k], scene.vy[b, k] = (_DIR_VEC[m] * speed).tolist()
                scene.motion[b, k] = m
            size = SIZES.index(o.get("size", ""))
            lo, hi = SIZE_RADIUS[size]
            scene.size_class[b, k] = size
            scene.radius[b, k] = min(max(float(scene.radius[b, k]), lo), hi)
        scene.bg_color[b] = _BG_NAMES.index(spec["bg_color"])
        scene.pan[b] = PANS.index(spec.get("pan", ""))
        scene.zoom[b] = float(spec.get("zoom", 1.0))
    return scene


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the text encoder's vocabulary)."""
    words = ["a", "an", "and", "over", "world", "while", "the", "camera", "pans", "zooms", "in", "out"]
    words += [s for s in SIZES if s] + list(_OBJ_NAMES) + [c for c in _BG_NAMES if c not in _OBJ_NAMES]
    words += list(SHAPES)
    for m in MOTIONS:
        words += m.split()
    return list(dict.fromkeys(words))


def captions(scene: WorldScene) -> list[str]:
    """e.g. 'a small red circle moves left and a white cross bounces over a blue world while the camera
    pans up'. Every object is named (in slot order); textures are not: they must be read from the clip."""
    out = []
    for b in range(scene.batch_size):
        text = " and ".join(object_phrases(scene, b, SIZES, MOTIONS)) + f" over a {_BG_NAMES[scene.bg_color[b]]} world"
        pan = PANS[scene.pan[b]]
        cam = []
        if pan:
            cam.append(f"pans {pan}")
        z = float(scene.zoom[b])
        if abs(z - 1.0) > 1e-6:
            cam.append("zooms in" if z < 1.0 else "zooms out")
        if cam:
            text += " while the camera " + " and ".join(cam)
        out.append(text)
    return out


def _triangle_wave(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect x into [lo, hi] (bouncing)."""
    span = (hi - lo).clamp(min=1e-6)
    t = torch.remainder(x - lo, 2 * span)
    return lo + torch.where(t > span, 2 * span - t, t)


def object_tracks(scene: WorldScene, num_frames: int, aspect: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-frame object state in screen coordinates: cx, cy, theta (B, K, F) (frame heights)."""
    tau = torch.linspace(0.0, 1.0, num_frames)[None, None, :]
    x = scene.x0[..., None] + scene.vx[..., None] * tau
    y = scene.y0[..., None] + scene.vy[..., None] * tau
    r = scene.radius[..., None]
    m = _WRAP_MARGIN
    wrap_x = torch.remainder(x + m, aspect + 2 * m) - m
    wrap_y = torch.remainder(y + m, 1.0 + 2 * m) - m
    bounce = (scene.motion == 4)[..., None]
    cx = torch.where(bounce, _triangle_wave(x, r, aspect - r), wrap_x)
    cy = torch.where(bounce, _triangle_wave(y, r, 1.0 - r), wrap_y)
    theta = scene.theta0[..., None] + scene.omega[..., None] * tau
    return {"cx": cx, "cy": cy, "theta": theta}


def _box(px, py, bx, by):
    qx, qy = px.abs() - bx, py.abs() - by
    return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)


def _sdf(shape: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    circle = torch.sqrt(lx**2 + ly**2) - r
    square = _box(lx, ly, 0.85 * r, 0.85 * r)
    # equilateral triangle pointing up (y down): intersection of three half-planes
    k = math.sqrt(3.0)
    y = ly + 0.25 * r
    tri = torch.maximum(torch.maximum((k * lx - y) / 2, (-k * lx - y) / 2), y) - 0.55 * r
    cross = torch.minimum(_box(lx, ly, r, 0.36 * r), _box(lx, ly, 0.36 * r, r))
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, tri, cross)))


def _tint_of(col: torch.Tensor) -> torch.Tensor:
    """The pattern's second colour: white for coloured objects, pink for white ones (so the pattern
    shows); its max channel stays >= 0.9 and the object's own colour stays the nearest palette colour."""
    white = (col.amin(dim=1, keepdim=True) > 0.9).float()
    pink = torch.tensor([1.0, 0.62, 0.62], device=col.device).view(1, 3, *([1] * (col.dim() - 2)))
    return white * pink + (1 - white) * 0.97


def _texture(kind, lx, ly, r, freq, angle, phase) -> torch.Tensor:
    """Pattern value in [0, 1] in object coordinates (moves and rotates with the object)."""
    ux, uy = lx / r, ly / r
    a = ux * torch.cos(angle) + uy * torch.sin(angle)
    b = -ux * torch.sin(angle) + uy * torch.cos(angle)
    w = 2 * math.pi * freq
    stripes = 0.5 + 0.5 * torch.tanh(3.0 * torch.sin(w * a + 2 * math.pi * phase))
    checker = 0.5 + 0.5 * torch.tanh(3.0 * torch.sin(w * a) * torch.sin(w * b + 2 * math.pi * phase))
    fa, fb = torch.frac(freq * a + phase) - 0.5, torch.frac(freq * b) - 0.5
    dots = ((fa**2 + fb**2).sqrt() < 0.28).float()
    rings = 0.5 + 0.5 * torch.tanh(3.0 * torch.sin(w * torch.sqrt(ux**2 + uy**2) + 2 * math.pi * phase))
    return torch.where(kind == 0, stripes, torch.where(kind == 1, checker, torch.where(kind == 2, dots, rings)))


def _world_texture(scene: WorldScene, dev: torch.device, res: int) -> torch.Tensor:
    """(B, 1, res, res) fBm in [0, 1] over the whole world: four octaves of one random seed texture."""
    seed = scene.fbm.to(dev)
    acc = torch.zeros(seed.shape[0], 1, res, res, device=dev)
    total = 0.0
    for octave, size in enumerate((6, 12, 24, 48)):
        grid = F.interpolate(seed, size=(size, size), mode="area") if size < 64 else seed[..., :size, :size]
        # each octave sees another part of the seed, so octaves are not copies of each other
        grid = torch.roll(grid, shifts=(7 * octave, 13 * octave), dims=(-2, -1))
        up = F.interpolate(grid, size=(res, res), mode="bicubic", align_corners=False)
        amp = 0.55**octave
        acc += amp * (up - up.mean(dim=(-1, -2), keepdim=True)) / up.std(dim=(-1, -2), keepdim=True).clamp(min=1e-4)
        total += amp
    return torch.sigmoid(1.6 * acc / total)


def render(scene: WorldScene, num_frames: int, height: int, width: int,
           device: torch.device | str = "cpu", world_detail: float = 0.0) -> torch.Tensor:
    """Render the scenes: (B, 3, F, H, W) float32 in [0, 1] on ``device``.

    ``world_detail`` in [0, 1] (default 0: the data the shipped weights were trained on) multiplies the world's
    brightness by a texture with one independent random value per world texel of the seed (64 x 64 over the
    4-frame-wide world: about one texel per video token at the eval point), so a background token is told apart
    from its neighbours only by its own texel: denoising it at high noise then needs the same world point in
    other frames (a content look-up under the camera pan) rather than its smooth surroundings."""
    if not 0.0 <= world_detail <= 1.0:
        raise ValueError(f"world_detail={world_detail}: use a value in [0, 1] (0 = the original data)")
    dev = torch.device(device)
    B, F_ = scene.batch_size, num_frames
    aspect = width / height
    tau = torch.linspace(0.0, 1.0, F_, device=dev)
    sy = ((torch.arange(height, device=dev) + 0.5) / height)[:, None].expand(height, width)  # screen, [0, 1]
    sx = ((torch.arange(width, device=dev) + 0.5) / height)[None, :].expand(height, width)  # [0, aspect]

    # --- camera: screen point (sx, sy) at time tau -> world point ---
    pan_vec = torch.cat([torch.zeros(1, 2), _DIR_VEC], 0)[scene.pan].to(dev) * scene.pan_speed.to(dev)[:, None]
    zoom = 1.0 + (scene.zoom.to(dev)[:, None] - 1.0) * tau[None, :]  # (B, F): world units per screen unit
    cx = scene.cam_x.to(dev)[:, None] + pan_vec[:, 0, None] * tau[None, :]
    cy = scene.cam_y.to(dev)[:, None] + pan_vec[:, 1, None] * tau[None, :]
    wx = cx[..., None, None] + (sx - 0.5 * aspect)[None, None] * zoom[..., None, None]  # (B, F, H, W)
    wy = cy[..., None, None] + (sy - 0.5)[None, None] * zoom[..., None, None]

    # --- world: two dark colours blended by fBm, plus a finer fBm for texture everywhere ---
    tex = _world_texture(scene, dev, 192)
    grid = torch.stack([wx, wy], -1).reshape(B, F_ * height, width, 2) / WORLD_SIZE * 2 - 1
    val = F.grid_sample(tex, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    val = val.reshape(B, F_, height, width)
    fine = F.grid_sample(tex, (grid * 3.7).remainder(2.0) - 1.0, mode="bilinear", padding_mode="reflection",
                         align_corners=False).reshape(B, F_, height, width)
    base = _BG_RGB.to(dev)[scene.bg_color.to(dev)]  # (B, 3)
    tint = scene.tint.to(dev)
    mix = val[:, None]
    img = base[:, :, None, None, None] * (1 - mix) + tint[:, :, None, None, None] * mix
    img = img * (0.55 + 0.9 * fine[:, None])
    if world_detail > 0:
        texel = F.grid_sample(scene.fbm.to(dev), grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False).reshape(B, F_, height, width)
        img = img * (1.0 - world_detail + 2.0 * world_detail * texel[:, None])
    img = img.clamp(0.0, BG_MAX_CHANNEL)

    # --- objects, painted in slot order, in screen coordinates ---
    tr = {k: t.to(dev) for k, t in object_tracks(scene, F_, aspect).items()}
    obj_rgb = _OBJ_RGB.to(dev)[scene.color.to(dev)]  # (B, K, 3)
    px = 1.0 / height  # one pixel in frame heights, for anti-aliasing
    for k in range(MAX_OBJECTS):
        if not bool(scene.active[:, k].any()):
            continue
        ocx = tr["cx"][:, k, :, None, None]
        ocy = tr["cy"][:, k, :, None, None]
        th = tr["theta"][:, k, :, None, None]
        r = scene.radius[:, k].to(dev)[:, None, None, None]
        dx, dy = sx[None, None] - ocx, sy[None, None] - ocy
        lx = torch.cos(th) * dx + torch.sin(th) * dy
        ly = -torch.sin(th) * dx + torch.cos(th) * dy
        sd = _sdf(scene.shape[:, k].to(dev)[:, None, None, None], lx, ly, r)
        alpha = (0.5 - sd / px).clamp(0.0, 1.0) * scene.active[:, k].to(dev)[:, None, None, None].float()
        pat = _texture(scene.texture[:, k].to(dev)[:, None, None, None], lx, ly, r,
                       scene.tex_freq[:, k].to(dev)[:, None, None, None],
                       scene.tex_angle[:, k].to(dev)[:, None, None, None],
                       scene.tex_phase[:, k].to(dev)[:, None, None, None])
        towards_tint = (pat * scene.tex_mix[:, k].to(dev)[:, None, None, None])[:, None]
        col = obj_rgb[:, k, :, None, None, None]
        col = col + (_tint_of(col) - col) * towards_tint
        img = img * (1 - alpha[:, None]) + col * alpha[:, None]

    # --- occluders: dark textured bars fixed in the world, in front of everything ---
    for j in range(MAX_OCCLUDERS):
        if not bool(scene.occ_active[:, j].any()):
            continue
        vert = scene.occ_vertical[:, j].to(dev)[:, None, None, None]
        coord = torch.where(vert, wx, wy)
        along = torch.where(vert, wy, wx)
        dist = (coord - scene.occ_pos[:, j].to(dev)[:, None, None, None]).abs()
        half = 0.5 * scene.occ_width[:, j].to(dev)[:, None, None, None]
        a = ((half - dist) * height + 0.5).clamp(0.0, 1.0) * scene.occ_active[:, j].to(dev)[:, None, None, None]
        stripes = 0.75 + 0.25 * torch.sin(2 * math.pi * along / 0.07)
        col = scene.occ_rgb[:, j].to(dev)[:, :, None, None, None] * stripes[:, None]
        img = img * (1 - a[:, None]) + col * a[:, None]
    return img.clamp(0.0, 1.0)
