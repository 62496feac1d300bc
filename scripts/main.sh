#!/usr/bin/env bash
# Installs everything on a fresh machine, then runs the main job: the op benchmark (writes
# benchmarks/results/ops-<device>.json; extra arguments go to it), then a Glow trained on the
# embedded digits data (runs/digits: checkpoints, metrics.jsonl, sample grids, summary.json with
# the test bits/dim; about 2-3 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# Keep freed buffers in the heap instead of returning them to the OS: otherwise whether each fresh
# output page-faults depends on the process's allocation history and timings turn bimodal.
export MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912
.venv/bin/python -m glow_ext bench-ops "$@"
.venv/bin/python -m glow_ext train --out runs/digits --force
