"""This machine's ceilings, measured in the run that quotes them, and a time's share of its roofline.

A roofline figure divides the least time the work could take (max of flops / GEMM rate and bytes /
copy bandwidth) by the measured time: 100% means the call runs at the machine's ceiling. The
ceilings are measured with the same threads and timing as the benchmark itself: a large square
torch.mm per dtype (the best rate a library reaches here) and a large tensor copy (bytes read plus
bytes written).
"""
import torch

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
