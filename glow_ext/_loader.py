"""Finding the compiled kernels for the running torch.

1. The module built with the package (`glow_ext._C`, the file `_C.abi3.so`), if its metadata file
   says it is that file and was built for the running torch (release and CPU/CUDA flavour: see
   _build.mismatch). The check comes before loading it: loading a module built for another torch
   fails with a loader error, or worse, loads and misbehaves. Loading it registers the ops
   (torch.ops.glow_ext), the module itself is empty.
2. Else, with GLOW_EXT_JIT=1, a module compiled for the running torch on first import into a cache
   folder (GLOW_EXT_CACHE_DIR, default ~/.cache/glow_ext), one sub-folder per torch version,
   flavour, Python and source hash, built under a file lock so that concurrent processes build once.
3. Else none, with the reason and the command that rebuilds them; glow_ext.ops then falls back to
   the reference.
"""
import hashlib
import importlib
import importlib.util
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from . import _build

PACKAGE_DIR = Path(__file__).resolve().parent
JIT_MODULE = "glow_ext_jit"  # TORCH_EXTENSION_NAME of the just-in-time build


class Kernels(NamedTuple):
    module: Optional[object]  # the loaded (empty) extension module, None without kernels
    error: Optional[str]  # why there are none
    metadata: dict  # how they were built (see _build.build_metadata); {} when unknown


def load_kernels() -> Kernels:
    spec = importlib.util.find_spec("glow_ext._C")
    if spec is None or not spec.origin:
        problem = "glow_ext._C is not built"
    else:
        metadata = _build.read_metadata(spec.origin) or {}
        problem = _build.mismatch(metadata, spec.origin, torch) if metadata else None
        if problem is None:
            try:
                return Kernels(importlib.import_module("glow_ext._C"), None, metadata)
            except ImportError as error:
                problem = f"loading {spec.origin} failed ({error})"
        else:
            problem = f"the compiled kernels in {Path(spec.origin).parent} do not fit: {problem}"
    if os.environ.get("GLOW_EXT_JIT", "").lower() in _build.ON:
        try:
            return jit_load()
        except Exception as error:  # noqa: BLE001 - any build failure means: no kernels, say why
            return Kernels(None, f"{problem}; the just-in-time build (GLOW_EXT_JIT=1) failed: {error}", {})
    return Kernels(None, f"{problem}. Rebuild them for this torch with `{rebuild_command()}`, or set "
                         "GLOW_EXT_JIT=1 to compile them on import", {})


def rebuild_command() -> str:
    pip = f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation"
    checkout = PACKAGE_DIR.parent
    if (checkout / "setup.py").is_file() and (checkout / "csrc").is_dir():
        return f"cd {shlex.quote(str(checkout))} && {pip} -e ."
    return f"{pip} --force-reinstall --no-deps <glow_ext checkout, sdist or git URL>"


def kernel_source_dir() -> Path:
    """csrc/: inside the package when installed from a wheel, next to it in a checkout."""
    for folder in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (folder / "ops.cpp").is_file():
            return folder
    raise RuntimeError(f"the kernel sources (csrc/) are not shipped with {PACKAGE_DIR}")


def cache_root() -> Path:
    if os.environ.get("GLOW_EXT_CACHE_DIR"):
        return Path(os.environ["GLOW_EXT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "glow_ext")


def cache_dir(sources, flags: dict) -> Path:
    digest = hashlib.sha256(repr(sorted(flags.items())).encode())
    for path in sorted(sources) + sorted(sources[0].parent.rglob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / f"torch{torch.__version__}-{_build.torch_flavour(torch)}-{python}-{digest.hexdigest()[:12]}"


def jit_load() -> Kernels:
    from filelock import FileLock, Timeout  # a dependency of torch

    compiler = _build.find_compiler()
    with_cuda, cuda_reason = _build.decide_cuda(torch, os.environ.get("GLOW_EXT_CUDA", "auto"), need_gpu=True)
    archs = _build.cuda_archs(torch) if with_cuda else ""
    openmp = _build.openmp_flags(compiler)
    flags = _build.compile_flags(torch, with_cuda, archs, openmp)
    sources = _build.kernel_sources(kernel_source_dir(), with_cuda)
    folder = cache_dir(sources, flags)
    folder.mkdir(parents=True, exist_ok=True)
    module_path = folder / f"{JIT_MODULE}{'.pyd' if sys.platform == 'win32' else '.so'}"
    # Not named `lock`: older torch's own build lock is a file of that name whose existence blocks.
    lock = FileLock(str(folder / "glow_ext.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"waiting for another process that is compiling the kernels into {folder}")
        lock.acquire()
    try:
        metadata = _build.read_metadata(module_path)
        if metadata is not None:
            return Kernels(import_from(module_path), None, metadata)
        return compile_into(folder, module_path, sources, flags, with_cuda, cuda_reason, archs, openmp)
    finally:
        lock.release()


def compile_into(folder, module_path, sources, flags, with_cuda, cuda_reason, archs, openmp) -> Kernels:
    progress(f"GLOW_EXT_JIT=1: compiling the kernels for {_build.describe(torch.__version__, _build.torch_flavour(torch))}"
             f" into {folder} (first import only; about two minutes of CPU per source file). CUDA kernels: "
             f"{'yes, archs ' + archs if with_cuda else 'no, ' + cuda_reason}; OpenMP: {'yes' if openmp else 'no'}.")
    from torch.utils import cpp_extension  # after decide_cuda settled CUDA_HOME

    start = time.monotonic()
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the ninja package installs it next to the interpreter
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        # load() writes the flags into a ninja file run by the shell: quote the string defines.
        module = cpp_extension.load(
            name=JIT_MODULE, sources=[str(s) for s in sources], build_directory=str(folder), verbose=True,
            extra_cflags=[shlex.quote(f) for f in flags["cxx"]],
            extra_cuda_cflags=[shlex.quote(f) for f in flags["nvcc"]],
            extra_ldflags=flags["ld"], with_cuda=with_cuda)
    finally:
        os.environ["PATH"] = path
    metadata = _build.build_metadata(torch, with_cuda, archs, openmp)
    _build.write_metadata(module_path, metadata)
    progress(f"compiled in {time.monotonic() - start:.0f} s; later imports load {module_path}")
    return Kernels(module, None, metadata)


def import_from(module_path: Path):
    spec = importlib.util.spec_from_file_location(JIT_MODULE, module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def progress(message: str) -> None:
    print(f"glow_ext: {message}", file=sys.stderr, flush=True)
