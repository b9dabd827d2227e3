"""svg2-report on a fixture results folder: tables (Markdown, LaTeX, CSV) and Pareto plots, content checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.pareto import pareto_front
from analysis.report import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "harness_results"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    src = tmp_path_factory.mktemp("fx") / "sweep"
    shutil.copytree(FIXTURE, src)
    assert main([str(src)]) == 0
    return src / "report"


def test_tables(report):
    md = (report / "table1.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| Model | Method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | Density | Latency (s) | Speedup |"
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [r[1] for r in body] == ["Dense", "SVG1", "SVG2 (p=0.5)", "SVG2 (p=0.9)"]  # dense first, as the paper
    dense, svg1, p5, p9 = body
    assert dense[0] == "wan-fixture" and dense[2:5] == ["—", "—", "—"] and dense[-1] == "1.00x"
    # Means over the two prompts; speedup = mean dense latency (11 s) / mean method latency.
    assert p9[2:] == ["**31.00**", "**0.9100**", "**0.1100**", "31.0%", "5.50", "2.00x"]
    assert p5[6:] == ["**4.40**", "**2.50x**"] and svg1[2] == "25.00"
    tex = (report / "table1.tex").read_text()
    assert r"\begin{tabular}{llrrrrrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\multirow{4}{*}{wan-fixture}" in tex and r"SVG2 (p=0.9) & \textbf{31.00}" in tex and r"31.0\%" in tex
    s = pd.read_csv(report / "summary.csv")
    assert len(s) == 4 and set(s["speedup_source"]) == {"dense rows"} and (s["lpips_net"] == "alex").all()
    mp4 = (report / "table1_mp4.md").read_text()
    assert "30.00" in mp4  # PSNR on decoded MP4s is a separate table


def test_plots_and_index(report):
    for ext in ("png", "svg"):
        p = report / f"pareto_wan-fixture.{ext}"
        assert p.is_file() and p.stat().st_size > 5000
    assert (report / "pareto_wan-fixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (report / "pareto_wan-fixture.svg").read_text()
    for text in ("SVG1", "SVG2", "31%", "16%", "wan-fixture"):  # legend and density annotations
        assert text in svg
    fails = (report / "failures.md").read_text()
    assert "OutOfMemoryError" in fails and "radial" in fails
    index = (report / "README.md").read_text()
    assert "8 finished rows, 1 failed" in index and "![pareto_wan-fixture](pareto_wan-fixture.png)" in index


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_pareto_front():
    import numpy as np

    x = np.array([1.0, 2.0, 3.0, 2.5])
    y = np.array([30.0, 28.0, 20.0, 27.0])
    assert pareto_front(x, y).tolist() == [0, 1, 3, 2]
    assert pareto_front(x, np.array([0.1, 0.2, 0.3, 0.4]), higher_y=False).tolist() == [0, 1, 2]


def test_sparse_density_column_when_recorded():
    from analysis.tables import to_markdown

    s = pd.DataFrame([
        dict(model="m", variant="Dense", is_dense=True, psnr=None, ssim=None, lpips=None, density=1.0,
             density_sparse=float("nan"), latency_s=2.0, speedup=1.0),
        dict(model="m", variant="SVG2", is_dense=False, psnr=25.0, ssim=0.8, lpips=None, density=0.44,
             density_sparse=0.15, latency_s=1.0, speedup=2.0),
    ])
    lines = to_markdown(s).splitlines()
    assert "| Sparse density |" in lines[0]
    assert lines[3].split("|")[7].strip() == "15.0%"  # the sparse calls only; Density keeps all calls (44.0%)
