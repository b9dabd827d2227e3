"""``svg2-report`` entry point (the code lives in analysis/report.py)."""

from analysis.report import main

if __name__ == "__main__":
    raise SystemExit(main())
