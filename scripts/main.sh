#!/usr/bin/env bash
# Installs everything on a fresh machine, then runs the main job: the op benchmark
# (writes benchmarks/results/ops-<device>.json). Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m glow_ext bench-ops "$@"
