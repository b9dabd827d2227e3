"""Prompt sets: built-in smoke set, subsets, file formats, I2V images checked before generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from svg2.harness.prompts import load_prompt_file, load_prompts


def _cfg(**kw):
    base = dict(source="builtin", set="smoke", path=None, image_dir=None, dimensions=None, limit=None)
    return OmegaConf.create({**base, **kw})


def test_builtin_set_limit_and_dimensions():
    all_p = load_prompts(_cfg())
    assert len(all_p) >= 16 * 2 and len({p.dimension for p in all_p}) == 16
    two = load_prompts(_cfg(limit=2))
    assert len(two) == 2 and two[0].dimension != two[1].dimension  # limit spreads over dimensions
    col = load_prompts(_cfg(dimensions=["color"]))
    assert col and all(p.dimension == "color" for p in col)
    with pytest.raises(KeyError, match="available"):
        load_prompts(_cfg(dimensions=["nope"]))
    with pytest.raises(KeyError, match="smoke"):
        load_prompts(_cfg(set="nope"))


def test_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    assert [p.text for p in load_prompt_file(tmp_path / "p.txt")] == ["a cat", "a dog"]
    (tmp_path / "v.json").write_text(json.dumps([{"prompt_en": "a cat", "dimension": ["color", "scene"]}]))
    (p,) = load_prompt_file(tmp_path / "v.json")
    assert p.text == "a cat" and p.dimension == "color"
    (tmp_path / "bad.json").write_text(json.dumps([{"nothing": 1}]))
    with pytest.raises(ValueError, match="prompt_en"):
        load_prompt_file(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        load_prompt_file(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        load_prompt_file(tmp_path / "missing.txt")


def test_i2v_images_are_checked(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    entries = [{"caption": "a cat", "image_name": "ok.png"}]
    (tmp_path / "i2v.json").write_text(json.dumps(entries))
    (p,) = load_prompts(_cfg(source="file", path=str(tmp_path / "i2v.json"), image_dir=str(tmp_path)), task="i2v")
    assert p.image.endswith("ok.png")
    for name, match in (("missing.png", "does not exist"), ("broken.png", "not a readable image")):
        (tmp_path / "i2v.json").write_text(json.dumps([{"caption": "a cat", "image_name": name}]))
        with pytest.raises((FileNotFoundError, ValueError), match=match):
            load_prompts(_cfg(source="file", path=str(tmp_path / "i2v.json"), image_dir=str(tmp_path)), task="i2v")
    with pytest.raises(ValueError, match="needs an image"):
        load_prompts(_cfg(limit=1), task="i2v")


def test_vbench_missing_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="pip install vbench"):
        load_prompts(_cfg(source="vbench", set="vbench"))


def test_builtin_i2v_smoke_set(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from PIL import Image

    from svg2.harness.prompts import load_prompts

    monkeypatch.setenv("SVG2_CACHE_DIR", str(tmp_path))
    cfg = OmegaConf.create({"source": "builtin", "set": "smoke_i2v", "dimensions": None, "limit": 3})
    ps = load_prompts(cfg, task="i2v")
    assert len(ps) == 3 and len({p.dimension for p in ps}) == 3
    for p in ps:
        with Image.open(p.image) as im:
            assert im.size == (832, 480)
    again = load_prompts(cfg, task="i2v")
    assert [p.image for p in again] == [p.image for p in ps]  # deterministic and cached
    a = (tmp_path / "prompt_images")
    assert len(list(a.glob("*.png"))) == 3 and not list(a.glob(".*"))  # no temporary files left


def test_builtin_sets_keep_every_prompt_when_dimensions_differ_in_size():
    # Interleaving once truncated every dimension to the smallest one's size: the testbed set (32 captions in
    # groups of 2-8) came out as 12 prompts, silently.
    from svg2.harness.prompts import _testbed_set

    full = {t for ts in _testbed_set().values() for t in ts}
    got = load_prompts(OmegaConf.create({"source": "builtin", "set": "testbed", "limit": None}))
    assert {p.text for p in got} == full and len(got) == len(full) == 32
    first = load_prompts(OmegaConf.create({"source": "builtin", "set": "testbed", "limit": 6}))
    assert len({p.dimension for p in first}) == 6  # limit still takes one of each dimension first
