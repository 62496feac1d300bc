#!/usr/bin/env python3
"""The whole benchmark suite; the same as `python -m glow_ext bench --update-readme [options]`.

Run from a checkout: `python benchmarks/run_all.py` (CPU; `--device cuda` on a GPU machine,
`--quick` for a smoke run into a temporary folder). Writes benchmarks/results/{logdet,layers,e2e}-
<device>.json, the plots, SUMMARY-<device>.md, and the README's generated benchmark section (not with
--quick). The checkout's glow_ext (built in place) is used in preference to an installed one. The
implementation is glow_ext/bench/suite.py.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "glow_ext" / "__init__.py").is_file():
    sys.path.insert(0, str(REPO))

from glow_ext.bench import suite as bench_suite  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" not in argv and "--update-readme" not in argv:
        argv.append("--update-readme")
    return bench_suite.main(argv, default_out_dir=HERE / "results")


if __name__ == "__main__":
    sys.exit(main())
