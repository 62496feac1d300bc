#!/usr/bin/env bash
# Installs everything on a fresh machine, then runs the whole test suite (CUDA tests skip without a GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest tests -q -rs --durations=10 "$@"
