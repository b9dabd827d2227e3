"""``svg2-run``: one harness job, or a sweep with ``-m`` / an ``experiment=`` preset (``svg2.harness.cli``).

    svg2-run experiment=quickstart                  # CPU smoke sweep -> multirun/quickstart/{results,report}
    svg2-run model=wan2.1-t2v-1.3b method=svg2 method.cfg.top_p=0.8
    svg2-run -m method=dense,svg2 method.cfg.top_p=0.7,0.9 prompts.limit=4
    svg2-run --cfg job experiment=pareto            # print the composed config
"""

from svg2.harness.cli import main

if __name__ == "__main__":
    main()
