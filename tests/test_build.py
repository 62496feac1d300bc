"""Building, installing and loading the extension, as a user would: a wheel built without isolation
installed into a fresh venv with no compiler on PATH; a plain `pip install` of an sdist (isolated
build) against the torch already installed; the just-in-time build; kernels built for another torch;
no kernels at all.

Everything runs in subprocesses on copies in tmp_path, never touching the in-place build that the
other tests use. The `slow` tests compile the CPU kernels once each (a minute or two on two cores);
CI runs them (it runs the whole suite).
"""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import glow_ext
from glow_ext import _build, ops

from build_helpers import (BUILD_TIMEOUT_S, CHECK_KERNELS, CHECK_OPS, ISOLATE, ROOT, TORCH_SITE, clean_env,
                           copy_package, make_venv, output, run, write_script)

CPU_TORCH = "torch==2.13.0+cpu"  # a small CPU-only torch, when the pip index has it locally


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_loads_without_a_compiler(tmp_path):
    source = tmp_path / "src"
    copy_package(source, with_sources=True)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", tmp_path / "dist",
                 "."], source, BUILD_TIMEOUT_S, GLOW_EXT_CUDA="0", MAX_JOBS=str(os.cpu_count() or 1))
    assert built.returncode == 0, output(built)
    (wheel,) = (tmp_path / "dist").glob("glow_ext-*.whl")
    assert f"-{_build.LIMITED_API_TAG}-abi3-" in wheel.name, wheel.name  # one wheel for every Python version
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("glow_ext/_C.abi3.so", "glow_ext/_C.build.json", "glow_ext/csrc/ops.cpp",
                     "glow_ext/csrc/python_module.cpp", "glow_ext/csrc/cpu/actnorm_invconv_cpu.cpp",
                     "glow_ext/_build.py", "glow_ext/_loader.py"):
        assert expected in names, names
    assert [n for n in names if n.startswith("glow_ext/_C.") and n.endswith(".so")] == ["glow_ext/_C.abi3.so"], names
    metadata = json.loads(zipfile.ZipFile(wheel).read("glow_ext/_C.build.json"))
    assert metadata["torch_version"] == torch.__version__ and metadata["cuda_kernels"] is False, metadata
    assert metadata["module_file"] == "_C.abi3.so" and metadata["python_abi"] == "abi3", metadata

    python = make_venv(tmp_path / "venv", see_running_torch=True)
    installed = run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    assert installed.returncode == 0, output(installed)
    # PATH holds the venv's bin only: no compiler, no ninja; cwd is not the source copy.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(PATH=str(python.parent), EXPECT_ROOT=str(tmp_path / "venv"))
    check = run([python, "-W", "error::RuntimeWarning", "-c", textwrap.dedent("""
        import shutil
        assert shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("gcc") is None
    """) + CHECK_OPS + CHECK_KERNELS], elsewhere, env=env)
    assert check.returncode == 0, output(check)
    assert "KERNELS_OK" in check.stdout, output(check)


def _user_venv(folder):
    """(python, torch version, is the CPU-only torch) of a 'user' venv: torch 2.13.0+cpu (another
    version and flavour than the running torch) when pip has it without downloading, its
    dependencies from the running torch's site-packages; else the running torch itself."""
    python = make_venv(folder, see_running_torch=True)
    cpu = run([python, "-m", "pip", "install", "--no-deps", "--no-index", CPU_TORCH], folder.parent)
    version = run([python, "-c", "import torch; print(torch.__version__)"], folder.parent).stdout.strip()
    return python, version, cpu.returncode == 0


