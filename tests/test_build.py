"""Building and loading the extension: a CPU-only build from a copy of the sources, and the
pure-PyTorch fallback when the compiled module is missing.

Both run in subprocesses from a copy in tmp_path, so they never touch the in-place build that the
other tests use. The build takes a minute or two on two cores.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import repo_root

ROOT = Path(repo_root())
BUILD_TIMEOUT_S = 600

# Prepended to every subprocess script. The checkout is usually installed in editable mode
# (pip install -e .), whose meta-path finder resolves `glow_ext._C` to the checkout's compiled module
# even when `glow_ext` itself is imported from the copy: drop it so that only the copy is seen.
ISOLATE = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
""")

# Run in the copy: checks that it imported the copy, then compares the ops with the reference.
CHECK_OPS = textwrap.dedent("""
    import os, sys, warnings
    import torch
    import glow_ext
    from glow_ext import ops, reference
    from glow_ext.nn import random_rotation_lu

    here = os.path.realpath(os.getcwd())
    assert os.path.realpath(glow_ext.__file__).startswith(here), (glow_ext.__file__, here)
    if glow_ext.ops._C is not None:
        assert os.path.realpath(glow_ext.ops._C.__file__).startswith(here), (glow_ext.ops._C.__file__, here)
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


def _copy_package(dest: Path, with_sources: bool) -> None:
    """glow_ext/ without compiled modules or caches; with the build inputs when with_sources."""
    shutil.copytree(ROOT / "glow_ext", dest / "glow_ext",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.pyc"))
    assert not list((dest / "glow_ext").glob("*.so"))
    if with_sources:
        shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=shutil.ignore_patterns("*.o", "__pycache__"))
        for name in ("setup.py", "pyproject.toml", "README.md"):
            if (ROOT / name).exists():
                shutil.copy2(ROOT / name, dest / name)
        if not (dest / "README.md").exists():  # pyproject.toml names it as the readme
            (dest / "README.md").write_text("# glow_ext\n")


def _env(**extra):
    env = dict(os.environ)
    # Neither the checkout nor an inherited path may shadow the copy.
    env.pop("PYTHONPATH", None)
    env.pop("GLOW_EXT_CUDA", None)
    # ninja (and the compiler wrappers torch finds) may live next to this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _run(args, cwd, timeout, **env):
    return subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _output(result):
    return f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"


def test_cpu_only_build_from_source(tmp_path):
    _copy_package(tmp_path, with_sources=True)
    build = _run([sys.executable, "setup.py", "build_ext", "--inplace"], tmp_path, BUILD_TIMEOUT_S,
                 GLOW_EXT_CUDA="0", MAX_JOBS=str(max(1, os.cpu_count() or 1)))
    assert build.returncode == 0, _output(build)
    assert "glow_ext build summary" in build.stdout, _output(build)
    assert "CUDA kernels no: disabled by GLOW_EXT_CUDA=0" in build.stdout, _output(build)
    assert "CPU kernels  yes" in build.stdout, _output(build)
    assert list((tmp_path / "glow_ext").glob("_C*.so")), "no extension module in glow_ext/"

    check = _run([sys.executable, "-W", "error::RuntimeWarning", "-c", ISOLATE + CHECK_OPS + textwrap.dedent("""
        assert info["cpu_kernels"] is True, info
        assert info["cuda_kernels"] is False, info
        assert info["cuda_archs"] == "", info
        assert info["torch_version"] == torch.__version__, info
        assert ops.kernels_available()
        assert hasattr(torch.ops.glow_ext, "actnorm_invconv_lu")
        if torch.cuda.is_available():  # a CPU-only build has no CUDA kernels to dispatch to
            try:
                ops.actnorm_invconv_lu(torch.randn(1, 2, 1, 1, device="cuda"),
                                       *[t.cuda() for t in (torch.zeros(2), torch.zeros(2),
                                         torch.arange(2), torch.zeros(2, 2), torch.zeros(2, 2),
                                         torch.zeros(2), torch.ones(2))])
            except (RuntimeError, NotImplementedError) as error:
                print("CUDA call refused:", str(error).splitlines()[0])
            else:
                raise AssertionError("a CPU-only build ran on CUDA")
        print("CPU_ONLY_OK")
    """)], tmp_path, 300)
    assert check.returncode == 0, _output(check)
    assert "OPS_OK" in check.stdout and "CPU_ONLY_OK" in check.stdout, _output(check)


def test_missing_extension_falls_back_to_reference_with_a_warning(tmp_path):
    _copy_package(tmp_path, with_sources=False)

    # The warning is a RuntimeWarning: turned into an error, the import fails.
    strict = _run([sys.executable, "-W", "error::RuntimeWarning", "-c", ISOLATE + "import glow_ext"], tmp_path, 300)
    assert strict.returncode != 0, _output(strict)
    assert "RuntimeWarning" in strict.stderr and "falls back" in strict.stderr, _output(strict)

    check = _run([sys.executable, "-c", ISOLATE + textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import glow_ext
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "could not be loaded" in messages[0] and "falls back" in messages[0], messages
        assert "reference" in messages[0], messages
        print("WARNED")
    """) + CHECK_OPS + textwrap.dedent("""
        assert not ops.kernels_available()
        assert info["cpu_kernels"] is False and info["cuda_kernels"] is False, info
        assert info["load_error"], info
        assert not hasattr(torch.ops.glow_ext, "actnorm_invconv_lu")
        # The fallback is the reference itself, autograd included.
        x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        perm, lower, upper, log_s, sign_s = random_rotation_lu(3, dtype=torch.float64)
        params = (torch.randn(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), perm,
                  lower, upper, log_s, sign_s)
        y, logdet = ops.actnorm_invconv_lu(x, *params)
        (y.square().sum() + logdet).backward()
        assert x.grad is not None
        layer = glow_ext.nn.ActNormInvConv2d(3).train()
        z = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(layer.reverse(layer(z)[0]), z, rtol=1e-4, atol=1e-4)
        print("FALLBACK_OK")
    """)], tmp_path, 300)
    assert check.returncode == 0, _output(check)
    for marker in ("WARNED", "OPS_OK", "FALLBACK_OK"):
        assert marker in check.stdout, _output(check)


def test_import_glow_ext_stays_light():
    """`import glow_ext` (and its models and compat layers) loads the library only: not the
    training application, the benchmarks, or their plotting and dataset dependencies."""
    script = textwrap.dedent("""
        import sys
        import glow_ext, glow_ext.models, glow_ext.compat
        heavy = [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "sklearn", "PIL")
                 or m.startswith(("glow_ext.training", "glow_ext.bench"))]
        print("HEAVY", sorted(heavy))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, _output(result)
    assert "HEAVY []" in result.stdout, _output(result)
