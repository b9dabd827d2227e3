"""svg2's Hydra config groups, installed as the package ``svg2_conf`` (``svg2.harness.cli.config_dir``)."""
