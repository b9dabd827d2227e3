"""``svg2-run``: one harness job, or a sweep with ``-m`` / an ``experiment=`` preset.

    svg2-run experiment=quickstart                  # CPU smoke sweep -> multirun/quickstart/{results,report}
    svg2-run model=wan2.1-t2v-1.3b method=svg2 method.cfg.top_p=0.8
    svg2-run -m method=dense,svg2 method.cfg.top_p=0.7,0.9 prompts.limit=4
    svg2-run --cfg job experiment=pareto            # print the composed config
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from svg2.harness.schema import register_configs

register_configs()

# An absolute path: the console script imports this module from a package, where Hydra would otherwise read
# "../conf" as a Python module path.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from svg2.harness.runner import run_from_hydra

    run_from_hydra(cfg)


if __name__ == "__main__":
    main()
