"""``svg2-run`` from a regular (non-editable) install: the wheel carries every package and the Hydra config
groups (``conf/`` as the package ``svg2_conf``), and the installed copy composes its config without the source
tree. Builds the wheel from a copy of the sources (the checkout stays clean) and imports the unpacked wheel in
a fresh interpreter run outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "svg2", "svg2_kernels", "conf", "experiments", "analysis")


def test_wheel_ships_the_configs_and_svg2_run_composes_from_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    wheels = tmp_path / "wheels"
    build = ("import sys; from setuptools import build_meta as b; "
             f"print(b.build_wheel({str(wheels)!r}))")
    wheels.mkdir()
    proc = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("svg2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    # every package of the source tree is in the wheel, and every config file
    for init in (ROOT / "svg2").rglob("__init__.py"):
        assert str(init.relative_to(ROOT)) in names, f"{init.parent.name} is missing from pyproject's packages"
    for yaml in (ROOT / "conf").rglob("*.yaml"):
        assert f"svg2_conf/{yaml.relative_to(ROOT / 'conf')}" in names, yaml
    # and the data files svg2 reads at run time (model.loader=random configs, shipped prompt sets)
    for data in (*(ROOT / "svg2/harness/arch_configs").rglob("*.json"), *(ROOT / "svg2/harness/prompt_data").iterdir()):
        assert str(data.relative_to(ROOT)) in names, data

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = (
        "import svg2, svg2_conf\n"
        "from pathlib import Path\n"
        "from svg2.harness.cli import config_dir\n"
        f"assert Path(svg2.__file__).is_relative_to({str(site)!r}), svg2.__file__\n"
        f"assert config_dir() == Path({str(site)!r}) / 'svg2_conf', config_dir()\n"
        "import sys\n"
        "sys.argv = ['svg2-run', '--cfg', 'job', 'experiment=quickstart']\n"
        "from experiments.run import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install's finder
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "name: quickstart" in proc.stdout and "method:" in proc.stdout
