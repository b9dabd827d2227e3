"""Prompt sets: our built-in VBench-style smoke set, VBench's augmented prompts the SVG2 authors evaluate on
(shipped, Apache-2.0: ``prompt_data/README.md``), VBench's own list, and user files (T2V and I2V).

Every loader returns a list of :class:`Prompt`; a file in the wrong format, or an I2V prompt whose image is
missing or unreadable, is an error before any generation starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Prompt", "BUILTIN_SETS", "load_prompts", "load_prompt_file", "find_vbench_info", "synthetic_image"]


@dataclass(frozen=True)
class Prompt:
    text: str
    dimension: str = "custom"
    image: str | None = None  # I2V: absolute path of the conditioning image

    @property
    def id(self) -> str:
        """Short stable id (for file names and row keys)."""
        h = hashlib.sha1(f"{self.text}\0{self.image or ''}".encode()).hexdigest()[:10]
        return f"{self.dimension[:16]}-{h}"


# Written for svg2 (not copied from VBench): a few prompts per VBench dimension, for smoke runs.
_SMOKE: dict[str, list[str]] = {
    "subject_consistency": [
        "a red fox trotting through fresh snow in a pine forest",
        "an old man reading a newspaper on a park bench",
    ],
    "background_consistency": [
        "a quiet harbour at dawn with fishing boats gently rocking",
        "a sunlit library hall with tall wooden shelves",
    ],
    "temporal_flickering": [
        "a still bowl of oranges on a kitchen table, soft window light",
        "a snow-covered mountain cabin under a clear blue sky",
    ],
    "motion_smoothness": [
        "a paper boat drifting down a narrow stream",
        "a ceiling fan slowly spinning in a warm room",
    ],
    "dynamic_degree": [
        "a surfer riding a large breaking wave",
        "a flock of starlings swirling over a field at sunset",
    ],
    "aesthetic_quality": [
        "a lantern-lit street in the rain, reflections on the cobblestones",
        "cherry blossoms falling over a calm pond, cinematic lighting",
    ],
    "imaging_quality": [
        "close-up of a hummingbird hovering at a purple flower",
        "macro shot of dew drops on a spider web in the morning",
    ],
    "object_class": ["a bicycle leaning against a brick wall", "a giraffe eating leaves from a tall tree"],
    "multiple_objects": ["a cat and a dog sitting side by side on a sofa", "a cup and a laptop on a wooden desk"],
    "human_action": ["a person juggling three balls in a park", "a woman painting on a canvas in a studio"],
    "color": ["a yellow umbrella in a grey crowd", "a blue car driving along a coastal road"],
    "spatial_relationship": ["a lamp to the left of a bookshelf", "a clock above a fireplace"],
    "scene": ["a busy train station at rush hour", "a desert canyon at golden hour"],
    "temporal_style": ["a city skyline at night, time-lapse", "a lighthouse on a cliff, slow camera pan left"],
    "appearance_style": ["a windmill in a tulip field, watercolor painting", "a sailing ship at sea, oil painting"],
    "overall_consistency": [
        "an astronaut walking on a red desert planet, two moons in the sky",
        "a robot watering plants in a greenhouse",
    ],
}

def _mini_set() -> dict[str, list[str]]:
    """Held-out captions of the project's mini model (svg2/mini): the prompts its weights can follow."""
    from svg2.mini.checker import eval_prompts

    out: dict[str, list[str]] = {}
    for p in eval_prompts(n_per_triple=1, held_out=True):
        out.setdefault(f"mini_{p.direction}", []).append(p.prompt)
    return out


def _testbed_set() -> dict[str, list[str]]:
    """Held-out captions of the project's testbed model (svg2/testbed): world clips it was never trained on,
    drawn with a seed no training stretch uses; grouped by the number of objects they name."""
    import torch

    from svg2.testbed.data import captions, sample_scenes

    scene = sample_scenes(32, torch.Generator().manual_seed(2_000_000_029), train=False)
    out: dict[str, list[str]] = {}
    for c in captions(scene):
        n = c.split(" over ")[0].count(" and ") + 1
        out.setdefault(f"testbed_{n}_objects", []).append(c)
    return out


