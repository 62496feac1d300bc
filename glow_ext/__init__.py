"""glow_ext: fast, exact Glow layers on fused C++/CUDA kernels.

The library: `ops` and `coupling_ops` (the fused ops), `reference` (the same math in plain PyTorch), `nn` (layers),
`models` (Glow, LogitGlow), `reversible` (reversible backprop), `compat` (drop-in layers for the
Glow, speech and density-estimation flow libraries people use). The training application (glow_ext.training) and the benchmarks
(glow_ext.bench) are subpackages that `import glow_ext` does not load.
"""
import json

from . import coupling_ops, nn, ops, reference

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: CPU kernels loaded, CUDA kernels compiled (archs), the torch it was
    built for and the running one, OpenMP, where the module is; load_error when there are none."""
    import torch

    if not ops.kernels_available():
        return {"cpu_kernels": False, "cuda_kernels": False, "cuda_archs": "",
                "torch_version": None, "load_error": str(ops.LOAD_ERROR),
                "runtime_torch_version": torch.__version__}
    info = json.loads(torch.ops.glow_ext._build_info())
    info.update({key: ops.BUILD_METADATA[key] for key in ("torch_flavour", "openmp") if key in ops.BUILD_METADATA})
    info["module"] = ops._C.__file__
    info["runtime_torch_version"] = torch.__version__
    return info


__all__ = ["build_info", "coupling_ops", "nn", "ops", "reference"]
