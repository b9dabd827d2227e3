"""experiments/bench_compensation.py runs on the CPU at its tiny shape and writes what the H200 run will."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_compensation.py"), "--tiny", "--configs",
                           "3x6", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["shape"]["seqlen"] == 48 and saved["density"] == 0.25
    rows = saved["results"][0]["rows"]
    expected = {"dense", "svg2", "svg2+lse", "svg2+comp", "svg2 layout reuse", "comp (torch)", "svg_ear",
                "ear probe+routing", "ear probe (torch)"}
    assert expected <= set(rows)
    assert all(rows[name]["ms"] > 0 for name in expected)
    assert rows["svg2+comp"]["lse"] == "torch" and rows["svg_ear"]["compensation"] == "torch"
    assert rows["svg_ear"]["probe"] == "torch"  # auto: torch until the fused probe is timed
    assert rows["comp (torch)"]["max_abs_diff_vs_call"] < 1e-5  # the timed step is the compensated call's work
    probe = rows["ear probe (torch)"]  # accuracy against the float64 definition, on the first heads
    assert probe["max_abs_diff_log_vs_f64"] < 1e-2 and probe["exact_fits"] >= probe["exact_fits_above_floor"] >= 0
    printed = proc.stdout
    assert "| (3, 6) | comp (torch) |" in printed and "% of the svg2 call" in printed
    assert saved["results"][0]["cq"] == 3


def test_tiny_benchmark_row_selection(tmp_path):
    """--no-ear drops the SVG-EAR rows; --comp-backends picks the step rows, and a backend that cannot run
    leaves a row with its error (the other rows still run); the svg2+comp rows report their overhead."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_compensation.py"), "--tiny", "--configs",
                           "3x6", "--no-ear", "--comp-backends", "torch,no_such_backend", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert "svg_ear" not in rows and "ear probe+routing" not in rows
    assert rows["comp (torch)"]["ms"] > 0
    assert rows["comp (no_such_backend)"]["ms"] is None and "unknown" in rows["comp (no_such_backend)"]["error"]
    assert "| (3, 6) | svg2+comp |" in proc.stdout and "| overhead |" in proc.stdout


def test_f64_probe_reference_matches_the_definition():
    """The bench's float64 probe reference (what the fused probe's accuracy is measured against on the H200)
    agrees with the tests' loop over the definition, and puts exact fits (one-key clusters) on the floor."""
    import math

    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    sys.path.insert(0, str(ROOT))
    from bench_compensation import ear_log_error_f64

    from tests.test_ear_probe import log_error_f64, probe_case

    qc, ks, vs, kc, vm, sizes = probe_case(n=2, s=120, d=16, cq=5, ck=9, dtype=torch.float32, max_size=20)
    got = ear_log_error_f64(qc, ks, vs, kc, vm, sizes, 0.25, heads=2, rows=2)
    want = log_error_f64(qc, ks, vs, sizes, 0.25)
    floor = math.log(1e-8)
    live = want > floor + 1e-3
    assert live.sum() > 20 and (got - want)[live].abs().max() < 1e-4
    assert (got[:, :, 5] == floor).all()  # the one-key cluster: E = 0 exactly
    assert (got[:, :, 3] == floor).all()  # the empty cluster


def test_count_ops_at_wan14b_shape_with_fake_tensors(tmp_path):
    """--count-ops counts triton_sorted's host work per (bias, walk) mode at Wan 14B (B=1, H=40, S=75,600, D=128,
    (300, 1000)) without a GPU: the default (fp32 bias table + host list) materialises the (H, Cq, CK_PAD) fp32
    table; the modes without the host list do a fraction of the ops, and the skip-byte modes write no (Cq, Ck)
    table at all."""
    sys.path.insert(0, str(ROOT / "experiments"))
    sys.path.insert(0, str(ROOT))
    from bench_compensation import main

    report = main(["--count-ops", "--configs", "300x1000", "--out", str(tmp_path / "ops.json")])
    modes = report["results"][0]["modes"]
    saved = json.loads((tmp_path / "ops.json").read_text())
    assert set(saved["results"][0]["modes"]) == set(modes) == {"table list", "table all", "table bits", "skip list",
                                                               "skip all", "skip bits"}
    table_bytes = 40 * 300 * 1024 * 4  # the padded fp32 bias table
    assert modes["table list"]["largest_host_mb"] * 2**20 >= table_bytes * 0.999
    assert modes["table list"]["ops"].count("svg2_kernels.compensation_attention_sorted") == 1
    for mode in ("skip list", "skip all", "skip bits"):
        assert modes[mode]["largest_host_mb"] * 2**20 < 40 * 300 * 1000 * 4 * 0.6  # no (Cq, Ck) fp32 table
        assert "aten.abs" not in modes[mode]["ops"]  # no isfinite of a bias table
    assert "aten.where" not in modes["skip all"]["ops"]  # no bias table built
    assert modes["skip all"]["ops"] == modes["skip bits"]["ops"]
    assert modes["table all"]["ops"] == modes["table bits"]["ops"]
    n = {m: w["aten_ops"] for m, w in modes.items()}
    assert n["skip all"] <= 7 < n["table all"] <= 12 < n["skip list"] < n["table list"]
    mb = {m: w["host_mb"] for m, w in modes.items()}
    assert mb["skip all"] < mb["skip list"] < mb["table all"] < mb["table list"]
