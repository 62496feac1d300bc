"""The build recipe of the compiled kernels, written once for setup.py (wheels, editable installs)
and for the just-in-time build of `glow_ext._loader`: which torch is supported, which sources and
flags, CUDA or not, OpenMP or not, and the metadata file written next to the built module so that
a module built for another torch is recognised before it is loaded.

One build serves every CPython version: Python reaches the kernels only through torch.ops.glow_ext
(TORCH_LIBRARY), never pybind11, and the module itself (csrc/python_module.cpp) uses the limited API
only. setup.py builds it with torch's `py_limited_api=True` (`_C.abi3.so`, in a `cp39-abi3` wheel).
torch implements that flag fully from 2.7 on; for torch 2.4 to 2.6 glow_ext fills in the rest and
builds the same way. torch >= 2.4 passes the flag to setuptools (the abi3 file name); torch < 2.6
still links libtorch_python, which setup.py drops; torch < 2.7 does not define Py_LIMITED_API, which
python_module.cpp then defines itself, as it does for the just-in-time build
(torch.utils.cpp_extension.load has no such flag).

It imports nothing from glow_ext and takes torch as an argument, so setup.py can load it by path
before glow_ext is importable.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# torch.library.register_fake and register_autograd, which glow_ext.ops uses, appeared in torch 2.4.
MIN_TORCH = (2, 4)
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# The wheel's abi3 tag: the oldest CPython the module loads into (pyproject.toml's requires-python).
LIMITED_API_TAG = "cp39"
OFF = ("0", "false", "no", "off")
ON = ("1", "true", "yes", "on")
OPENMP_PROBE = """
#include <omp.h>
int main() {
  int threads = 0;
#pragma omp parallel reduction(+ : threads)
  threads += 1;
  return threads > 0 ? 0 : 1;
}
"""


class BuildError(RuntimeError):
    """A build that cannot succeed in this environment; the message says what to do."""


def torch_release(version: str) -> tuple:
    """(major, minor) of a torch version string such as '2.13.0+cpu' or '2.6.0a0+git1234'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_torch_version(torch) -> None:
    if torch_release(torch.__version__) < MIN_TORCH:
        raise BuildError(
            f"torch {torch.__version__} is too old: glow_ext needs torch >= "
            f"{'.'.join(map(str, MIN_TORCH))} (torch.library.register_fake / register_autograd). "
            "Upgrade torch, then build again.")


def torch_flavour(torch) -> str:
    """'cuda<version>', 'rocm<version>' or 'cpu': the part of torch's build a compiled module depends on."""
    if torch.version.cuda:
        return f"cuda{torch.version.cuda}"
    hip = getattr(torch.version, "hip", None)
    return f"rocm{hip}" if hip else "cpu"


def find_compiler() -> str:
    """The C++ compiler torch's build will call (CXX, else c++), or a BuildError saying so."""
    name = os.environ.get("CXX") or "c++"
    path = shutil.which(name)
    if path is None:
        where = f"CXX={name} does not exist" if os.environ.get("CXX") else "no `c++` on PATH"
        raise BuildError(
            f"no C++ compiler ({where}). Install a C++17 compiler (Debian/Ubuntu: apt-get install g++; "
            "macOS: xcode-select --install) or point CXX at one, then build again.")
    return path


