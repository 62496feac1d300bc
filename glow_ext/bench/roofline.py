"""This machine's ceilings, measured in the run that quotes them, and a time's share of its roofline.

A roofline figure divides the least time the work could take (max of flops / GEMM rate and bytes /
copy bandwidth) by the measured time: 100% means the call runs at the machine's ceiling. The
ceilings are measured with the same threads and timing as the benchmark itself: a large square
torch.mm per dtype (the best rate a library reaches here) and a large tensor copy (bytes read plus
bytes written).
"""
import torch

from .. import ops
from .common import synchronizer, time_methods

GEMM_SIZE = 1024
COPY_BYTES = 256 << 20  # far past the last-level cache of any CPU we run on
DTYPES = (torch.float32, torch.float64)


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def measure_ceilings(device, reps=5, min_time_s=0.3, warmup=2, dtypes=DTYPES):
    """{"gemm_gflops": {dtype: rate}, "copy_gbps": rate, ...}, each a median of `reps` blocks."""
    sync = synchronizer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    callables, flops = {}, {}
    for dtype in dtypes:
        a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=dtype, generator=gen)
        b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=dtype, generator=gen)
        out = torch.empty_like(a)
        callables[f"gemm_{dtype_name(dtype)}"] = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)
        flops[dtype_name(dtype)] = 2 * GEMM_SIZE**3
    src = torch.randn(COPY_BYTES // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    callables["copy"] = lambda: dst.copy_(src)
    timings = time_methods(callables, sync, reps, min_time_s, warmup, grad_mode=False)
    return {
        "gemm_gflops": {name: f / (timings[f"gemm_{name}"]["median_ms"] * 1e-3) / 1e9
                        for name, f in flops.items()},
        "copy_gbps": 2 * COPY_BYTES / (timings["copy"]["median_ms"] * 1e-3) / 1e9,
        "gemm_size": GEMM_SIZE,
        "copy_mb": COPY_BYTES >> 20,
        "timings": timings,
    }


def floor_ms(flops, nbytes, ceilings, dtype=torch.float32):
    """The least time `flops` floating-point operations and `nbytes` of memory traffic can take."""
    gemm = ceilings["gemm_gflops"][dtype_name(dtype)] * 1e9
    return max(flops / gemm, nbytes / (ceilings["copy_gbps"] * 1e9)) * 1e3


def roofline_pct(measured_ms, flops, nbytes, ceilings, dtype=torch.float32):
    """The measured time's share of the roofline, in percent (100 = at the machine's ceiling)."""
    return 100.0 * floor_ms(flops, nbytes, ceilings, dtype) / measured_ms


# --------------------------------------------------------------------------------------------------
# The work of the fused layer (ActNorm + LU 1x1 conv) per mode

LAYER_MODES = ("forward", "fwd+bwd", "inverse", "inverse fwd+bwd", "backward")
def layer_work(shape, mode, itemsize=4):
    """{"flops", "bytes", "path"} of one call of the fused layer at shape (N, C, H, W) in `mode`.

    The least work our algorithm needs, so that 100% of the roofline means a perfect implementation
    of it (P = N·H·W pixels):

    - Pixels: 2·C²·P flops per channel mix. forward and inverse do one (y = Wf·x + c; on the
      factored path two triangular products or solves of C²·P each, the same count); the backward
      adds two more: dL/dx = Wfᵀ·dL/dy and the weight gradient Σ dL/dy·xᵀ (the inverse op's
      backward likewise: dL/dy = Wf⁻ᵀ·dL/dx and Σ dL/dy·xᵀ). "fwd+bwd" and "inverse fwd+bwd" are
      the pass plus its backward, "backward" the forward op's backward alone.
    - C×C algebra, only on the folded path (the factored path never forms W): assembling W = P·L·U'
      from two triangular factors, 2C³/3; W⁻¹ = U'⁻¹·L⁻¹·Pᵀ, two triangular inverses (C³/3 each)
      and a triangular product (2C³/3), 4C³/3; the backward's chain rule to L and U', two products
      of a C×C matrix with a triangular factor, C³ each. Folding ActNorm into W adds O(C²).
    - Element-wise O(C·P) work (the bias sums, ActNorm on the factored path) is left out: at most
      1/C of a channel mix.
    - Bytes: every image-sized tensor read or written once: x and y for a pass, plus dL/dy read, x
      read again and dL/dx written for its backward; the parameters (2·C² + 3·C values and the
      int64 permutation) read once per pass and their gradients written once per backward.

    All flops count at the input dtype's GEMM rate, also where the op runs the C×C algebra in
    float64 for accuracy: what that costs shows as lost roofline.
    """
    n, c, h, w = shape
    pixels = n * h * w
    factored = ops.uses_factored_path(c, pixels)
    mix = 2 * c * c * pixels
    assembly, inversion, chain_rule = (0, 0, 0) if factored else (2 * c**3 / 3, 4 * c**3 / 3, 2 * c**3)
    fold = 0 if factored else 4 * c * c
    image = c * pixels * itemsize
    params = (2 * c * c + 3 * c) * itemsize + 8 * c
    grads = (2 * c * c + 3 * c) * itemsize
    forward = (mix + assembly + fold, 2 * image + params)
    inverse = (mix + inversion + fold, 2 * image + params)
    backward = (2 * mix + chain_rule + fold, 3 * image + params + grads)
    passes = {"forward": (forward,), "inverse": (inverse,), "backward": (backward,),
              "fwd+bwd": (forward, backward), "inverse fwd+bwd": (inverse, backward)}[mode]
    return {"flops": sum(f for f, _ in passes), "bytes": sum(b for _, b in passes),
            "path": "factored" if factored else "folded"}
