"""``svg2-run``: the Hydra entry of the harness (``experiments/run.py`` is its console script).

The config folder is found through the installed package ``svg2_conf`` (the repository's ``conf/``, shipped in
the wheel as package data; an editable install maps it to the source tree), so the command works from a
regular install as well as from a checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from svg2.harness.ranks import rank_policy
from svg2.harness.runner import run_job
from svg2.harness.session import RunSession

__all__ = ["config_dir", "run_from_hydra", "main"]


def config_dir() -> Path:
    """The folder holding ``config.yaml`` and the config groups (model, method, kernel, ...)."""
    try:
        import svg2_conf
    except ImportError:  # svg2 imported from a source tree that was never installed
        here = Path(__file__).resolve().parents[2] / "conf"
        if (here / "config.yaml").is_file():
            return here
        raise RuntimeError("svg2's config folder (package svg2_conf) is not installed: reinstall svg2 with "
                           "`pip install .` (or `pip install -e .` in a checkout)") from None
    path = Path(svg2_conf.__file__).resolve().parent
    if not (path / "config.yaml").is_file():
        raise RuntimeError(f"{path} holds no config.yaml: the svg2 install is incomplete; reinstall svg2")
    return path


def run_from_hydra(cfg: DictConfig, session: RunSession) -> dict[str, Any]:
    """One ``svg2-run`` job: join the process group (torchrun), resolve the store folder from Hydra's run or
    sweep dir, then :func:`~svg2.harness.runner.run_job`. Returns the counts and ``store_dir`` (the report
    callback collects the stores of the run from these return values)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    policy = rank_policy(cfg)
    policy.setup()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    if cfg.store.dir:
        store_dir = Path(os.path.expanduser(cfg.store.dir))
    else:
        store_dir = (Path(hc.sweep.dir) if multirun else out_dir) / "results"
    job_info = {"job_num": hc.job.num if multirun else 0, "override_dirname": hc.job.override_dirname or "default",
                "output_dir": str(out_dir)}
    store_dir = policy.shared_path(store_dir)
    counts = run_job(cfg, store_dir, job_info, out_dir=out_dir, session=session)
    print(f"[svg2-run] {job_info['override_dirname']}: {counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} already done -> {store_dir}", file=sys.stderr)
    return {**counts, "store_dir": str(store_dir)}


def main() -> None:
    """``svg2-run [overrides]``: one session (pipeline reuse) for every job this process runs."""
    import hydra

    from svg2.harness.schema import register_configs

    register_configs()
    session = RunSession()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def svg2_run(cfg: DictConfig) -> dict[str, Any]:
        return run_from_hydra(cfg, session)

    svg2_run()
