"""analysis.paired: paired differences between two configurations on the same captions and seeds."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.paired import load_rows, main, paired_differences


def _row(method: str, compensate: bool, density: float, prompt: str, seed: int, psnr: float, status="ok"):
    cfg = {"method": {"cfg": {"compensate": compensate, "target_density": density}}}
    return {"model": "m", "method": method, "config_json": json.dumps(cfg), "prompt_id": prompt, "seed": seed,
            "psnr": psnr, "ssim": psnr / 100, "status": status, "cfg_target_density": density}


def _frame(gain: dict[str, float]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(6):
        base = 15 + 3 * rng.standard_normal()  # caption spread: large, shared by both configurations
        for seed in (0, 1):
            for method, g in gain.items():
                noise = 0.1 * rng.standard_normal()
                rows.append(_row(method, False, 0.15, f"p{p}", seed, base))
                rows.append(_row(method, True, 0.15, f"p{p}", seed, base + g + noise))
    rows.append(_row("svg2", True, 0.15, "p0", 5, 99.0, status="failed"))  # failed rows never pair
    return pd.DataFrame(rows)


def test_paired_difference_removes_the_caption_spread():
    df = _frame({"svg2": 4.0, "positional": 0.0})
    res = {r["method"]: r for r in paired_differences(df, "compensate", ("true", "false"), ["method"], ("psnr",))}
    assert res["svg2"]["n"] == res["positional"]["n"] == 12
    assert res["svg2"]["mean"] == pytest.approx(4.0, abs=0.15) and res["svg2"]["favours_first"] == 12
    assert abs(res["positional"]["mean"]) < 0.15
    d = (df[(df.method == "svg2") & (df.status == "ok")].sort_values(["prompt_id", "seed"]))
    on = d[d.config_json.str.contains("true")].psnr.to_numpy()
    off = d[d.config_json.str.contains("false")].psnr.to_numpy()
    half = stats.t.ppf(0.975, 11) * np.std(on - off, ddof=1) / np.sqrt(12)
    assert res["svg2"]["ci95"] == pytest.approx(half)
    assert res["svg2"]["ci95"] < 0.2  # the unpaired spread (3 dB across captions) would swamp a 4 dB gain


def test_vary_method_and_bad_calls():
    df = _frame({"svg2": 4.0, "positional": 0.0})
    res = paired_differences(df, "method", ("svg2", "positional"), ["compensate"], ("psnr",))
    by = {r["compensate"]: r["mean"] for r in res}
    assert by["false"] == pytest.approx(0.0, abs=1e-9) and by["true"] == pytest.approx(4.0, abs=0.15)
    with pytest.raises(ValueError, match="cannot also be in --match"):
        paired_differences(df, "method", ("svg2", "positional"), ["method"])
    with pytest.raises(ValueError, match="values present"):
        paired_differences(df, "method", ("svg2", "radial"), ["compensate"])


def test_cli_reads_a_gzipped_jsonl(tmp_path, capsys):
    df = _frame({"svg2": 2.0})
    path = tmp_path / "results.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in df.to_dict("records"):
            f.write(json.dumps(r) + "\n")
    assert len(load_rows(path)) == len(df)
    assert main([str(path), "--vary", "compensate", "--values", "true,false", "--match", "method"]) == 0
    out = capsys.readouterr().out
    assert "| m | svg2 | psnr | +1.9" in out or "| m | svg2 | psnr | +2.0" in out
    assert "12/12" in out


def test_rows_that_differ_in_an_unmatched_knob_are_refused_not_picked():
    # svg2 has rows with and without compensation; "other" has no such knob: without a filter, which svg2 row
    # pairs with "other" would be arbitrary.
    df = _frame({"svg2": 4.0, "other": 0.0})
    with pytest.raises(ValueError, match=r"differ in \['compensate'\].*--where-first"):
        paired_differences(df, "method", ("svg2", "other"), [], ("psnr",))
    res = paired_differences(df, "method", ("svg2", "other"), [], ("psnr",),
                             where=({"compensate": "true"}, {"compensate": "false"}))
    assert res[0]["n"] == 12 and res[0]["mean"] == pytest.approx(4.0, abs=0.15)
    with pytest.raises(SystemExit) as exc:
        main(["/nonexistent", "--vary", "method", "--values", "a,b", "--where-first", "compensate"])
    assert exc.value.code == 2
