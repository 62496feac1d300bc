#!/usr/bin/env bash
# Sets up a fresh machine for glow_ext: a virtual environment in .venv with torch, the build tools and
# the packages of every extra, then builds the C++ (and, when torch is a CUDA build and nvcc exists,
# CUDA) kernels in place. Safe to re-run: finished steps are quick. Source it or run it; PYTHON picks
# the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
echo "== installing torch and the build tools (torch is a large download the first time)"
.venv/bin/python -m pip install -q --disable-pip-version-check \
  "torch>=2.4" numpy "setuptools>=77" wheel ninja
# [all]: every extra of pyproject.toml (training, benchmarks, tests), so main.sh and test.sh run all.
echo "== building glow_ext with all its extras (setup.py prints a build summary)"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[all]" \
  || { echo "glow_ext install failed: see the compiler or pip output above" >&2; exit 1; }
.venv/bin/python -m glow_ext info