@pytest.mark.slow
def test_plain_pip_install_of_an_sdist_builds_against_the_installed_torch(tmp_path):
    source = tmp_path / "src"
    copy_package(source, with_sources=True)
    sdist_made = run([sys.executable, "setup.py", "-q", "sdist", "-d", tmp_path / "dist"], source, 300)
    assert sdist_made.returncode == 0, output(sdist_made)
    (sdist,) = (tmp_path / "dist").glob("glow_ext-*.tar.gz")
    members = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for expected in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "glow_ext/_build.py", "csrc/ops.cpp",
                     "csrc/actnorm_invconv.h", "csrc/glow_ext_math.h", "csrc/cpu/actnorm_invconv_cpu.cpp",
                     "csrc/cuda/actnorm_invconv_cuda.cu"):
        assert expected in members, sorted(members)
    assert not [m for m in members if m.endswith((".so", ".o", ".build.json"))], sorted(members)

    python, user_torch, cpu_only = _user_venv(tmp_path / "venv")
    # nvcc on PATH: with the CPU-only torch the build must say it is not used, and build for the CPU.
    fake_nvcc_dir = tmp_path / "cuda" / "bin"
    write_script(fake_nvcc_dir, "nvcc", 'echo "Cuda compilation tools, release 12.4"\n')
    (tmp_path / "cuda" / "lib64").mkdir()
    env = clean_env(PATH=os.pathsep.join([str(fake_nvcc_dir), os.environ["PATH"]]),
                    MAX_JOBS=str(os.cpu_count() or 1), **({} if cpu_only else {"GLOW_EXT_CUDA": "0"}))
    installed = run([python, "-m", "pip", "install", "-v", "--no-deps", sdist], tmp_path, BUILD_TIMEOUT_S, env=env)
    if "No matching distribution found for setuptools" in installed.stdout + installed.stderr:
        pytest.skip("pip cannot reach an index for the isolated build environment's setuptools")
    assert installed.returncode == 0, output(installed)
    log = installed.stdout + installed.stderr
    assert "glow_ext: isolated build, compiling against the installed torch" in log, output(installed)
    assert f"torch        {user_torch} ({tmp_path / 'venv'}" in log or f"torch        {user_torch} ({TORCH_SITE}" in log, \
        output(installed)
    assert "Collecting torch" not in log and "Downloading torch" not in log, output(installed)
    if cpu_only:
        assert (f"CUDA kernels no: torch {user_torch} is a CPU-only build (nvcc in {tmp_path / 'cuda'} is not "
                "used)") in log, output(installed)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = run([python, "-W", "error::RuntimeWarning", "-c", CHECK_OPS + CHECK_KERNELS], elsewhere,
                env=clean_env(EXPECT_ROOT=str(tmp_path / "venv")))
    assert check.returncode == 0, output(check)
    assert f"'torch_version': '{user_torch}'" in check.stdout, output(check)


@pytest.mark.slow
def test_jit_build_compiles_once_for_concurrent_processes_then_loads_from_the_cache(tmp_path):
    copy_package(tmp_path, with_sources=True)
    cache = tmp_path / "cache"
    env = clean_env(GLOW_EXT_JIT="1", GLOW_EXT_CACHE_DIR=str(cache), GLOW_EXT_CUDA="0",
                    MAX_JOBS=str(os.cpu_count() or 1))
    script = ISOLATE + CHECK_OPS + textwrap.dedent("""
        assert ops.kernels_available(), ops.LOAD_ERROR
        assert info["module"].startswith(os.environ["GLOW_EXT_CACHE_DIR"]), info
        assert info["torch_version"] == torch.__version__ and info["cuda_kernels"] is False, info
        print("JIT_OK")
    """)
    args = [sys.executable, "-W", "error::RuntimeWarning", "-c", script]
    both = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [process.communicate(timeout=BUILD_TIMEOUT_S) for process in both]
    for process, (stdout, stderr) in zip(both, results):
        assert process.returncode == 0 and "JIT_OK" in stdout, f"{stdout[-6000:]}\n{stderr[-6000:]}"
    compiled = [stderr for _, stderr in results if "GLOW_EXT_JIT=1: compiling the kernels" in stderr]
    assert len(compiled) == 1, [stderr[-3000:] for _, stderr in results]
    assert "compiled in" in compiled[0]
    (folder,) = cache.iterdir()
    assert folder.name.startswith(f"torch{torch.__version__}-"), folder
    assert json.loads((folder / "glow_ext_jit.build.json").read_text())["torch_version"] == torch.__version__

    again = run(args, tmp_path, env=env)
    assert again.returncode == 0 and "JIT_OK" in again.stdout, output(again)
    assert "compiling" not in again.stderr, output(again)


