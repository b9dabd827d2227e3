"""Shared pytest setup: offline, W&B disabled, ``cuda``-marked tests skip cleanly without a GPU."""

from __future__ import annotations

import os

# Nothing downloads at test time and W&B never logs from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["SVG2_OFFLINE"] = "1"  # LPIPS backbones are never fetched (metrics.lpips_allow_download is on by default)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker); none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
