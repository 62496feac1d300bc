"""Environments the build cannot or should not use: each gets one clear error (or the documented
fallback) within seconds, before anything is compiled. And other platforms: OpenMP detection, and
csrc/ compiled for aarch64 without OpenMP by Debian's cross compiler (skipped without it; CI
installs it)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from build_helpers import ROOT, clean_env, copy_package, make_venv, output, run, write_script
from glow_ext import _build

AARCH64_CXX = "aarch64-linux-gnu-g++"


def _setup_py(tmp_path, *args, **env):
    copy_package(tmp_path, with_sources=True)
    return run([sys.executable, "setup.py", *(args or ["build_ext", "--inplace"])], tmp_path, 300, **env)


def _assert_build_error(result, *fragments):
    assert result.returncode != 0, output(result)
    text = result.stdout + result.stderr
    assert "*** glow_ext build error:" in text, output(result)
    for fragment in fragments:
        assert fragment in text, output(result)
    assert "building 'glow_ext._C' extension" not in text, output(result)  # stopped before compiling


def test_no_compiler_named_by_cxx(tmp_path):
    result = _setup_py(tmp_path, GLOW_EXT_CUDA="0", CXX="/nonexistent/g++")
    _assert_build_error(result, "no C++ compiler (CXX=/nonexistent/g++ does not exist)", "apt-get install g++")


def test_no_compiler_on_path(tmp_path):
    bin_dir = tmp_path / "bin"  # PATH holds only this: no c++, g++ or nvcc
    bin_dir.mkdir()
    result = _setup_py(tmp_path / "src", GLOW_EXT_CUDA="0", PATH=str(bin_dir))
    _assert_build_error(result, "no C++ compiler (no `c++` on PATH)")


def test_unsupported_torch_version(tmp_path):
    fake = tmp_path / "fake" / "torch"  # a torch that reports an old version, found first
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.3.1"\nclass version:\n    cuda = None\n')
    result = _setup_py(tmp_path / "src", PYTHONPATH=str(tmp_path / "fake"))
    _assert_build_error(result, "torch 2.3.1 is too old: glow_ext needs torch >= 2.4")


def test_cuda_required_without_nvcc(tmp_path):
    no_nvcc = os.pathsep.join(p for p in clean_env()["PATH"].split(os.pathsep)
                              if p and not Path(p, "nvcc").exists())
    result = _setup_py(tmp_path, GLOW_EXT_CUDA="1", PATH=no_nvcc)
    reason = "nvcc not found" if torch.version.cuda else "is a CPU-only build"
    _assert_build_error(result, "GLOW_EXT_CUDA=1 but CUDA kernels cannot be built", reason)


def test_nvcc_with_a_cpu_only_torch_builds_for_the_cpu(tmp_path, monkeypatch):
    nvcc = write_script(tmp_path / "cuda" / "bin", "nvcc", 'echo "Cuda compilation tools, release 12.4"\n')
    (tmp_path / "cuda" / "lib64").mkdir()
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{os.environ['PATH']}")
    cpu_torch = SimpleNamespace(__version__="2.13.0+cpu", version=SimpleNamespace(cuda=None))
    assert _build.decide_cuda(cpu_torch) == (
        False, f"torch 2.13.0+cpu is a CPU-only build (nvcc in {tmp_path / 'cuda'} is not used)")
    with pytest.raises(_build.BuildError, match="GLOW_EXT_CUDA=1 but CUDA kernels cannot be built"):
        _build.decide_cuda(cpu_torch, "1")


@pytest.mark.parametrize("how", ["source folder", "git URL"])
def test_isolated_build_without_torch_stops_with_the_command_to_run(tmp_path, how):
    if how == "git URL" and shutil.which("git") is None:
        pytest.skip("needs git")
    source = tmp_path / "src"
    copy_package(source, with_sources=True)
    target = str(source)
    if how == "git URL":
        for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
            assert subprocess.run(["git", *args], cwd=source, capture_output=True).returncode == 0
        target = f"git+file://{source}"
    python = make_venv(tmp_path / "venv", see_running_torch=False)  # no torch anywhere
    result = run([python, "-m", "pip", "install", "--no-deps", target], tmp_path, 600)
    text = result.stdout + result.stderr
    if "No matching distribution found for setuptools" in text:
        pytest.skip("pip cannot reach an index for the isolated build environment's setuptools")
    _assert_build_error(result, "torch is not importable in this build",
                        "never downloaded into an isolated build environment",
                        f"{python} -m pip install --no-build-isolation --no-deps {target}")
    assert "Collecting torch" not in text, output(result)


def test_openmp_probe(tmp_path):
    compiler = _build.find_compiler()
    assert _build.openmp_flags(compiler) == ["-fopenmp"]
    # Apple's clang: no -fopenmp. The build then goes without it instead of failing.
    no_openmp = write_script(tmp_path, "clang++", f"""
        for arg in "$@"; do [ "$arg" = -fopenmp ] && {{ echo "unsupported option '-fopenmp'" >&2; exit 1; }}; done
        exec {compiler} "$@"
    """)
    assert _build.openmp_flags(str(no_openmp)) == []
    flags = _build.compile_flags(torch, False, "", [])
    assert "-fopenmp" not in flags["cxx"] + flags["ld"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(AARCH64_CXX) is None, reason=f"needs {AARCH64_CXX} (apt-get install g++-aarch64-linux-gnu)")
def test_kernel_sources_compile_for_aarch64_without_openmp(tmp_path):
    """Compile-only (no aarch64 torch to link against): against the running torch's headers, without
    -fopenmp, so the x86 ISA dispatch must stay behind its guards. The CUDA file needs nvcc."""
    include = Path(torch.__file__).parent / "include"
    flags = _build.compile_flags(torch, False, "", openmp=[])["cxx"]
    common = [AARCH64_CXX, "-std=c++20", "-c", "-O0", "-fPIC", f"-I{include}",
              f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
              "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f for f in flags if f != "-O3"]
    sources = _build.kernel_sources(ROOT / "csrc", with_cuda=False)

    def compile_one(source):
        obj = tmp_path / (source.stem + ".o")
        return source, obj, subprocess.run(common + [str(source), "-o", str(obj)], capture_output=True, text=True,
                                           timeout=600)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, sources))
    # Every C++ file the build compiles, the CPU kernels of each op included; none of them CUDA.
    assert {s.name for s in sources} >= {"ops.cpp", "actnorm_invconv_cpu.cpp", "coupling_cpu.cpp"}, sources
    assert not any(s.suffix == ".cu" for s in sources), sources
    for source, obj, result in results:
        assert result.returncode == 0, f"{source}:\n{result.stderr[-6000:]}"
        header = obj.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, source  # EM_AARCH64
