"""svg2-report on a fixture results folder and on synthetic stores: tables (Markdown, LaTeX, CSV) with n / mean /
95% CI, ranking within one target density, the dense floor row, metric conventions, latency caveats (CPU,
overhead-bound), Pareto and quality-vs-density plots, corrupt / duplicate row warnings and --drop-failed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import pareto_front
from analysis.report import main
from analysis.tables import add_variants, natural_key, summarise, t_interval, to_markdown
from svg2.harness.store import ResultsStore

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "harness_results"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    src = tmp_path_factory.mktemp("fx") / "sweep"
    shutil.copytree(FIXTURE, src)
    assert main([str(src)]) == 0
    return src / "report"


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def test_tables(report):
    md = (report / "table1.md").read_text()
    header, body = _table(md)
    assert header == ["Model", "Method", "n", "PSNR ↑", "SSIM ↑", "LPIPS ↓", "Density", "Latency (s)", "Speedup"]
    assert [r[1] for r in body] == ["Dense", "SVG1", "SVG2 (p=0.5)", "SVG2 (p=0.9)"]  # dense first, natural order
    dense, svg1, p5, p9 = body
    assert dense[0] == "wan-fixture" and dense[2] == "2" and dense[3:6] == ["—", "—", "—"] and dense[-1] == "1.00x"
    # Means over the two prompts +- t(0.975, 1) * sd / sqrt(2): PSNR 30, 32 -> 31.00 +- 12.71.
    assert p9[2:] == ["2", "31.00 ± 12.71", "0.9100 ± 0.1271", "0.1100 ± 0.1271", "31.0%", "5.50 ± 6.35", "2.00x"]
    assert svg1[3] == "25.00 ± 12.71"
    assert "**" not in md  # no target density: nothing is ranked across densities
    assert "No row has a target density" in md and "Sparse density: the same over the sparse calls" in md
    tex = (report / "table1.tex").read_text()
    assert r"\begin{tabular}{llrrrrrrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\multirow{4}{*}{wan-fixture}" in tex and r"SVG2 (p=0.9) & 2 & 31.00 $\pm$ 12.71" in tex
    assert r"31.0\%" in tex and r"\caption{Quality and efficiency against dense attention. Mean $\pm$ 95\%" in tex
    s = pd.read_csv(report / "summary.csv")
    assert len(s) == 4 and set(s["speedup_source"]) == {"dense rows"} and (s["lpips_net"] == "alex").all()
    assert s.loc[s["variant"] == "SVG2 (p=0.9)", "psnr_ci"].round(2).tolist() == [12.71]
    mp4 = (report / "table1_mp4.md").read_text()
    assert "30.00" in mp4  # PSNR on decoded MP4s is a separate table


def test_plots_and_index(report):
    for name in ("pareto_wan-fixture", "quality_density_wan-fixture"):
        for ext in ("png", "svg"):
            p = report / f"{name}.{ext}"
            assert p.is_file() and p.stat().st_size > 5000
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (report / "pareto_wan-fixture.svg").read_text()
    for text in ("SVG1", "SVG2", "31%", "16%", "wan-fixture", "Pareto frontier"):  # legend, densities, frontier
        assert text in svg
    fails = (report / "failures.md").read_text()
    assert "OutOfMemoryError" in fails and "radial" in fails and "--drop-failed" in fails
    index = (report / "README.md").read_text()
    assert "8 finished rows, 1 failed" in index and "![pareto_wan-fixture](pareto_wan-fixture.png)" in index
    assert "store.retry_failed=true" in index and "svg2-report --drop-failed" in index
    assert "## Warnings" not in index


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_pareto_front():
    x = np.array([1.0, 2.0, 3.0, 2.5])
    y = np.array([30.0, 28.0, 20.0, 27.0])
    assert pareto_front(x, y).tolist() == [0, 1, 3, 2]
    assert pareto_front(x, np.array([0.1, 0.2, 0.3, 0.4]), higher_y=False).tolist() == [0, 1, 2]


def test_sparse_density_column_when_recorded():
    s = pd.DataFrame([
        dict(model="m", variant="Dense", is_dense=True, n=1, psnr=None, ssim=None, lpips=None, density=1.0,
             density_sparse=float("nan"), latency_s=2.0, speedup=1.0),
        dict(model="m", variant="SVG2", is_dense=False, n=1, psnr=25.0, ssim=0.8, lpips=None, density=0.44,
             density_sparse=0.15, latency_s=1.0, speedup=2.0),
    ])
    header, body = _table(to_markdown(s))
    assert "Sparse density" in header
    assert body[1][header.index("Sparse density")] == "15.0%"  # the sparse calls only; Density keeps all (44.0%)


# -- statistics ---------------------------------------------------------------------------------------------------

def test_t_interval():
    assert t_interval([30.0, 32.0]) == (2, 31.0, pytest.approx(12.706205))
    n, mean, ci = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (n, mean) == (5, 3.0) and ci == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5))
    assert t_interval([7.0])[:2] == (1, 7.0) and math.isnan(t_interval([7.0])[2])  # one video: no spread
    assert t_interval([float("nan"), 4.0, None])[:2] == (1, 4.0)
    n, mean, ci = t_interval([float("inf"), float("inf")])
    assert n == 2 and mean == math.inf and math.isnan(ci)
    assert t_interval([])[0] == 0


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 200):
        v = np.arange(df + 1, dtype=float) ** 1.5
        ci = t_interval(v)[2]
        expected = stats.t.ppf(0.975, df) * v.std(ddof=1) / math.sqrt(len(v))
        assert ci == pytest.approx(expected, rel=1e-5)


def test_natural_order():
    names = ["SVG2 (Cq=32, Ck=64)", "SVG2 (Cq=8, Ck=64)", "SVG2 (Cq=8, Ck=1000)", "SVG2 (target=0.3)",
             "SVG2 (target=0.15)", "SVG1"]
    assert sorted(names, key=natural_key) == ["SVG1", "SVG2 (Cq=8, Ck=64)", "SVG2 (Cq=8, Ck=1000)",
                                              "SVG2 (Cq=32, Ck=64)", "SVG2 (target=0.15)", "SVG2 (target=0.3)"]


# -- synthetic stores ---------------------------------------------------------------------------------------------

def _row(method: str, prompt: str, psnr: float | None, *, latency: float = 1.0, density: float = 0.5,
         sparse: float | None = None, target: float | None = None, knobs: dict | None = None, seed: int = 0,
         gpu: str = "NVIDIA H200", model: str = "m", status: str = "ok", **extra) -> dict:
    label = {"dense": "Dense", "dense_floor": "Dense floor (fp32 math SDPA)"}.get(method, method.upper())
    kw = dict(knobs or {})
    if target is not None:
        kw["target_density"] = target
    row = dict(model=model, method=method, method_label=label, prompt=prompt, prompt_id=prompt, seed=seed,
               status=status, psnr=psnr, ssim=None if psnr is None else psnr / 40, density=density,
               density_sparse=math.nan if sparse is None else sparse, latency_s=latency, gpu=gpu,
               method_stock=method == "dense", svg2_config_json="null", method_kwargs_json=json.dumps(kw),
               kernel_attention="auto", finished_at=1.0, **extra)
    row["key"] = f"{model}-{method}-{json.dumps(kw, sort_keys=True)}-{prompt}-{seed}-{gpu}".replace("/", "_")
    row["key"] = "".join(c if c.isalnum() or c in "-_." else "_" for c in row["key"])
    return row


def _store(path: Path, rows: list[dict]) -> Path:
    store = ResultsStore(path)
    for r in rows:
        store.write(r, consolidate=False)
    store.consolidate()
    return path


def _dense_rows(**kw) -> list[dict]:
    return [_row("dense", p, math.inf, latency=2.0, density=1.0, **kw) for p in ("p1", "p2")]


def _matched_rows() -> list[dict]:
    """A and B at targets 0.15 / 0.3; C reports 0.467 at every target (off target); a floor row."""
    rows = _dense_rows()
    for p, d in (("p1", 0.0), ("p2", 1.0)):
        rows += [_row("a", p, 20 + d, target=0.15, sparse=0.15, latency=1.0),
                 _row("b", p, 22 + d, target=0.15, sparse=0.152, latency=1.2),
                 _row("a", p, 30 + d, target=0.3, sparse=0.30, latency=1.5),
                 _row("b", p, 27 + d, target=0.3, sparse=0.29, latency=1.4),
                 _row("c", p, 35 + d, target=0.15, sparse=0.467, latency=0.9),
                 _row("c", p, 35 + d, target=0.3, sparse=0.467, latency=0.9),
                 _row("dense_floor", p, 60 + d, density=1.0, latency=3.0)]
    return rows


def test_ranking_within_one_target_density(tmp_path):
    store = _store(tmp_path / "results", _matched_rows())
    assert main([str(store), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "table1.md").read_text()
    header, body = _table(md)
    assert header[:4] == ["Model", "Method", "n", "Target"]
    names = [r[1] for r in body]
    assert names == ["Dense", "Dense floor (fp32 math SDPA)", "A (target=0.15)", "B (target=0.15)",
                     "C (target=0.15) †", "A (target=0.3)", "B (target=0.3)", "C (target=0.3) †"]
    col = header.index("PSNR ↑")
    by = dict(zip(names, body))
    assert by["Dense floor (fp32 math SDPA)"][3] == "floor" and by["A (target=0.15)"][3] == "15%"
    assert by["B (target=0.15)"][3] == ""  # the target once per group
    # Bold within a target: B wins at 0.15 although A at 0.3 and the off-target C have higher PSNR.
    assert by["B (target=0.15)"][col] == "**22.50 ± 6.35**" and by["A (target=0.15)"][col] == "20.50 ± 6.35"
    assert by["A (target=0.3)"][col].startswith("**30.50")
    assert "**" not in "".join(by["C (target=0.15) †"] + by["Dense floor (fp32 math SDPA)"])
    assert "C (target=0.15): 46.7%" in md and "not ranked" in md and "Dense floor: the same dense video" in md
    lat = header.index("Latency (s)")
    assert by["A (target=0.15)"][lat].startswith("**1.00") and "Warning" not in md  # GPU: latency is ranked
    s = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert s.loc[s["variant"] == "C (target=0.3)", "off_target"].item()
    assert not s.loc[s["variant"] == "B (target=0.3)", "off_target"].item()  # 0.29 is within 5% of 0.3
    svg = (tmp_path / "r" / "quality_density_m.svg").read_text()
    assert "dense floor" in svg and "Pareto frontier" in svg

    assert main([str(store), "--out", str(tmp_path / "d"), "--off-target", "drop"]) == 0
    md = (tmp_path / "d" / "table1.md").read_text()
    assert "C (target" not in md.split("\n\n", 1)[1] and "2 row(s) whose sparse density misses" in md


def test_density_tolerance_option(tmp_path, capsys):
    store = _store(tmp_path / "results", _matched_rows())
    assert main([str(store), "--out", str(tmp_path / "r"), "--density-tolerance", "0.01"]) == 0
    md = (tmp_path / "r" / "table1.md").read_text()
    assert "B (target=0.15) †" in md and "B (target=0.3) †" in md  # 0.152 and 0.29: over 1% off
    with pytest.raises(SystemExit):
        main([str(store), "--density-tolerance", "5"])
    assert "fraction in [0, 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="off_target='keep'"):
        summarise(pd.DataFrame(_matched_rows()), off_target="keep")


def test_cpu_latency_is_not_presented_as_a_result(tmp_path):
    cpu = "cpu:x86_64x2threads"
    rows = _dense_rows(gpu=cpu)
    for p in ("p1", "p2"):
        rows += [_row("a", p, 25.0, target=0.3, sparse=0.3, latency=3.0, gpu=cpu),
                 _row("b", p, 24.0, target=0.3, sparse=0.3, latency=1.0, gpu=cpu)]  # "3 x faster" on the CPU
    store = _store(tmp_path / "results", rows)
    out = tmp_path / "r"
    assert main([str(store), "--out", str(out)]) == 0
    md = (out / "table1.md").read_text()
    header, body = _table(md)
    assert "**Warning (m)**: latency measured on the CPU (cpu:x86_64x2threads)" in md
    for r in body:  # quality still ranked, latency and speedup not
        assert "**" not in r[header.index("Latency (s)")] + r[header.index("Speedup")]
    assert any("**" in r[header.index("PSNR ↑")] for r in body)
    assert not (out / "pareto_m.png").exists() and (out / "quality_density_m.png").is_file()
    assert "quality vs density" in (out / "quality_density_m.svg").read_text()
    assert "![quality_density_m](quality_density_m.png)" in (out / "README.md").read_text()


def test_model_names_with_dots_get_their_own_plots(tmp_path):
    # Path.with_suffix cut "wan2.1-t2v-14b" to "wan2": two models' plots overwrote each other as quality_density_wan2.
    rows = []
    for model in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        rows += _dense_rows(model=model)
        rows += [_row("a", p, 25.0, target=0.3, sparse=0.3, model=model) for p in ("p1", "p2")]
    out = tmp_path / "r"
    assert main([str(_store(tmp_path / "results", rows)), "--out", str(out)]) == 0
    index = (out / "README.md").read_text()
    for model in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        for kind in ("pareto", "quality_density"):
            assert (out / f"{kind}_{model}.png").is_file() and (out / f"{kind}_{model}.svg").is_file()
            assert f"![{kind}_{model}]({kind}_{model}.png)" in index
    assert not list(out.glob("*_wan2.png")) and not list(out.glob("*_wan2.1-t2v-1.png"))


def test_overhead_bound_run_is_flagged(tmp_path):
    rows = _dense_rows()
    for p in ("p1", "p2"):  # every sparse variant slower than dense on a GPU
        rows += [_row("a", p, 25.0, target=0.3, sparse=0.3, latency=2.5),
                 _row("b", p, 24.0, target=0.3, sparse=0.3, latency=2.2)]
    s = summarise(pd.DataFrame(rows))
    assert s["latency_caveat"].str.contains("no sparse variant is faster than dense").all()
    # Faster than dense, but the method's own timed components are 10% of the generation: overhead-bound.
    rows = _dense_rows()
    for p in ("p1", "p2"):
        rows += [_row("a", p, 25.0, target=0.3, sparse=0.3, latency=1.5, time_attention_ms=150.0)]
    s = summarise(pd.DataFrame(rows))
    assert s["latency_caveat"].str.contains("take 10% of the generation time").all()
    # Timed without a warm-up run: the first videos hold compilation and autotuning.
    rows = [{**r, "warmup_s": 0.0} for r in _dense_rows()]
    rows += [_row("a", p, 25.0, target=0.3, sparse=0.3, latency=1.0, warmup_s=0.0) for p in ("p1", "p2")]
    s = summarise(pd.DataFrame(rows))
    assert s["latency_caveat"].str.contains("without a warm-up run").all()
    rows = [{**r, "warmup_s": 3.0} for r in rows]
    assert summarise(pd.DataFrame(rows))["latency_caveat"].isna().all()


def test_metric_convention_in_caption(tmp_path):
    rows = [{**r, "metric_convention": "svg"} for r in _matched_rows()]
    md = to_markdown(summarise(pd.DataFrame(rows)))
    assert "Metric convention: svg." in md and "[svg]" not in md
    mixed = rows + [{**_row("a", p, 10.0, target=0.15, sparse=0.15), "metric_convention": "standard",
                     "key": f"std-{p}"} for p in ("p1", "p2")]
    s = summarise(pd.DataFrame(mixed))
    md = to_markdown(s)
    assert "Mixed metric conventions (standard: 1 row, svg: 8 rows)" in md
    assert "A (target=0.15) [standard]" in md and "A (target=0.15) [svg]" in md
    a_std = s[s["variant"] == "A (target=0.15) [standard]"]
    assert a_std["n"].item() == 2 and a_std["psnr"].item() == 10.0  # never averaged with the svg rows
    # Rows without the field (older stores) are reported without a convention line.
    assert "convention" not in to_markdown(summarise(pd.DataFrame(_matched_rows())))
    # Through a store, with per-frame lists beside the scalars.
    framed = [{**r, "psnr_frames": [r["psnr"]] * 3, "ssim_frames": [0.5, 0.6]} for r in rows]
    store = _store(tmp_path / "results", framed)
    assert main([str(store), "--out", str(tmp_path / "r")]) == 0
    assert "Metric convention: svg." in (tmp_path / "r" / "table1.md").read_text()


def test_duplicate_and_corrupt_rows_are_warned(tmp_path, capsys):
    a = _store(tmp_path / "a" / "results", _matched_rows())
    shutil.copytree(a, tmp_path / "b" / "results")  # the same rows in a second store
    (a / "rows" / "broken.json").write_text('{"status": "ok", "model"')  # a truncated file
    bad = _row("a", "p3", 20.0, target=0.15, sparse=0.15)
    bad["latency_s"] = None
    ResultsStore(a).write(bad)
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "1 unreadable (corrupt) row file(s)" in err and "broken.json" in err
    assert "1 row(s) marked ok have no model/method or no valid latency / density (corrupt)" in err
    assert "16 duplicate row(s)" in err
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "## Warnings" in readme and "duplicate" in readme
    _header, body = _table((tmp_path / "r" / "table1.md").read_text())
    assert {r[2] for r in body} == {"2"}  # each (prompt, seed) counted once


def test_drop_failed(tmp_path, capsys):
    src = tmp_path / "sweep"
    shutil.copytree(FIXTURE, src)
    store = src / "results"
    ResultsStore(store).consolidate()
    assert main([str(src)]) == 0 and (src / "report" / "failures.md").is_file()
    capsys.readouterr()
    assert main([str(src), "--drop-failed"]) == 0
    out = capsys.readouterr().out
    assert f"removed 1 failed row(s) from {store}" in out
    assert not (store / "rows" / "f1.json").exists() and (store / "dropped" / "f1.json").is_file()
    assert "failed" not in set(pd.read_parquet(store / "results.parquet")["status"])
    assert "8 finished rows, 0 failed" in (src / "report" / "README.md").read_text()
    assert not (src / "report" / "failures.md").exists()  # the earlier report's list is gone
    assert main([str(src), "--drop-failed"]) == 0
    assert f"removed 0 failed row(s) from {store}" in capsys.readouterr().out


def test_drop_failed_keeps_a_row_rewritten_meanwhile(tmp_path, monkeypatch):
    import svg2.harness.store as store_mod

    store = ResultsStore(tmp_path / "s")
    store.write(_row("a", "p1", None, status="failed"))
    key = next(store.rows_dir.glob("*.json"))
    real_replace = store_mod.os.replace

    def racing_replace(src, dst):  # a running job rewrites the row as ok between the read and the move
        if Path(src) == key:
            Path(src).write_text(json.dumps({**json.loads(Path(src).read_text()), "status": "ok"}))
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", racing_replace)
    assert store.drop_failed() == 0
    assert json.loads(key.read_text())["status"] == "ok" and not (store.root / "dropped" / key.name).exists()


def test_drop_failed_of_every_row_clears_the_snapshots(tmp_path):
    store = ResultsStore(tmp_path / "s")
    store.write(_row("a", "p1", None, status="failed"))
    assert store.parquet_path.is_file()
    assert store.drop_failed() == 1
    assert not store.parquet_path.exists() and not store.jsonl_path.exists()
    from svg2.harness.store import load_results

    assert load_results(store.root).empty  # the snapshot does not bring the failed row back


def test_jsonl_only_results_folder(tmp_path):
    """A committed results folder keeps only results.jsonl (e.g. results/mini/long_sweep)."""
    store = _store(tmp_path / "s", _matched_rows())
    committed = tmp_path / "committed"
    committed.mkdir()
    shutil.copy(store / "results.jsonl", committed / "results.jsonl")
    assert main([str(committed), "--out", str(tmp_path / "r")]) == 0
    assert "A (target=0.3)" in (tmp_path / "r" / "table1.md").read_text()
    assert main([str(committed), "--drop-failed"]) == 2  # no row files to edit


def test_gzipped_jsonl_results_folder(tmp_path):
    """results/ in the repository keeps the rows as results.jsonl.gz (e.g. results/testbed/method_table)."""
    import gzip

    store = _store(tmp_path / "s", _matched_rows())
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "results.jsonl.gz").write_bytes(gzip.compress((store / "results.jsonl").read_bytes()))
    assert main([str(committed), "--out", str(tmp_path / "r")]) == 0
    assert "A (target=0.3)" in (tmp_path / "r" / "table1.md").read_text()
    # the file itself, as a user copies it from a README, names the same store
    assert main([str(committed / "results.jsonl.gz"), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "table1.md").read_text() == (tmp_path / "r" / "table1.md").read_text()


def test_pareto_series_per_configuration(tmp_path):
    rows = _dense_rows()
    for cq in (32, 8):
        for ck in (64, 1000):
            for p_ in (0.5, 0.9):
                for prompt in ("p1", "p2"):
                    rows.append(_row("svg2", prompt, 20 + 10 * p_ + cq / 100 + ck / 10000, latency=1.0 + p_,
                                     density=0.2 + 0.3 * p_, knobs={"top_p": p_, "num_q_centroids": cq,
                                                                    "num_k_centroids": ck}))
    df = add_variants(pd.DataFrame(rows))
    sparse = df[df["method"] == "svg2"]
    assert sparse["variant"].nunique() == 8 and sparse["series"].nunique() == 4
    assert "SVG2 (Cq=8, Ck=64)" in set(sparse["series"]) and "SVG2 (Cq=8, Ck=64, p=0.5)" in set(sparse["variant"])
    store = _store(tmp_path / "results", rows)
    assert main([str(store), "--out", str(tmp_path / "r")]) == 0
    svg = (tmp_path / "r" / "pareto_m.svg").read_text()
    order = [svg.index(f"SVG2 (Cq={cq}, Ck={ck})") for cq, ck in ((8, 64), (8, 1000), (32, 64), (32, 1000))]
    assert order == sorted(order)  # legend in natural order: Cq=8 before Cq=32
    _h, body = _table((tmp_path / "r" / "table1.md").read_text())
    assert [r[1] for r in body][1:3] == ["SVG2 (Cq=8, Ck=64, p=0.5)", "SVG2 (Cq=8, Ck=64, p=0.9)"]


def test_random_lpips_backbone_and_mixed_revisions_are_said(tmp_path):
    rows = _dense_rows(git_rev="a" * 40, lpips_alex=0.0, lpips_alex_status="random_backbone")
    rows += [_row("a", p, 25.0, target=0.3, sparse=0.3, git_rev=rev * 40, lpips_alex=0.1,
                  lpips_alex_status="random_backbone") for p, rev in (("p1", "a"), ("p2", "b"))]
    out = tmp_path / "r"
    assert main([str(_store(tmp_path / "results", rows)), "--out", str(out)]) == 0
    index = (out / "README.md").read_text()
    assert "LPIPS: alex backbone **randomly initialised**" in index
    assert "rows come from 2 svg2 revisions (aaaaaaaa, bbbbbbbb)" in index
    one = _dense_rows(git_rev="c" * 40) + [_row("a", p, 25.0, target=0.3, sparse=0.3, git_rev="c" * 40,
                                                lpips_alex=0.1, lpips_alex_status="ok") for p in ("p1", "p2")]
    assert main([str(_store(tmp_path / "one", one)), "--out", str(tmp_path / "o")]) == 0
    index = (tmp_path / "o" / "README.md").read_text()
    assert "svg2 revisions" not in index and "LPIPS: alex backbone" in index and "randomly" not in index


def test_psnr_repooled_from_per_frame_values(tmp_path):
    """Item 2 of the harness issue: a PSNR pooling of the other convention is recomputed from the stored
    per-frame values, without regenerating; a row without them is refused, not silently kept."""
    from analysis.report import repool_psnr
    from svg2.harness.metrics import pooled_psnr

    frames = [10.0, 30.0]  # MSE 0.1 and 0.001
    rows = [_row("dense", "p1", math.inf, density=1.0, metric_convention="standard", psnr_frames=[120.0, 120.0]),
            _row("a", "p1", pooled_psnr(frames), target=0.3, sparse=0.3, metric_convention="standard",
                 psnr_frames=frames, psnr_pooling="video")]
    df = pd.DataFrame(rows)
    per_frame = repool_psnr(df, "frames")
    assert per_frame.loc[1, "psnr"] == pytest.approx(20.0)  # mean of the per-frame PSNRs
    assert df.loc[1, "psnr"] == pytest.approx(-10 * math.log10(0.0505))  # pooled: the input is left as it was
    assert per_frame.loc[1, "metric_convention"] == "standard+psnr:frames"
    assert repool_psnr(per_frame, "video").loc[1, "psnr"] == pytest.approx(df.loc[1, "psnr"])

    store = _store(tmp_path / "s", rows)
    assert main([str(store), "--out", str(tmp_path / "r"), "--psnr-pooling", "frames"]) == 0
    table = (tmp_path / "r" / "table1.md").read_text()
    assert "standard+psnr:frames" in table and "20.00" in table
    old = _store(tmp_path / "old", [_row("a", "p1", 20.0, target=0.3, sparse=0.3)])  # no per-frame values
    assert main([str(old), "--out", str(tmp_path / "r2"), "--psnr-pooling", "video"]) == 2
    with pytest.raises(ValueError, match="use one of"):
        repool_psnr(df, "yuv")
