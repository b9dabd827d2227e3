"""prompts=vbench_augmented (issue 20, item 20): the prompts of the SVG2 paper's text-to-video evaluation, VBench's
GPT-augmented all_dimension_longer.txt, shipped under Apache-2.0 with its license and source, text unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from svg2.harness.prompts import PROMPT_DATA, load_prompts
from svg2.harness.schema import register_configs
from svg2.harness.validation import check_run_config

CONF = Path(__file__).resolve().parents[1] / "conf"
SOURCE_SHA256 = "58ed0665de52c1bdb4820af01327f5cc1138bedbeedcc63902751056f6bf5768"  # the file at VBench 4593814
VBENCH_DIMENSIONS = {"subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                     "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
                     "human_action", "color", "spatial_relationship", "scene", "temporal_style", "appearance_style",
                     "overall_consistency"}
register_configs()


def _prompts(**kw):
    return load_prompts(OmegaConf.create({"source": "builtin", "set": "vbench_augmented", "dimensions": None,
                                          "limit": None, **kw}))


def test_shipped_text_is_the_source_file_with_license_and_attribution():
    rows = [json.loads(line) for line in (PROMPT_DATA / "vbench_all_dimension_longer.jsonl").read_text().splitlines()]
    assert len(rows) == 946
    assert hashlib.sha256("\r\n".join(r["prompt"] for r in rows).encode()).hexdigest() == SOURCE_SHA256
    assert all(r["prompt_original"] and set(r["dimension"]) <= VBENCH_DIMENSIONS and r["dimension"] for r in rows)
    assert {d for r in rows for d in r["dimension"]} == VBENCH_DIMENSIONS
    assert "Apache License" in (PROMPT_DATA / "VBENCH_LICENSE").read_text()
    readme = (PROMPT_DATA / "README.md").read_text()
    assert "Vchitect/VBench" in readme and "all_dimension_longer.txt" in readme and SOURCE_SHA256 in readme


def test_every_prompt_loads_interleaved_by_dimension():
    prompts = _prompts()
    assert len(prompts) == 946 and len({p.text for p in prompts}) == 946  # none dropped by the interleave
    first = _prompts(limit=11)
    assert len({p.dimension for p in first}) == 11  # limit picks one prompt of each (first) dimension
    color = _prompts(dimensions=["color"])
    assert color and all(p.dimension == "color" for p in color)
    assert min(len(p.text) for p in prompts) > 200  # the long versions, not VBench's short prompts


def test_preset_composes_and_validates():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["prompts=vbench_augmented", "prompts.limit=2"])
    assert cfg.prompts.set == "vbench_augmented" and check_run_config(cfg) == []