def synthetic_image(text: str, size: tuple[int, int] = (832, 480)) -> Path:
    """A deterministic synthetic conditioning image for ``text`` (gradient background and a few shapes whose
    colours and places derive from the text's hash), cached as PNG under ``$SVG2_CACHE_DIR/prompt_images``.
    For I2V smoke runs only: it exercises the image path of a pipeline, it does not depict the caption."""
    import numpy as np
    from PIL import Image

    digest = hashlib.sha1(text.encode()).hexdigest()
    root = Path(os.environ.get("SVG2_CACHE_DIR", "~/.cache/svg2")).expanduser() / "prompt_images"
    path = root / f"{digest[:16]}_{size[0]}x{size[1]}.png"
    if path.is_file():
        return path
    rng = np.random.default_rng(int(digest[:12], 16))
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = top[None, None, :] * (1 - yy / h)[..., None] + bottom[None, None, :] * (yy / h)[..., None]
    for _ in range(3):
        cx, cy, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.05, 0.2) * h
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r if rng.uniform() < 0.5 else (
            (abs(xx - cx) < r) & (abs(yy - cy) < r))
        img[inside] = rng.uniform(0, 1, 3)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray((img * 255).astype(np.uint8)).save(tmp)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written image
    return path


# Sets shipped as prompt files in prompt_data/ (source, license and changes in prompt_data/README.md).
PROMPT_DATA = Path(__file__).resolve().parent / "prompt_data"
_FILE_SETS = {"vbench_augmented": "vbench_all_dimension_longer.jsonl"}


def _round_robin(prompts: list[Prompt]) -> list[Prompt]:
    """Prompts interleaved by dimension (one of each in turn, all kept), so that ``limit`` picks a spread."""
    by_dim: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_dim.setdefault(p.dimension, []).append(p)
    groups = list(by_dim.values())
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


BUILTIN_SETS: dict[str, dict[str, list[str]]] = {"smoke": _SMOKE}
# Built-in image-to-video smoke set: the first smoke prompt of every dimension with a synthetic image.
_IMAGE_SETS = {"smoke_i2v": lambda: {d: ts[:1] for d, ts in _SMOKE.items()}}
_LAZY_SETS = {"mini": _mini_set, "testbed": _testbed_set}  # built on first use (they import optional parts of svg2)

_TEXT_KEYS = ("prompt_en", "prompt", "caption", "text")
_IMAGE_KEYS = ("image", "image_path", "image_name", "file_name", "img")
_DIM_KEYS = ("dimension", "dimensions", "type")


