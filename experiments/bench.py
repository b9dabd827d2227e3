"""``svg2-bench``: kernel benchmarks. Dispatches to experiments/bench_kernels.py (owned by the kernels work)."""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        mod = importlib.import_module("experiments.bench_kernels")
    except ImportError as e:
        print(f"svg2-bench: the kernel benchmark (experiments/bench_kernels.py) is not available: {e}", file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    result = mod.main()
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