def openmp_flags(compiler: str) -> list:
    """["-fopenmp"] when the compiler can build and link an OpenMP program, else [] (Apple clang).

    Without it at::parallel_for, an inline `omp parallel` in torch's headers, runs serially inside
    our kernels (torch's own ops keep their threads)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "probe.cpp")
        source.write_text(OPENMP_PROBE)
        try:
            probe = subprocess.run([compiler, "-fopenmp", str(source), "-o", str(Path(folder, "probe"))],
                                   capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return []
    return ["-fopenmp"] if probe.returncode == 0 else []


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


def decide_cuda(torch, wanted="auto", need_gpu=False):
    """(build CUDA kernels?, reason) from torch's build, nvcc and GLOW_EXT_CUDA (`wanted`).

    need_gpu (the just-in-time build): CUDA kernels only when a GPU is usable too. Sets CUDA_HOME to
    the toolkit found, which torch.utils.cpp_extension reads when it is first imported."""
    wanted = wanted.lower()
    if wanted in OFF:
        return False, "disabled by GLOW_EXT_CUDA=0"
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
        if cuda_home is not None:
            reason += f" (nvcc in {cuda_home} is not used)"
    elif cuda_home is None:
        reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    elif need_gpu and not torch.cuda.is_available():
        reason = "no usable GPU"
    else:
        os.environ["CUDA_HOME"] = str(cuda_home)
        return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) + nvcc in {cuda_home}"
    if wanted in ON:
        raise BuildError(f"GLOW_EXT_CUDA=1 but CUDA kernels cannot be built: {reason}.")
    return False, reason


def kernel_sources(csrc: Path, with_cuda: bool) -> list:
    sources = sorted(csrc.glob("*.cpp")) + sorted((csrc / "cpu").glob("*.cpp"))
    return sources + (sorted((csrc / "cuda").glob("*.cu")) if with_cuda else [])


def compile_flags(torch, with_cuda: bool, archs: str, openmp: list) -> dict:
    """{"cxx": [...], "nvcc": [...], "ld": [...]} for the kernels built against `torch`."""
    defines = [f'-DGLOW_EXT_TORCH_VERSION="{torch.__version__}"']
    if with_cuda:
        defines += ["-DGLOW_EXT_WITH_CUDA", f'-DGLOW_EXT_CUDA_ARCHS="{archs}"']
    # With OpenMP at::parallel_for is an inline `omp parallel` sharing torch's libgomp; without it,
    # our kernels run on one thread.
    return {"cxx": ["-O3", "-ffp-contract=fast", "-Wno-psabi"] + openmp + defines,
            "nvcc": ["-O3", "-lineinfo"] + defines, "ld": list(openmp)}


def cuda_archs(torch) -> str:
    """TORCH_CUDA_ARCH_LIST, defaulting to 8.0;9.0 when no GPU is visible to pick it."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU")


def build_metadata(torch, with_cuda: bool, archs: str, openmp: list) -> dict:
    """How a module is built; write_metadata adds its file name. No Python version: the module uses
    the limited API only."""
    return {"torch_version": torch.__version__, "torch_flavour": torch_flavour(torch), "python_abi": "abi3",
            "cuda_kernels": with_cuda, "cuda_archs": archs if with_cuda else "", "openmp": bool(openmp)}


def metadata_path(module_path) -> Path:
    """The metadata file of a compiled module: `_C.abi3.so` (or `_C.cpython-311-x86_64-linux-gnu.so`,
    `glow_ext_jit.so`) → `_C.build.json`."""
    module_path = Path(module_path)
    return module_path.with_name(module_path.name.split(".")[0] + ".build.json")


def write_metadata(module_path, metadata: dict) -> None:
    # The file name tells a stale module of another name, which Python might import first, from the one described.
    metadata = {**metadata, "module_file": Path(module_path).name}
    metadata_path(module_path).write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")


def remove_other_modules(module_path) -> None:
    """Deletes the modules next to module_path of the same name but another file name, such as a
    per-Python `_C.cpython-311-x86_64-linux-gnu.so` built before: Python might import it instead."""
    module_path = Path(module_path)
    prefix = module_path.name.split(".")[0] + "."
    for other in module_path.parent.glob(prefix + "*"):
        if other.suffix in (".so", ".pyd") and other.name != module_path.name:
            other.unlink()


def read_metadata(module_path):
    try:
        return json.loads(metadata_path(module_path).read_text())
    except (OSError, ValueError):
        return None


def describe(version, flavour) -> str:
    kind = "CPU-only" if flavour == "cpu" else flavour.replace("cuda", "CUDA ").replace("rocm", "ROCm ")
    return f"torch {version} ({kind})"


# Local version labels that only name torch's flavour, which torch_flavour compares anyway. The same
# torch release from PyPI may lack one (2.11.0 vs 2.11.0+cu130 from PyTorch's own index).
FLAVOUR_LABEL = re.compile(r"cpu|cu\d+|rocm[\d.]+|xpu")


def torch_build(version: str) -> str:
    """The part of torch.__version__ that a compiled module depends on besides the flavour: the version
    without a flavour label ('2.11.0+cu130' → '2.11.0'), any other label kept ('2.6.0a0+git1234')."""
    release, _, label = version.partition("+")
    return release if FLAVOUR_LABEL.fullmatch(label) else version


def mismatch(metadata: dict, module_path, torch):
    """None if the module at module_path, with this metadata, can be loaded into the running torch,
    else why not: another torch release, flavour or local build, or another module than described."""
    built_file, file_name = metadata.get("module_file"), Path(module_path).name
    if built_file is None:
        return f"{metadata_path(module_path).name} was written by an older glow_ext, for another module"
    if built_file != file_name:
        return f"{metadata_path(module_path).name} describes {built_file}, not {file_name}"
    built = (metadata.get("torch_version"), metadata.get("torch_flavour"))
    running = (torch.__version__, torch_flavour(torch))
    if (torch_build(built[0] or ""), built[1]) != (torch_build(running[0]), running[1]):
        return f"they were built for {describe(*built)} but {describe(*running)} is running"
    return None
