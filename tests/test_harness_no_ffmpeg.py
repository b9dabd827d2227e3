"""Without imageio-ffmpeg (as on an offline GPU box) a run still works: MP4 output and MP4 metrics are skipped
and the reason is recorded in every row, instead of imageio silently picking another writer and crashing."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from svg2.harness import runner, video
from tests.test_harness_run import TINY, _compose


def test_mp4_support_reports_missing_ffmpeg(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "imageio_ffmpeg" else real(n, *a))
    ok, why = video.mp4_support()
    assert not ok and "imageio-ffmpeg" in why
    with pytest.raises(RuntimeError, match="compare_on"):
        video.write_mp4("/tmp/never.mp4", np.zeros((2, 4, 4, 3)))


def test_run_without_ffmpeg_records_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "mp4_support", lambda: (False, "imageio-ffmpeg is not installed"))
    cfg = _compose([*TINY, "prompts.limit=1", "method=svg2", f"cache.dir={tmp_path / 'cache'}",
                    "metrics.compare_on=[memory,mp4]", "store.save_videos=true"])
    counts = runner.run_job(cfg, tmp_path / "results")
    assert counts["ok"] == 1 and counts["failed"] == 0
    (row,) = [json.loads(f.read_text()) for f in (tmp_path / "results" / "rows").glob("*.json")]
    assert row["mp4_skipped_reason"] == "imageio-ffmpeg is not installed"
    assert row["compared_on"] == "memory" and np.isfinite(row["psnr"])
    assert not list((tmp_path / "results").glob("videos/*.mp4"))
