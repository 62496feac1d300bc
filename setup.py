"""Build of glow_ext's C++/CUDA kernels.

CUDA kernels are compiled iff torch is a CUDA build and nvcc is found (no GPU is needed); otherwise
the extension is CPU-only. Install with `pip install --no-build-isolation .` so that the extension is
built against the torch already installed. Environment knobs:

  GLOW_EXT_CUDA=0|1       force the CPU-only build, or fail unless CUDA kernels can be built
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0" when no GPU is visible)
  CUDA_HOME               the CUDA toolkit; by default found from `nvcc` on PATH, through wrappers
  MAX_JOBS                parallel compile jobs
"""
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0"


def fail(message):
    sys.stderr.write(f"\n*** glow_ext build error: {message}\n\n")
    sys.exit(1)


def toolkit_root_of(nvcc):
    """The CUDA toolkit folder of an nvcc, following a shell wrapper that execs the real one."""
    nvcc = Path(nvcc).resolve()
    root = nvcc.parent.parent
    if (root / "lib64").is_dir() or (root / "targets").is_dir():
        return root
    try:
        text = nvcc.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    if match and Path(match.group(1), "bin", "nvcc").is_file():
        return Path(match.group(1))
    return None


def find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        home = Path(os.environ["CUDA_HOME"])
        return home if (home / "bin" / "nvcc").is_file() else None
    nvcc = shutil.which("nvcc")
    return toolkit_root_of(nvcc) if nvcc else None


def decide_cuda(torch):
    """(build CUDA kernels?, reason) from torch's build, nvcc and GLOW_EXT_CUDA."""
    wanted = os.environ.get("GLOW_EXT_CUDA", "auto").lower()
    if wanted in ("0", "false", "no", "off"):
        return False, "disabled by GLOW_EXT_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is not None:
            # torch.utils.cpp_extension reads CUDA_HOME when imported; a wrapper's folder has no lib64.
            os.environ["CUDA_HOME"] = str(cuda_home)
            return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) + nvcc in {cuda_home}"
        reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if wanted in ("1", "true", "yes", "on"):
        fail(f"GLOW_EXT_CUDA=1 but CUDA kernels cannot be built: {reason}.")
    return False, reason


def main():
    try:
        import torch
    except ImportError:
        fail("torch must be installed before glow_ext is built. Install torch (>= 2.4), then run\n"
             "    pip install --no-build-isolation .")

    with_cuda, reason = decide_cuda(torch)
    from torch.utils import cpp_extension  # after CUDA_HOME is settled

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    archs = ""
    defines = [f'-DGLOW_EXT_TORCH_VERSION="{torch.__version__}"']
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU")
        defines += ["-DGLOW_EXT_WITH_CUDA", f'-DGLOW_EXT_CUDA_ARCHS="{archs}"']

    # -fopenmp: at::parallel_for is an inline `omp parallel`, serial unless the extension itself
    # is compiled with OpenMP (it then shares torch's libgomp).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"] + defines
    extension_args = dict(
        name="glow_ext._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"] + defines},
        extra_link_args=["-fopenmp"],
    )
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        **extension_args)

    print("=" * 72)
    print("glow_ext build summary")
    print(f"  torch        {torch.__version__} ({torch.__file__})")
    print(f"  CPU kernels  yes ({len([s for s in sources if s.endswith('.cpp')])} C++ files)")
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

    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


main()
