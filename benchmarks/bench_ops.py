#!/usr/bin/env python3
"""Op benchmark of glow_ext; the same as `python -m glow_ext bench-ops [options]`.

Run from a checkout: `python benchmarks/bench_ops.py --quick`. The checkout's glow_ext (built in
place) is used in preference to an installed one. The default output is
benchmarks/results/ops-<device>.json next to this file. The implementation is glow_ext/bench/ops.py.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "glow_ext" / "__init__.py").is_file():
    sys.path.insert(0, str(REPO))

from glow_ext.bench import ops as benchmark  # noqa: E402


def main(argv=None):
    return benchmark.main(argv, default_out_dir=HERE / "results")


if __name__ == "__main__":
    sys.exit(main())
