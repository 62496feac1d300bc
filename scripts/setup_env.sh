#!/usr/bin/env bash
# Sets up a fresh machine for glow_ext: a virtual environment in .venv with torch and the build and
# test tools, then builds the C++ (and, when torch is a CUDA build and nvcc exists, CUDA) kernels in
# place. Safe to re-run: finished steps are quick. Source it or run it; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
echo "== installing torch and the build/test tools (torch is a large download the first time)"
.venv/bin/python -m pip install -q --disable-pip-version-check \
  "torch>=2.4" numpy pytest pytest-benchmark expecttest setuptools wheel ninja scikit-learn pillow matplotlib hypothesis
echo "== building glow_ext (setup.py prints a build summary)"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e . \
  || { echo "glow_ext build failed: see the compiler output above" >&2; exit 1; }
.venv/bin/python -m glow_ext info
