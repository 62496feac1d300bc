"""Helpers of the build and install tests: copies of the package, subprocesses with a clean
environment, fresh virtual environments that see the running torch without downloading it."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from conftest import repo_root

ROOT = Path(repo_root())
BUILD_TIMEOUT_S = 900
TORCH_SITE = Path(torch.__file__).resolve().parent.parent  # the site-packages holding torch

# Prepended to every subprocess script. The checkout is usually installed in editable mode
# (pip install -e .), whose meta-path finder resolves `glow_ext._C` to the checkout's compiled module
# even when `glow_ext` itself is imported from elsewhere: drop it so that only the copy is seen.
ISOLATE = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
""")

# Checks that glow_ext and its kernels come from $EXPECT_ROOT, then compares the ops with the reference.
CHECK_OPS = textwrap.dedent("""
    import os, sys, warnings
    import torch
    import glow_ext
    from glow_ext import ops, reference
    from glow_ext.nn import random_rotation_lu

    here = os.path.realpath(os.environ.get("EXPECT_ROOT", os.getcwd()))
    assert os.path.realpath(glow_ext.__file__).startswith(here), (glow_ext.__file__, here)
    info = glow_ext.build_info()
    print("BUILD_INFO", info)

    torch.manual_seed(0)
    for shape in [(3, 5, 4, 4), (2, 40, 3, 3), (1, 257, 1, 2)]:
        C = shape[1]
        perm, lower, upper, log_s, sign_s = random_rotation_lu(C, dtype=torch.float64)
        params = (torch.randn(C, dtype=torch.float64), 0.1 * torch.randn(C, dtype=torch.float64),
                  perm, lower, upper, log_s, sign_s)
        x = torch.randn(shape, dtype=torch.float64)
        y, logdet = ops.actnorm_invconv_lu(x, *params)
        y_ref, logdet_ref = reference.actnorm_invconv_lu(x, *params)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logdet, logdet_ref, rtol=1e-10, atol=1e-10)
        x_back = ops.actnorm_invconv_lu_inverse(y, *params)
        torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            x_back, reference.actnorm_invconv_lu_inverse(y_ref, *params), rtol=1e-9, atol=1e-9)
    print("OPS_OK")
""")

# After CHECK_OPS: the compiled CPU kernels ran, and they live under $EXPECT_ROOT, built by setup.py.
CHECK_KERNELS = textwrap.dedent("""
    assert ops.kernels_available(), ops.LOAD_ERROR
    assert info["cpu_kernels"] is True and info["torch_version"] == torch.__version__, info
    assert os.path.realpath(info["module"]).startswith(here), (info["module"], here)
    assert os.path.basename(info["module"]) == "_C.abi3.so", info
    assert hasattr(torch.ops.glow_ext, "actnorm_invconv_lu")
    print("KERNELS_OK")
""")


def copy_package(dest: Path, with_sources: bool) -> None:
    """glow_ext/ without compiled modules or caches; with the build inputs when with_sources."""
    shutil.copytree(ROOT / "glow_ext", dest / "glow_ext",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.build.json", "__pycache__", "*.pyc"))
    if with_sources:
        shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=shutil.ignore_patterns("*.o", "__pycache__"))
        for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
            shutil.copy2(ROOT / name, dest / name)


def clean_env(**extra) -> dict:
    env = dict(os.environ)
    # Neither the checkout nor an inherited setting may leak into the copy's build or import.
    for name in ("PYTHONPATH", "GLOW_EXT_CUDA", "GLOW_EXT_JIT", "GLOW_EXT_CACHE_DIR", "CXX", "CUDA_HOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    # ninja (and the compiler wrappers torch finds) may live next to this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def run(args, cwd, timeout=300, env=None, **extra):
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env or clean_env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def output(result) -> str:
    return f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"


def make_venv(folder: Path, see_running_torch: bool) -> Path:
    """A fresh venv (with pip); see_running_torch: a .pth file appends the site-packages holding the
    running torch (and its dependencies), so nothing is downloaded. Returns its python."""
    created = run([sys.executable, "-m", "venv", folder], cwd=folder.parent, timeout=300)
    assert created.returncode == 0, output(created)
    python = folder / "bin" / "python"
    if see_running_torch:
        site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], folder.parent)
        Path(site.stdout.strip(), "zz_running_torch.pth").write_text(f"{TORCH_SITE}\n")
    return python


def write_script(folder: Path, name: str, text: str) -> Path:
    """An executable shell script (a fake nvcc or compiler)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(text))
    path.chmod(0o755)
    return path