@pytest.mark.parametrize("built_for", ["another torch", "this torch", "another module file"])
def test_kernels_built_for_another_torch_are_reported_before_loading(tmp_path, built_for):
    copy_package(tmp_path, with_sources=False)
    # Not a loadable module at all: loading it would fail with a loader error. "another module
    # file": a per-Python module left from an older build, which Python finds before the abi3 one
    # that the metadata describes.
    name = "_C" + (importlib.machinery.EXTENSION_SUFFIXES[0] if built_for == "another module file" else ".abi3.so")
    (tmp_path / "glow_ext" / name).write_bytes(b"not an ELF file\n" * 512)
    running_flavour = f"cuda{torch.version.cuda}" if torch.version.cuda else "cpu"
    flavour = "cpu" if torch.version.cuda else "cuda11.8"  # the other flavour
    metadata = ({"torch_version": "2.4.1", "torch_flavour": flavour} if built_for == "another torch" else
                {"torch_version": torch.__version__, "torch_flavour": running_flavour})
    metadata["module_file"] = "_C.abi3.so"
    (tmp_path / "glow_ext" / "_C.build.json").write_text(json.dumps(metadata))
    check = run([sys.executable, "-c", ISOLATE + textwrap.dedent("""
        import sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import glow_ext, torch
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert not glow_ext.ops.kernels_available()
        assert not hasattr(torch.ops.glow_ext, "actnorm_invconv_lu")
        print("MESSAGE", messages[0])
    """)], tmp_path)
    assert check.returncode == 0, output(check)
    message = check.stdout.split("MESSAGE ", 1)[1]
    assert "falls back" in message and "pip install --no-build-isolation" in message, message
    assert "GLOW_EXT_JIT=1" in message, message
    if built_for == "another torch":
        built = "torch 2.4.1 (CPU-only)" if flavour == "cpu" else "torch 2.4.1 (CUDA 11.8)"
        running = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'})"
        assert f"they were built for {built} but {running} is running" in message, message
        assert "ELF" not in message, message  # never loaded
    elif built_for == "another module file":
        assert f"_C.build.json describes _C.abi3.so, not {name}" in message, message
        assert "ELF" not in message, message
    else:  # the metadata fits: it is loaded, and the loader's error is reported
        assert "failed" in message and "invalid ELF header" in message, message


def _torch(version, cuda=None):
    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda, hip=None))


@pytest.mark.parametrize("built, running, fits", [
    # PyPI's torch 2.11.0 and PyTorch's index's 2.11.0+cu130 are one build: both CUDA 13.0.
    (("2.11.0", "13.0"), ("2.11.0+cu130", "13.0"), True),
    (("2.11.0+cu130", "13.0"), ("2.11.0", "13.0"), True),
    (("2.13.0+cpu", None), ("2.13.0+cpu", None), True),
    (("2.11.0", "13.0"), ("2.11.0+cu128", "12.8"), False),  # another flavour
    (("2.11.0+cu130", "13.0"), ("2.11.0+cpu", None), False),
    (("2.11.0", "13.0"), ("2.11.1+cu130", "13.0"), False),  # another release
    (("2.11.0", "13.0"), ("2.11.0rc1+cu130", "13.0"), False),
    (("2.6.0a0+git1234", "12.4"), ("2.6.0a0+git5678", "12.4"), False),  # other source builds
    (("2.6.0a0+git1234", "12.4"), ("2.6.0a0+git1234", "12.4"), True),
])
def test_kernels_fit_the_same_torch_release_and_flavour_only(built, running, fits):
    built_torch = _torch(*built)
    metadata = {**_build.build_metadata(built_torch, False, "", []), "module_file": "_C.abi3.so"}
    problem = _build.mismatch(metadata, "/site/glow_ext/_C.abi3.so", _torch(*running))
    assert (problem is None) == fits, problem
    if not fits:
        assert problem.startswith(f"they were built for torch {built[0]} ("), problem


def test_metadata_names_the_module_it_describes(tmp_path):
    module = tmp_path / "_C.abi3.so"
    assert _build.metadata_path(module) == tmp_path / "_C.build.json"
    assert _build.metadata_path(tmp_path / "glow_ext_jit.so") == tmp_path / "glow_ext_jit.build.json"
    _build.write_metadata(module, _build.build_metadata(torch, False, "", []))
    metadata = _build.read_metadata(module)
    assert metadata["module_file"] == "_C.abi3.so" and metadata["python_abi"] == "abi3", metadata
    assert "python" not in metadata  # one module serves every Python version
    assert _build.mismatch(metadata, module, torch) is None
    older = {key: value for key, value in metadata.items() if key != "module_file"}
    assert _build.mismatch(older, module, torch) == "_C.build.json was written by an older glow_ext, for another module"