def find_vbench_info() -> Path | None:
    """VBench's VBench_full_info.json from an installed ``vbench`` package, or None."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for cand in (Path(root) / "VBench_full_info.json", *Path(root).glob("**/VBench_full_info.json")):
            if cand.is_file():
                return cand
    return None


def _check_image(path: Path, where: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {str(path)!r} does not exist (set prompts.image_dir to the "
                                f"folder the image names are relative to)")
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
        raise ValueError(f"{where}: image {str(path)!r} is not a readable image ({type(e).__name__}: {e})") from e


def _entry(obj: Any, where: str, image_dir: Path | None, base: Path) -> Prompt:
    if isinstance(obj, str):
        text, dim, image = obj, "custom", None
    elif isinstance(obj, dict):
        text = next((obj[k] for k in _TEXT_KEYS if k in obj), None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: no prompt text; expected one of the keys {list(_TEXT_KEYS)}, got "
                             f"{sorted(obj)}")
        dim = next((obj[k] for k in _DIM_KEYS if k in obj), "custom")
        if isinstance(dim, list):
            dim = dim[0] if dim else "custom"
        image = next((obj[k] for k in _IMAGE_KEYS if k in obj), None)
    else:
        raise ValueError(f"{where}: expected a string or an object, got {type(obj).__name__}")
    img_path = None
    if image is not None:
        p = Path(str(image)).expanduser()
        if not p.is_absolute():
            p = (image_dir or base) / p
        img_path = str(p.resolve())
    return Prompt(text=text.strip(), dimension=str(dim), image=img_path)


def load_prompt_file(path: str | Path, image_dir: str | Path | None = None) -> list[Prompt]:
    """Read prompts from ``.txt`` (one a line, blank lines and ``#`` comments skipped), ``.json`` (a list, or
    ``{"prompts": [...]}``) or ``.jsonl``. Entries are strings or objects with a text key (prompt_en, prompt,
    caption, text), optionally a dimension and an image (resolved against ``image_dir``, else the file's
    folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    idir = Path(image_dir).expanduser() if image_dir else None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        items: list[Any] = [ln.strip() for ln in path.read_text().splitlines()
                            if ln.strip() and not ln.lstrip().startswith("#")]
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {str(path)!r} is not valid JSON: {e}") from e
        if isinstance(data, dict) and isinstance(data.get("prompts"), list):
            data = data["prompts"]
        if not isinstance(data, list):
            raise ValueError(f"prompt file {str(path)!r}: expected a JSON list of prompts (or {{'prompts': "
                             f"[...]}}), got {type(data).__name__}")
        items = data
    elif suffix == ".jsonl":
        items = []
        for i, ln in enumerate(path.read_text().splitlines(), 1):
            if ln.strip():
                try:
                    items.append(json.loads(ln))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON: {e}") from e
    else:
        raise ValueError(f"prompt file {str(path)!r}: unsupported extension {suffix!r}; use .txt, .json or .jsonl")
    prompts = [_entry(obj, f"{path} entry {i}", idir, path.parent) for i, obj in enumerate(items)]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def load_prompts(cfg: Any, *, task: str = "t2v") -> list[Prompt]:
    """Prompts selected by a ``PromptsConfig``-like node (``source``, ``set``, ``path``, ``image_dir``,
    ``dimensions``, ``limit``). For ``task="i2v"`` every prompt must carry a readable image."""
    source = cfg.source
    if source == "builtin" and cfg.set in _FILE_SETS:
        prompts = _round_robin(load_prompt_file(PROMPT_DATA / _FILE_SETS[cfg.set]))
    elif source == "builtin":
        if cfg.set in _LAZY_SETS and cfg.set not in BUILTIN_SETS:
            BUILTIN_SETS[cfg.set] = _LAZY_SETS[cfg.set]()
        if cfg.set in _IMAGE_SETS:  # images are attached after the selection below (only those used)
            prompts = [Prompt(t, d) for d, ts in _IMAGE_SETS[cfg.set]().items() for t in ts]
        elif cfg.set not in BUILTIN_SETS:
            known = sorted({*BUILTIN_SETS, *_LAZY_SETS, *_IMAGE_SETS, *_FILE_SETS})
            raise KeyError(f"unknown built-in prompt set {cfg.set!r}; available: {known}")
        else:
            prompts = [Prompt(t, d) for d, ts in BUILTIN_SETS[cfg.set].items() for t in ts]
        prompts = _round_robin(prompts)
    elif source == "vbench":
        path = cfg.get("path") or find_vbench_info()
        if path is None:
            raise FileNotFoundError(
                "prompts=vbench needs VBench's prompt list: `pip install vbench` (its VBench_full_info.json is "
                "found automatically) or pass prompts.path=/path/to/VBench_full_info.json")
        prompts = load_prompt_file(path, cfg.get("image_dir"))
    elif source == "file":
        if not cfg.get("path"):
            raise ValueError("prompts.source=file needs prompts.path=<file.txt|.json|.jsonl>")
        prompts = load_prompt_file(cfg.path, cfg.get("image_dir"))
    else:
        raise ValueError(f"unknown prompts.source {source!r}; use builtin, vbench or file")

    dims = cfg.get("dimensions")
    if dims:
        known = sorted({p.dimension for p in prompts})
        unknown = sorted(set(dims) - set(known))
        if unknown:
            raise KeyError(f"prompts.dimensions {unknown} not in this set; available: {known}")
        prompts = [p for p in prompts if p.dimension in set(dims)]
    if cfg.get("limit") is not None:
        prompts = prompts[: int(cfg.limit)]
    if source == "builtin" and cfg.set in _IMAGE_SETS:
        prompts = [Prompt(p.text, p.dimension, str(synthetic_image(p.text))) for p in prompts]
    if task == "i2v":
        for p in prompts:
            if p.image is None:
                raise ValueError(f"model task i2v needs an image per prompt; {p.text!r} has none (use an I2V "
                                 "prompt set, e.g. prompts=vbench_i2v prompts.path=... prompts.image_dir=...)")
    for p in prompts:
        if p.image is not None and task in ("i2v", "ti2v"):
            _check_image(Path(p.image), f"prompt {p.text!r}")
    return prompts
