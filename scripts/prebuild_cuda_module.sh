#!/usr/bin/env bash
# Prebuilds the CUDA module on a CPU machine for the GPU machine, so that a GPU check spends its lease
# on the GPU instead of minutes of nvcc. The module uses CPython's limited API only, so one built
# with any Python 3.9+ here loads into the GPU machine's Python, as long as the torch matches
# (release and flavour: see glow_ext/_build.py's mismatch).
#
#     bash scripts/prebuild_cuda_module.sh
#
# Needs nvcc (CUDA 13.x for torch's cu130 build) and a C++ compiler; no GPU. It installs
# PREBUILD_TORCH (default torch==2.11.0, the GPU machine's torch: from PyPI it reports 2.11.0+cu130,
# CUDA 13.0) into .prebuild-venv (a large download the first time), builds for
# TORCH_CUDA_ARCH_LIST (default 9.0, the H200), and writes
#
#     .gpu-prebuilt/glow_ext/_C.abi3.so      the module
#     .gpu-prebuilt/glow_ext/_C.build.json   its metadata, checked by glow_ext before loading
#
# then loads it into that torch on the CPU (build_info and one op) as a check. For the GPU check,
# carry `.gpu-prebuilt` to the GPU machine (it is git-ignored) and copy both files into glow_ext/
# there before the check starts: `cp .gpu-prebuilt/glow_ext/_C.* glow_ext/`. The check can then
# skip its build when `python3 -c 'import glow_ext; assert glow_ext.build_info()["cuda_kernels"]'`
# passes; a module that does not fit the GPU machine's torch is refused with a warning naming both
# torch versions, so a fresh build is still needed then.
#
# Knobs: PREBUILD_PYTHON (default python3), PREBUILD_TORCH, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

VENV=.prebuild-venv
OUT_DIR=.gpu-prebuilt
TORCH_REQUIREMENT=${PREBUILD_TORCH:-torch==2.11.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "${PREBUILD_PYTHON:-python3}" -m venv "$VENV"
fi
echo "== installing $TORCH_REQUIREMENT into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQUIREMENT" numpy "setuptools>=64" ninja
"$VENV/bin/python" -c 'import sys, torch; print(f"   Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

echo "== building the CUDA module into $OUT_DIR/glow_ext"
rm -rf "$OUT_DIR"
# The build's temporary files go under build/, apart from the checkout's own in-place build.
GLOW_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VENV/bin/python" setup.py build_ext --build-lib "$OUT_DIR" --build-temp build/prebuild-cuda
# Less to carry to the GPU machine: the host code's debug info (Debian's Python compiles with -g) is
# most of the file; the kernels' -lineinfo lives in the CUDA fat binary and stays.
if command -v strip >/dev/null; then
  strip --strip-debug "$OUT_DIR/glow_ext/_C.abi3.so"
fi

echo "== loading it into $VENV's torch on the CPU"
CHECK_DIR=$(mktemp -d)
trap 'rm -rf "$CHECK_DIR"' EXIT
cp -r glow_ext "$CHECK_DIR/"
rm -f "$CHECK_DIR"/glow_ext/_C.*
cp "$OUT_DIR"/glow_ext/_C.abi3.so "$OUT_DIR"/glow_ext/_C.build.json "$CHECK_DIR/glow_ext/"
(cd "$CHECK_DIR" && PYTHONPATH="$CHECK_DIR" "$REPO/$VENV/bin/python" -W error::RuntimeWarning -c '
import glow_ext, torch
from glow_ext import ops, reference
from glow_ext.nn import random_rotation_lu
info = glow_ext.build_info()
assert info["cuda_kernels"] and info["module"].startswith("'"$CHECK_DIR"'"), info
x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
perm, lower, upper, log_s, sign_s = random_rotation_lu(8, dtype=torch.float64)
params = (torch.randn(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), perm, lower, upper, log_s, sign_s)
torch.testing.assert_close(ops.actnorm_invconv_lu(x, *params), reference.actnorm_invconv_lu(x, *params))
print("   loads:", info)
')
ls -l "$OUT_DIR"/glow_ext/
