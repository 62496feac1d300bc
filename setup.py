"""Build of glow_ext's C++/CUDA kernels, against the torch already installed.

CUDA kernels are compiled iff torch is a CUDA build and nvcc is found (no GPU is needed); otherwise
the extension is CPU-only. The module (`glow_ext/_C.abi3.so`) uses CPython's limited API only, so
the wheel is tagged cp39-abi3: one build for every Python version, tied only to the torch it was
built against. The recipe (sources, flags, checks) is glow_ext/_build.py, shared with the
just-in-time build. Environment knobs:

  GLOW_EXT_CUDA=0|1       force the CPU-only build, or fail unless CUDA kernels can be built
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0" when no GPU is visible)
  CUDA_HOME               the CUDA toolkit; by default found from `nvcc` on PATH, through wrappers
  MAX_JOBS                parallel compile jobs
  CXX                     the C++ compiler (default c++)

torch is deliberately not a build requirement (pyproject.toml): an isolated build environment
would download another torch and build kernels that cannot load into the user's. When pip builds
in isolation, it runs this file with the interpreter it installs into but hides that environment's
site-packages; `import_torch` looks there, so a plain `pip install .` builds against the user's
torch. Where no torch can be found, the build stops at once and prints the command to run.
"""
import importlib.util
import os
import shlex
import shutil
import site
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def load_recipe():
    """glow_ext/_build.py, loaded by path: glow_ext itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location("glow_ext_build_recipe", ROOT / "glow_ext" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


def fail(message):
    sys.stderr.write(f"\n*** glow_ext build error: {message}\n\n")
    sys.exit(1)


def command_without_isolation():
    """The command that invoked this build with isolation turned off: the frontend's own command
    line when it can be read (Linux), else the generic pip command."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (OSError, UnicodeDecodeError):
        argv = []
    for i, word in enumerate(argv):
        frontend = " ".join(argv[:i])
        if word in ("install", "wheel") and ("pip" in frontend or "uv" in frontend):
            return shlex.join(argv[:i + 1] + ["--no-build-isolation"] + argv[i + 1:])
        if word == "build" and i > 0 and argv[i - 1] == "-m":
            return shlex.join(argv[:i + 1] + ["--no-isolation"] + argv[i + 1:])
    return "pip install --no-build-isolation <the path, sdist or git URL you gave pip>"


def import_torch():
    try:
        import torch
        return torch
    except ImportError:
        pass
    # An isolated build (pip) runs with the target interpreter but hides its site directories: add
    # them back after the build environment's own, .pth files included, as when that environment runs.
    hidden = [path for path in [site.getusersitepackages(), *site.getsitepackages()]
              if os.path.isdir(path) and path not in sys.path]
    for path in hidden:
        site.addsitedir(path)
    try:
        import torch
    except ImportError as error:
        found = [path for path in hidden if os.path.isdir(os.path.join(path, "torch"))]
        why = f" (torch in {found[0]} fails to import: {error})" if found else ""
        fail(f"torch is not importable in this build{why}. glow_ext's kernels must be compiled against "
             "the torch they will run with, so torch is never downloaded into an isolated build "
             "environment.\n"
             "  - torch not installed yet: install it first (https://pytorch.org/get-started/locally/ "
             "has the CPU and CUDA builds), then run your command again.\n"
             "  - torch installed where this build cannot see it (PYTHONPATH, or a frontend whose "
             "isolated build uses another interpreter): build without isolation:\n"
             f"        {command_without_isolation()}")
    print(f"glow_ext: isolated build, compiling against the installed torch in {Path(torch.__file__).parent}")
    return torch


def main():
    torch = import_torch()
    try:
        recipe.check_torch_version(torch)
        with_cuda, reason = recipe.decide_cuda(torch, os.environ.get("GLOW_EXT_CUDA", "auto"))
        compiler = recipe.find_compiler()
    except recipe.BuildError as error:
        fail(str(error))
    from torch.utils import cpp_extension  # after CUDA_HOME is settled

    openmp = recipe.openmp_flags(compiler)
    archs = recipe.cuda_archs(torch) if with_cuda else ""
    flags = recipe.compile_flags(torch, with_cuda, archs, openmp)
    sources = [str(p.relative_to(ROOT)) for p in recipe.kernel_sources(ROOT / "csrc", with_cuda)]
    metadata = recipe.build_metadata(torch, with_cuda, archs, openmp)
    # The limited API (`_C.abi3.so`): one module for every CPython version (glow_ext/_build.py).
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        name="glow_ext._C", sources=sources, py_limited_api=True,
        extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]}, extra_link_args=flags["ld"])
    # torch < 2.6 links its Python bindings even so; the module uses none of them.
    extension.libraries = [library for library in extension.libraries if library != "torch_python"]

    print("=" * 72)
    print("glow_ext build summary")
    print(f"  torch        {torch.__version__} ({torch.__file__})")
    print(f"  compiler     {compiler}")
    print(f"  CPU kernels  yes ({len([s for s in sources if s.endswith('.cpp')])} C++ files)")
    print(f"  OpenMP       {'yes' if openmp else 'no: the compiler has no -fopenmp, our CPU kernels run on one thread'}")
    print(f"  CUDA kernels {'yes, archs ' + archs if with_cuda else 'no'}: {reason}")
    print("=" * 72, flush=True)

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # one clear line on top of the compiler's own output
                hint = ("the CUDA part failed: retry with GLOW_EXT_CUDA=0 for a CPU-only build"
                        if with_cuda else "is a C++17 compiler (g++ >= 9) installed?")
                fail(f"compiling the kernels failed ({type(error).__name__}: {error}); {hint}.")

        def run(self):
            super().run()  # builds into build_lib, then copies to the source tree when in place
            was_inplace = self.inplace
            for self.inplace in sorted({False, bool(was_inplace)}):  # the built module, then its copy
                module_path = self.get_ext_fullpath(extension.name)
                recipe.write_metadata(module_path, metadata)
                recipe.remove_other_modules(module_path)
            self.inplace = was_inplace

    class BuildPy(build_py):
        """Ships csrc/ inside the wheel (glow_ext/csrc) for the just-in-time build (GLOW_EXT_JIT)."""

        def run(self):
            super().run()
            if not getattr(self, "editable_mode", False):
                shutil.copytree(ROOT / "csrc", Path(self.build_lib, "glow_ext", "csrc"), dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.o", "__pycache__"))

    setup(ext_modules=[extension],
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy},
          options={"bdist_wheel": {"py_limited_api": recipe.LIMITED_API_TAG}})


main()
