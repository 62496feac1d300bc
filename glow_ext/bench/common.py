"""What every benchmark shares: timing (calibrated blocks of calls, measured round-robin, medians
with their spread), geometric means, and the report header (date, machine, torch, build).

Timing: each measurement times a block of calls lasting at least min_time_s, after a warm-up; the
methods being compared are measured in turn (round-robin) so that load drift hits all alike.
"""
import datetime
import math
import os
import platform
import statistics
import time

import torch

# glibc returns freed blocks above these sizes to the OS, so every fresh output of a few hundred KB
# page-faults again; whether that happens depends on the process's allocation history, which makes
# CPU timings of every method bimodal between runs. scripts/main.sh raises both.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def synchronizer(device):
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_block(fn, inner, sync):
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return time.perf_counter() - start


def calibrate(fn, sync, min_time_s, max_inner=1 << 20):
    """Smallest-ish loop count whose run takes at least min_time_s."""
    inner = 1
    while True:
        elapsed = time_block(fn, inner, sync)
        if elapsed >= min_time_s or inner >= max_inner:
            return inner
        wanted = math.ceil(inner * min_time_s * 1.2 / max(elapsed, 1e-9))
        inner = min(max_inner, max(inner * 2, min(inner * 100, wanted)))


def summarize(per_call_s, inner):
    ms = sorted(t * 1e3 for t in per_call_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "iqr_ms": q3 - q1, "n": len(ms), "inner": inner,
            "min_ms": ms[0]}


def time_methods(callables, sync, reps, min_time_s, warmup, grad_mode):
    """Median/IQR per call for each callable, measured round-robin so load drift hits all alike."""
    inner = {}
    with torch.set_grad_enabled(grad_mode):
        for name, fn in callables.items():
            for _ in range(warmup):
                fn()
            sync()
            inner[name] = calibrate(fn, sync, min_time_s)
        samples = {name: [] for name in callables}
        for _ in range(reps):
            for name, fn in callables.items():
                samples[name].append(time_block(fn, inner[name], sync) / inner[name])
    return {name: summarize(samples[name], inner[name]) for name in callables}


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def geomean_str(value):
    return f"{value:.2f}x" if math.isfinite(value) else "n/a"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report_header(device):
    """What every benchmark report starts with: when, where, on which torch, package and build."""
    import glow_ext

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "machine": machine_info(device),
            "torch_version": torch.__version__, "glow_ext_version": glow_ext.__version__,
            "build_info": build_description()}


def build_description():
    """glow_ext.build_info() without the module's path: results are committed, and where the
    kernels sat on the machine that measured them tells a reader nothing."""
    import glow_ext

    return {key: value for key, value in glow_ext.build_info().items() if key != "module"}


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "malloc_env": {name: os.environ.get(name) for name in MALLOC_ENV},
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count,
                    cuda_runtime=torch.version.cuda)
    return info


class BenchError(RuntimeError):
    """A check failed or the run cannot start; nothing of that part was timed."""
