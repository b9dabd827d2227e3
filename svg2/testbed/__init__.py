"""The project's testbed video model: quality evidence on attention that needs content-based look-ups.

A 20M-parameter diffusers ``WanTransformer3DModel`` trained with flow matching on procedural "world" clips
(textured objects that move fast, wrap around, bounce, duplicate and pass behind occluders, over a
textured world under a camera pan and zoom), shipped in ``weights/testbed/`` (see its MODEL_CARD.md).

``load_testbed_pipeline(variant="eval" | "long" | "quick", device, dtype)`` loads it; modules: ``data``
(clips and captions), ``model`` (config, 8-bit weight files, pipeline), ``train`` (budgeted, resumable
training stretches), ``structure`` (per-head concentration and locality of the exact attention).
"""

from svg2.testbed.model import TESTBED_POINTS, TestbedPipeline, load_testbed_pipeline

__all__ = ["TESTBED_POINTS", "TestbedPipeline", "load_testbed_pipeline"]