def test_a_build_removes_modules_of_other_file_names(tmp_path):
    names = ["_C.abi3.so", "_C.cpython-311-x86_64-linux-gnu.so", "_C.so", "_C.build.json", "_Coupling.so",
             "other.abi3.so"]
    for name in names:
        (tmp_path / name).write_text("")
    _build.remove_other_modules(tmp_path / "_C.abi3.so")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_C.abi3.so", "_C.build.json", "_Coupling.so",
                                                          "other.abi3.so"]


def test_sources_reach_python_through_torch_library_only():
    """No pybind11 (torch/extension.h brings it in): the ops are registered with TORCH_LIBRARY and
    only the empty module of python_module.cpp touches CPython, under its limited API."""
    sources = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh"))
    assert len(sources) > 5, sources
    for source in sources:
        text = source.read_text()
        for banned in ("pybind11", "torch/extension.h", "PYBIND11_MODULE", "torch/python.h"):
            assert banned not in text, f"{source} uses {banned}"
        assert ("<Python.h>" in text) == (source.name == "python_module.cpp"), source
    stub = (ROOT / "csrc" / "python_module.cpp").read_text()
    assert stub.index("#define Py_LIMITED_API") < stub.index("#include <Python.h>")


@pytest.mark.skipif(not ops.kernels_available(), reason="needs the compiled kernels")
def test_registered_helper_ops_describe_the_loaded_module():
    info = json.loads(torch.ops.glow_ext._build_info())
    assert info == {key: glow_ext.build_info()[key] for key in info}, info
    assert set(info) == {"cpu_kernels", "cpu_isa", "cuda_kernels", "cuda_archs", "torch_version"}, info
    assert info["cpu_kernels"] is True and info["cpu_isa"] in ("avx512", "avx2+fma", "portable"), info
    channels = torch.ops.glow_ext._factored_path_channels()
    assert isinstance(channels, int) and channels > 0
    assert ops.uses_factored_path(channels + 1, channels) and not ops.uses_factored_path(channels, 1)
    # No tensor argument to dispatch on: their catch-all kernels also serve under a fake mode.
    with torch._subclasses.fake_tensor.FakeTensorMode():
        assert torch.ops.glow_ext._factored_path_channels() == channels
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.glow_ext._lu_weight_entries(torch.arange(2), *[torch.zeros(2, 2)] * 2, torch.zeros(2),
                                              torch.ones(2))


@pytest.mark.skipif(not ops.kernels_available(), reason="needs the compiled kernels")
def test_built_module_uses_the_limited_api_only():
    module = Path(ops._C.__file__)
    if module.parent == Path(glow_ext.__file__).parent:  # built by setup.py, not just in time
        assert module.name == "_C.abi3.so", module
        assert ops.BUILD_METADATA["module_file"] == module.name, ops.BUILD_METADATA
    if shutil.which("nm") is None:
        pytest.skip("needs nm (binutils) to list the module's symbols")
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True, text=True,
                             check=True).stdout.split()
    python_symbols = {s for s in symbols if s.startswith(("Py", "_Py"))}
    assert python_symbols == {"PyModule_Create2"}, sorted(python_symbols)


def test_missing_extension_falls_back_to_reference_with_a_warning(tmp_path):
    copy_package(tmp_path, with_sources=False)

    # The warning is a RuntimeWarning: turned into an error, the import fails.
    strict = run([sys.executable, "-W", "error::RuntimeWarning", "-c", ISOLATE + "import glow_ext"], tmp_path)
    assert strict.returncode != 0, output(strict)
    assert "RuntimeWarning" in strict.stderr and "falls back" in strict.stderr, output(strict)

    check = run([sys.executable, "-c", ISOLATE + textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import glow_ext
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "could not be loaded: glow_ext._C is not built" in messages[0], messages
        assert "falls back" in messages[0] and "reference" in messages[0], messages
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
    """)], tmp_path)
    assert check.returncode == 0, output(check)
    for marker in ("WARNED", "OPS_OK", "FALLBACK_OK"):
        assert marker in check.stdout, output(check)


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
    assert result.returncode == 0, output(result)
    assert "HEAVY []" in result.stdout, output(result)
