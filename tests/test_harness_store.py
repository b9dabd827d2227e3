"""Results store: atomic rows, no duplicates, failures retried, Parquet + JSONL mirrors, inf survives."""

from __future__ import annotations

import json
import math

import pandas as pd

from svg2.harness.store import ResultsStore, load_results


def test_write_skip_retry_and_mirrors(tmp_path):
    st = ResultsStore(tmp_path / "results")
    assert st.should_run("a")
    st.write({"key": "a", "status": "ok", "psnr": math.inf, "x": 1})
    st.write({"key": "b", "status": "failed", "error": "CUDA out of memory"})
    assert not st.should_run("a") and st.should_run("b") and not st.should_run("b", retry_failed=False)
    st.write({"key": "b", "status": "ok", "psnr": 30.0})  # a retry replaces the failed row
    df = pd.read_parquet(st.parquet_path)
    assert sorted(df["key"]) == ["a", "b"] and (df["status"] == "ok").all()
    assert df.set_index("key").loc["a", "psnr"] == math.inf
    lines = st.jsonl_path.read_text().splitlines()
    assert len(lines) == 2 and {json.loads(x)["key"] for x in lines} == {"a", "b"}
    assert not list(st.root.glob(".*tmp"))  # no temporary files left behind
    both = load_results(tmp_path)
    assert len(both) == 2 and both.set_index("key").loc["a", "psnr"] == math.inf


def test_partial_files_are_ignored(tmp_path):
    st = ResultsStore(tmp_path)
    st.write({"key": "a", "status": "ok"})
    (st.rows_dir / "broken.json").write_text('{"key": "bro')  # cannot happen with atomic writes; tolerated
    assert [r["key"] for r in st.rows()] == ["a"]
