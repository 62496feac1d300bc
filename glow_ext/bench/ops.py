"""Op benchmark: the fused ActNorm + LU 1x1 convolution against pure-PyTorch formulations.

Run as `python -m glow_ext bench-ops [options]` (or `glow-ext bench-ops`, or
`python benchmarks/bench_ops.py`). Every method starts from the same LU parameters:

  ours      glow_ext.ops.actnorm_invconv_lu / actnorm_invconv_lu_inverse
  naive     (a) ActNorm, then F.conv2d with a plain (C, C, 1, 1) weight (a layer parameter, built
            once outside the timed region); logdet through torch.linalg.slogdet(W); the inverse
            computes torch.inverse(W) on every call
  lu_layer  (b) the usual LU layer: W = P @ (lower*l_mask + I) @ (upper*u_mask + diag(sign_s*exp(log_s)))
            assembled with two C x C matmuls on every call (P a dense matrix buffer), ActNorm as a
            separate op, F.conv2d; the inverse runs torch.inverse on the assembled W
  folded    (c) the best plain-PyTorch form: W = (L @ U')[perm], ActNorm folded into it, one
            torch.baddbmm; the inverse takes W^-1 from two triangular solves and folds it likewise
  clone     (d) x.clone(): the memory floor

Modes: forward (y and logdet, under no_grad), fwd+bwd (loss = (y*g).sum() + logdet, backward
through autograd into x and the parameters) and inverse (under no_grad). Before anything is timed
the methods are checked against ours (outputs, logdet, inverse round trip, gradients); a mismatch
aborts the run. Speed targets are evaluated and printed, but a missed target never changes the exit
status.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = (
    (64, 12, 16, 16),
    (64, 24, 8, 8),
    (64, 48, 4, 4),
    (16, 12, 32, 32),
    (64, 96, 8, 8),
    (4, 12, 128, 128),
    (16, 512, 4, 4),
    (16, 1024, 4, 4),
)
# One small-C shape (the per-pixel regime) and one large-C shape (the O(C^3) assembly regime).
QUICK_SHAPES = ((64, 12, 16, 16), (16, 512, 4, 4))
# A shape large enough for a meaningful bandwidth figure on a GPU (~100 MB each way).
CUDA_BANDWIDTH_SHAPE = (128, 48, 64, 64)

MODES = ("forward", "fwd+bwd", "inverse")
# glibc returns freed blocks above these sizes to the OS, so every fresh output of a few hundred KB
# page-faults again; whether that happens depends on the process's allocation history, which makes
# CPU timings of every method bimodal between runs. scripts/main.sh raises both.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
BASELINES = ("naive", "lu_layer", "folded")
METHODS_BY_MODE = {
    "forward": ("ours",) + BASELINES + ("clone",),
    "fwd+bwd": ("ours",) + BASELINES,
    "inverse": ("ours",) + BASELINES,
}
METHOD_DESCRIPTIONS = {
    "ours": "glow_ext.ops.actnorm_invconv_lu / _inverse",
    "naive": "(a) ActNorm + F.conv2d with a plain weight; logdet via slogdet; inverse via torch.inverse",
    "lu_layer": "(b) LU layer assembling W with two CxC matmuls per call (dense P, masks); ActNorm "
                "separate; F.conv2d; inverse via torch.inverse",
    "folded": "(c) W=(L@U')[perm] with ActNorm folded in, one baddbmm; inverse from two "
              "solve_triangular calls, folded, one baddbmm",
    "clone": "(d) x.clone(), the memory floor",
}

# Agreement tolerances (float32): max|a - b| / max|b| per tensor.
OUTPUT_TOL = 1e-4
ROUND_TRIP_TOL = 1e-4
GRAD_TOL = 1e-4
PERTURBATION = 0.01  # of the random rotation's LU factors, so that W is a generic (cond < 2) matrix


# --------------------------------------------------------------------------------------------------
# The problem: one set of parameters shared by every method


class Problem:
    """Input, upstream gradient and LU parameters for one shape, plus each baseline's buffers."""

    def __init__(self, shape, device, seed=0, dtype=torch.float32):
        from ..nn import random_rotation_lu
        from ..reference import lu_weight

        n, c, h, w = shape
        self.shape = tuple(shape)
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed * 100003 + c)
        perm, lower, upper, log_s, sign_s = random_rotation_lu(c, generator=gen, dtype=torch.float64)
        eps = PERTURBATION / math.sqrt(c)
        lower = lower + eps * torch.randn(c, c, generator=gen, dtype=torch.float64).tril(-1)
        upper = upper + eps * torch.randn(c, c, generator=gen, dtype=torch.float64).triu(1)
        log_s = log_s + PERTURBATION * torch.randn(c, generator=gen, dtype=torch.float64)
        bias = 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)
        logs = 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)
        weight = lu_weight(perm, lower, upper, log_s, sign_s)  # float64, then cast below
        self.cond = float(torch.linalg.cond(weight))

        def put(t):
            return t.to(device=self.device, dtype=dtype if t.is_floating_point() else t.dtype)

        self.x = put(torch.randn(shape, generator=gen, dtype=torch.float64))
        self.g = put(torch.randn(shape, generator=gen, dtype=torch.float64))
        self.bias, self.logs, self.lower, self.upper, self.log_s, self.sign_s = map(
            put, (bias, logs, lower, upper, log_s, sign_s))
        self.perm = perm.to(self.device)
        # (a) the plain layer's parameter, assembled once.
        self.weight = put(weight).reshape(c, c, 1, 1).contiguous()
        # (b)'s buffers.
        self.p_matrix = put(torch.eye(c, dtype=torch.float64)[perm])  # P[i, j] = 1 iff j == perm[i]
        self.u_mask = put(torch.ones(c, c, dtype=torch.float64).triu(1))
        self.l_mask = self.u_mask.T.contiguous()
        self.eye = put(torch.eye(c, dtype=torch.float64))

    def label(self):
        return "x".join(map(str, self.shape))

    def lu_theta(self):
        """The LU methods' trainable parameters (ours, lu_layer, folded)."""
        return (self.bias, self.logs, self.lower, self.upper, self.log_s)

    def theta(self, method):
        if method == "naive":
            return (self.bias, self.logs, self.weight)
        return self.lu_theta()


# --------------------------------------------------------------------------------------------------
# The methods. Forward functions take (problem, x, *theta) and return (y, logdet); inverse
# functions take (problem, y, *theta) and return x.


def _actnorm(x, bias, logs):
    return (x + bias.view(1, -1, 1, 1)) * logs.exp().view(1, -1, 1, 1)


def _actnorm_inverse(h, bias, logs):
    return h * (-logs).exp().view(1, -1, 1, 1) - bias.view(1, -1, 1, 1)


def ours_forward(pb, x, bias, logs, lower, upper, log_s):
    from ..ops import actnorm_invconv_lu

    return actnorm_invconv_lu(x, bias, logs, pb.perm, lower, upper, log_s, pb.sign_s)


def ours_inverse(pb, y, bias, logs, lower, upper, log_s):
    from ..ops import actnorm_invconv_lu_inverse

    return actnorm_invconv_lu_inverse(y, bias, logs, pb.perm, lower, upper, log_s, pb.sign_s)


def naive_forward(pb, x, bias, logs, weight):
    c = weight.shape[0]
    y = F.conv2d(_actnorm(x, bias, logs), weight)
    logdet = (x.shape[2] * x.shape[3]) * (logs.sum() + torch.linalg.slogdet(weight.view(c, c))[1])
    return y, logdet


def naive_inverse(pb, y, bias, logs, weight):
    c = weight.shape[0]
    w_inv = torch.inverse(weight.view(c, c))
    return _actnorm_inverse(F.conv2d(y, w_inv.view(c, c, 1, 1)), bias, logs)


def lu_layer_weight(pb, lower, upper, log_s):
    upper_factor = upper * pb.u_mask + torch.diag(pb.sign_s * log_s.exp())
    return pb.p_matrix @ (lower * pb.l_mask + pb.eye) @ upper_factor


def lu_layer_forward(pb, x, bias, logs, lower, upper, log_s):
    c = lower.shape[0]
    weight = lu_layer_weight(pb, lower, upper, log_s)
    y = F.conv2d(_actnorm(x, bias, logs), weight.view(c, c, 1, 1))
    logdet = (x.shape[2] * x.shape[3]) * (logs.sum() + log_s.sum())
    return y, logdet


def lu_layer_inverse(pb, y, bias, logs, lower, upper, log_s):
    c = lower.shape[0]
    w_inv = torch.inverse(lu_layer_weight(pb, lower, upper, log_s))
    return _actnorm_inverse(F.conv2d(y, w_inv.view(c, c, 1, 1)), bias, logs)


def _folded_factors(pb, lower, upper, log_s):
    unit_lower = torch.tril(lower, -1) + pb.eye
    upper_factor = torch.triu(upper, 1) + torch.diag(pb.sign_s * log_s.exp())
    return unit_lower, upper_factor


def folded_forward(pb, x, bias, logs, lower, upper, log_s):
    n, c, h, w = x.shape
    unit_lower, upper_factor = _folded_factors(pb, lower, upper, log_s)
    weight = (unit_lower @ upper_factor)[pb.perm]  # (P v)[i] = v[perm[i]]
    scale = logs.exp()
    folded = weight * scale  # W·diag(exp(logs))
    offset = weight @ (scale * bias)  # W·(exp(logs)⊙bias)
    y = torch.baddbmm(offset.view(1, c, 1), folded.expand(n, c, c), x.reshape(n, c, h * w))
    return y.view(n, c, h, w), (h * w) * (logs.sum() + log_s.sum())


def folded_inverse(pb, y, bias, logs, lower, upper, log_s):
    n, c, h, w = y.shape
    unit_lower, upper_factor = _folded_factors(pb, lower, upper, log_s)
    m = torch.linalg.solve_triangular(unit_lower, pb.eye, upper=False, unitriangular=True)  # L⁻¹
    m = torch.linalg.solve_triangular(upper_factor, m, upper=True)  # U'⁻¹·L⁻¹
    w_inv = m[:, pb.perm]  # ·Pᵀ
    folded = w_inv * (-logs).exp().unsqueeze(1)  # diag(exp(-logs))·W⁻¹
    x = torch.baddbmm((-bias).view(1, c, 1), folded.expand(n, c, c), y.reshape(n, c, h * w))
    return x.view(n, c, h, w)


FORWARD = {"ours": ours_forward, "naive": naive_forward, "lu_layer": lu_layer_forward,
           "folded": folded_forward}
INVERSE = {"ours": ours_inverse, "naive": naive_inverse, "lu_layer": lu_layer_inverse,
           "folded": folded_inverse}


def make_callable(pb, mode, method):
    """A no-argument function running one call of `method` in `mode` (grads reset after backward)."""
    if method == "clone":
        x = pb.x
        return lambda: x.clone()
    theta = pb.theta(method)
    if mode == "forward":
        fn = FORWARD[method]
        x = pb.x
        return lambda: fn(pb, x, *theta)
    if mode == "inverse":
        fn = INVERSE[method]
        with torch.no_grad():
            y = ours_forward(pb, pb.x, *pb.lu_theta())[0]
        return lambda: fn(pb, y, *theta)
    fn = FORWARD[method]
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + theta)
    g = pb.g

    def step():
        y, logdet = fn(pb, *leaves)
        ((y * g).sum() + logdet).backward()
        for t in leaves:
            t.grad = None

    return step


# --------------------------------------------------------------------------------------------------
# Agreement checks


class AgreementError(RuntimeError):
    pass


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_problem(pb):
    """Compare every method with ours; return the errors, raise AgreementError on a mismatch."""
    errors = {}
    failures = []

    def record(key, value, tol):
        errors[key] = value
        if not (value < tol):  # also catches NaN
            failures.append(f"{key}: relative max error {value:.3g} >= {tol:g}")

    n, c, h, w = pb.shape
    with torch.no_grad():
        y_ours, ld_ours = ours_forward(pb, pb.x, *pb.lu_theta())
        # logdet is a sum of H·W·2C terms: measure its error against their magnitude.
        ld_scale = max(abs(float(ld_ours)),
                       h * w * float(pb.logs.abs().sum() + pb.log_s.abs().sum()))
        for method in BASELINES:
            y, ld = FORWARD[method](pb, pb.x, *pb.theta(method))
            record(f"forward.{method}.y", rel_err(y, y_ours), OUTPUT_TOL)
            record(f"forward.{method}.logdet", abs(float(ld) - float(ld_ours)) / ld_scale, OUTPUT_TOL)
        ld_expected = h * w * float(pb.logs.double().sum() + pb.log_s.double().sum())
        record("forward.ours.logdet_formula", abs(float(ld_ours) - ld_expected) / ld_scale, OUTPUT_TOL)
        x_ours = None
        for method in ("ours",) + BASELINES:
            x = INVERSE[method](pb, y_ours, *pb.theta(method))
            record(f"inverse.{method}.round_trip", rel_err(x, pb.x), ROUND_TRIP_TOL)
            if method == "ours":
                x_ours = x
            else:
                record(f"inverse.{method}.vs_ours", rel_err(x, x_ours), ROUND_TRIP_TOL)

    names = ("x", "bias", "logs", "lower", "upper", "log_s")
    grads = {}
    for method in ("ours",) + BASELINES:
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + pb.theta(method))
        y, logdet = FORWARD[method](pb, *leaves)
        ((y * pb.g).sum() + logdet).backward()
        grads[method] = dict(zip(names, (t.grad for t in leaves)))
    for method in BASELINES:
        # naive's parameter is the plain weight: only x, bias and logs are shared with ours.
        shared = names[:3] if method == "naive" else names
        for name in shared:
            record(f"grad.{method}.{name}", rel_err(grads[method][name], grads["ours"][name]), GRAD_TOL)
    if failures:
        raise AgreementError(f"shape {pb.label()}: the methods disagree with glow_ext.ops:\n  "
                             + "\n  ".join(failures))
    return errors


# --------------------------------------------------------------------------------------------------
# Timing


def _synchronizer(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _time_block(fn, inner, sync):
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
        elapsed = _time_block(fn, inner, sync)
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
                samples[name].append(_time_block(fn, inner[name], sync) / inner[name])
    return {name: summarize(samples[name], inner[name]) for name in callables}


def _gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def time_problem(pb, sync, reps, min_time_s, warmup, on_mode=None):
    """Every mode and method of MODES at one problem: (results, ratios).

    results[mode][method] is time_methods' summary, plus results["bandwidth_gbps"] (bytes read and
    written by the forward pass over its median time, ours and clone); ratios[mode][baseline] is
    baseline time / ours, plus ratios["forward"]["clone_over_ours"]. on_mode(mode), if given, is
    called before each mode is timed (progress display).
    """
    results = {}
    for mode in MODES:
        if on_mode is not None:
            on_mode(mode)
        callables = {m: make_callable(pb, mode, m) for m in METHODS_BY_MODE[mode]}
        results[mode] = time_methods(callables, sync, reps, min_time_s, warmup,
                                     grad_mode=(mode == "fwd+bwd"))
    ours_fwd = results["forward"]["ours"]["median_ms"]
    clone_fwd = results["forward"]["clone"]["median_ms"]
    ratios = {mode: {b: results[mode][b]["median_ms"] / results[mode]["ours"]["median_ms"]
                     for b in BASELINES} for mode in MODES}
    ratios["forward"]["clone_over_ours"] = clone_fwd / ours_fwd
    nbytes = 2 * pb.x.numel() * pb.x.element_size()
    results["bandwidth_gbps"] = {"ours_forward": _gbps(nbytes, ours_fwd),
                                 "clone": _gbps(nbytes, clone_fwd)}
    return results, ratios


# --------------------------------------------------------------------------------------------------
# CUDA extras: bandwidth and host-synchronisation check


def cuda_bandwidth(shape, reps, min_time_s, warmup, seed):
    pb = Problem(shape, "cuda", seed)
    sync = _synchronizer("cuda")
    res = time_methods({"ours": make_callable(pb, "forward", "ours"),
                        "clone": make_callable(pb, "forward", "clone")},
                       sync, reps, min_time_s, warmup, grad_mode=False)
    nbytes = 2 * pb.x.numel() * pb.x.element_size()
    ours, clone = _gbps(nbytes, res["ours"]["median_ms"]), _gbps(nbytes, res["clone"]["median_ms"])
    out = {"shape": list(shape), "bytes_moved": nbytes, "ours_forward_gbps": ours,
           "copy_gbps": clone, "fraction_of_copy": ours / clone,
           "ours_median_ms": res["ours"]["median_ms"], "clone_median_ms": res["clone"]["median_ms"]}
    del pb
    torch.cuda.empty_cache()
    return out


def cuda_sync_check(pb):
    """Run each op with torch.cuda.set_sync_debug_mode('error'): any host synchronisation raises."""
    theta = pb.lu_theta()
    with torch.no_grad():
        y = ours_forward(pb, pb.x, *theta)[0]

    def forward():
        with torch.no_grad():
            ours_forward(pb, pb.x, *theta)

    def backward():
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + theta)
        out, logdet = ours_forward(pb, *leaves)
        ((out * pb.g).sum() + logdet).backward()

    def inverse():
        with torch.no_grad():
            ours_inverse(pb, y, *theta)

    def inverse_backward():
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (y,) + theta)
        (ours_inverse(pb, *leaves) * pb.g).sum().backward()

    result = {}
    for name, fn in (("forward", forward), ("backward", backward), ("inverse", inverse),
                     ("inverse_backward", inverse_backward)):
        try:
            fn()  # warm up (library handles, allocator) outside the debug mode
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            result[name] = {"passed": False, "error": f"failed before the check: {error}"}
            continue
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            result[name] = {"passed": True}
        except RuntimeError as error:
            result[name] = {"passed": False, "error": str(error).strip().splitlines()[0][:300]}
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
    return result


# --------------------------------------------------------------------------------------------------
# Reporting


def geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def evaluate_targets(results, ratios, shapes):
    """The issue's speed targets: list of {target, value, threshold, passed}."""
    targets = []

    def target(name, value, op, threshold, detail=None):
        passed = value >= threshold if op == ">=" else value <= threshold
        entry = {"target": name, "value": value, "op": op, "threshold": threshold,
                 "passed": bool(passed)}
        if detail:
            entry["detail"] = detail
        targets.append(entry)

    def gm(mode, baseline):
        return geomean([ratios[s][mode][baseline] for s in ratios])

    target("forward geomean speedup vs (a) naive", gm("forward", "naive"), ">=", 5.0)
    target("forward geomean speedup vs (b) lu_layer", gm("forward", "lu_layer"), ">=", 5.0)
    target("forward geomean speedup vs (c) folded", gm("forward", "folded"), ">=", 1.2)
    worst = min(((ratios[s]["forward"][b], s, b) for s in ratios for b in BASELINES))
    target("forward: no shape below 1.0x vs any baseline", worst[0], ">=", 1.0,
           f"worst: {worst[2]} at {worst[1]}")
    target("fwd+bwd geomean speedup vs (a) naive", gm("fwd+bwd", "naive"), ">=", 3.0)
    target("fwd+bwd geomean speedup vs (c) folded", gm("fwd+bwd", "folded"), ">=", 1.2)
    target("inverse geomean speedup vs (a) naive", gm("inverse", "naive"), ">=", 5.0)
    small = [s for s in shapes if s[1] <= 24]
    if small:
        per_shape = {"x".join(map(str, s)):
                     results["x".join(map(str, s))]["forward"]["ours"]["median_ms"]
                     / results["x".join(map(str, s))]["forward"]["clone"]["median_ms"]
                     for s in small}
        worst_label = max(per_shape, key=per_shape.get)
        target("C <= 24: ours forward time / clone time", per_shape[worst_label], "<=", 2.5,
               f"worst at {worst_label}; per shape "
               + ", ".join(f"{k} {v:.2f}" for k, v in per_shape.items()))
    return targets


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
    """What every benchmark report starts with: when, where, on which torch and build."""
    import glow_ext

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "machine": machine_info(device),
            "torch_version": torch.__version__, "build_info": glow_ext.build_info()}


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


def _fmt_ms(ms):
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def print_shape_table(label, shape_results, stream):
    cols = ("ours", "naive", "lu_layer", "folded", "clone")
    print(f"  {'mode':<8} " + " ".join(f"{c:>18}" for c in cols), file=stream)
    for mode in MODES:
        res = shape_results[mode]
        ours = res["ours"]["median_ms"]
        cells = []
        for col in cols:
            if col not in res:
                cells.append(f"{'-':>18}")
                continue
            r = res[col]
            if col == "ours":
                cell = f"{_fmt_ms(r['median_ms'])}±{_fmt_ms(r['iqr_ms'])}"
            elif col == "clone":
                cell = f"{_fmt_ms(r['median_ms'])} (x{ours / r['median_ms']:.2f})"
            else:
                cell = f"{_fmt_ms(r['median_ms'])} ({r['median_ms'] / ours:.2f}x)"
            cells.append(f"{cell:>18}")
        print(f"  {mode:<8} " + " ".join(cells), file=stream)
    stream.flush()


# --------------------------------------------------------------------------------------------------
# Entry points


def parse_shape(text):
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"a shape is N,C,H,W with positive integers, got {text!r}")
    return shape


def add_arguments(parser, default_out_dir=None):
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device to benchmark on (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shapes {' '.join('x'.join(map(str, s)) for s in QUICK_SHAPES)}, "
                             "few repetitions (well under a minute)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="N,C,H,W",
                        help="shapes to run instead of the default set")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: "
                             f"{Path(default_out_dir or 'benchmarks/results') / 'ops-<device>.json'}, "
                             "ops-<device>-quick.json with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's default)")
    parser.add_argument("--reps", type=int, default=None,
                        help="measurements per method (default: 15, 5 with --quick)")
    parser.add_argument("--min-time-ms", type=float, default=None,
                        help="minimum duration of one measurement (default: 5, 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and inputs")
    parser.set_defaults(_bench_default_out_dir=default_out_dir)


def run(args, stream=sys.stdout):
    """Run the benchmark described by parsed `args`; returns the result dict (also written as JSON)."""
    import glow_ext
    from .. import ops

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-ops: --device cuda, but torch sees no CUDA device")
    info = glow_ext.build_info()
    if not ops.kernels_available():
        raise SystemExit(f"bench-ops: glow_ext's compiled kernels are not loaded ({ops.LOAD_ERROR}); "
                         "'ours' would be the pure-PyTorch reference. Build the extension first.")
    if device == "cuda" and not info.get("cuda_kernels"):
        raise SystemExit(f"bench-ops: glow_ext was built without CUDA kernels (build_info: {info})")

    if device == "cpu" and not all(os.environ.get(name) for name in MALLOC_ENV):
        print("bench-ops: note: " + " and ".join(MALLOC_ENV) + " are not set, so fresh allocations "
              "may page-fault and CPU timings of every method vary between runs (scripts/main.sh "
              "sets them)", file=stream)
    shapes = list(args.shapes or (QUICK_SHAPES if args.quick else SHAPES))
    reps = args.reps or (5 if args.quick else 15)
    min_time_s = (args.min_time_ms or (2.0 if args.quick else 5.0)) / 1e3
    warmup = 2 if args.quick else 5
    out_dir = Path(getattr(args, "_bench_default_out_dir", None) or "benchmarks/results")
    # A quick run never overwrites the full results.
    out_path = Path(args.out) if args.out else out_dir / f"ops-{device}{'-quick' if args.quick else ''}.json"
    sync = _synchronizer(device)

    print(f"glow_ext bench-ops: device={device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {reps} measurements of >= {min_time_s * 1e3:g} ms each",
          file=stream)
    print(f"build_info: {json.dumps(info, sort_keys=True)}", file=stream)
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}", file=stream)

    # 1. Agreement, for every shape before any timing.
    problems, checks = {}, {}
    for shape in shapes:
        pb = Problem(shape, device, args.seed)
        try:
            errors = check_problem(pb)
        except AgreementError as error:
            raise SystemExit(f"bench-ops: AGREEMENT CHECK FAILED, nothing timed.\n{error}") from None
        worst = max(errors, key=errors.get)
        print(f"check {pb.label():>14}: all methods agree with ours (cond(W) {pb.cond:.2f}; "
              f"largest relative error {errors[worst]:.1e} at {worst})", file=stream)
        problems[pb.label()] = pb
        checks[pb.label()] = {"cond_W": pb.cond, "errors": errors}

    # 2. Timing.
    results, ratios = {}, {}
    wall = time.perf_counter()
    for index, (label, pb) in enumerate(problems.items(), 1):
        n, c, h, w = pb.shape
        print(f"[{index}/{len(problems)}] {label}  (C={c}, N·H·W={n * h * w}; "
              "ms per call, median; ours ±IQR; (baseline/ours); clone (x ours/clone))", file=stream)
        results[label], ratios[label] = time_problem(pb, sync, reps, min_time_s, warmup)
        print_shape_table(label, results[label], stream)
    elapsed = time.perf_counter() - wall

    geomeans = {mode: {b: geomean([ratios[s][mode][b] for s in ratios]) for b in BASELINES}
                for mode in MODES}
    targets = evaluate_targets(results, ratios, shapes)

    cuda_extra = None
    if device == "cuda":
        bw = cuda_bandwidth(CUDA_BANDWIDTH_SHAPE, reps, min_time_s, warmup, args.seed)
        small = next((pb for pb in problems.values() if pb.shape[1] <= 192), None)
        large = next((pb for pb in problems.values()
                      if pb.shape[1] > 192 and pb.shape[0] * pb.shape[2] * pb.shape[3] < pb.shape[1]),
                     None)
        sync_checks = {pb.label(): cuda_sync_check(pb) for pb in (small, large) if pb is not None}
        cuda_extra = {"bandwidth": bw, "sync_check": sync_checks,
                      "sync_check_passed": all(r["passed"] for s in sync_checks.values()
                                               for r in s.values())}

    # 3. Summary.
    print("\nsummary: geometric mean over shapes of baseline time / ours (higher is better)", file=stream)
    print(f"  {'mode':<8} " + " ".join(f"{b:>10}" for b in BASELINES), file=stream)
    for mode in MODES:
        print(f"  {mode:<8} " + " ".join(f"{geomean_str(geomeans[mode][b]):>10}" for b in BASELINES),
              file=stream)
    print(f"\ntargets ({device}; evaluated, never fatal):", file=stream)
    for t in targets:
        mark = "PASS" if t["passed"] else "FAIL"
        detail = f"  [{t['detail']}]" if t.get("detail") else ""
        print(f"  {mark}  {t['target']}: {t['value']:.2f} (target {t['op']} {t['threshold']:g}){detail}",
              file=stream)
    if cuda_extra:
        bw = cuda_extra["bandwidth"]
        print(f"\nbandwidth at {'x'.join(map(str, bw['shape']))}: ours forward "
              f"{bw['ours_forward_gbps']:.1f} GB/s vs device copy (x.clone()) {bw['copy_gbps']:.1f} GB/s "
              f"= {100 * bw['fraction_of_copy']:.0f}%", file=stream)
        for label in results:
            b = results[label]["bandwidth_gbps"]
            print(f"  {label:>14}: ours {b['ours_forward']:.1f} GB/s, clone {b['clone']:.1f} GB/s",
                  file=stream)
        print("host-sync check (torch.cuda.set_sync_debug_mode('error')):", file=stream)
        for label, per_op in cuda_extra["sync_check"].items():
            print(f"  {label:>14}: " + ", ".join(
                f"{op} {'PASS' if r['passed'] else 'FAIL (' + r['error'] + ')'}"
                for op, r in per_op.items()), file=stream)

    report = {
        "benchmark": "glow_ext bench-ops",
        **report_header(device),
        "config": {"quick": bool(args.quick), "shapes": [list(s) for s in shapes], "reps": reps,
                   "min_time_ms": min_time_s * 1e3, "warmup": warmup, "seed": args.seed,
                   "dtype": "float32", "perturbation": PERTURBATION,
                   "tolerances": {"output": OUTPUT_TOL, "round_trip": ROUND_TRIP_TOL, "grad": GRAD_TOL},
                   "timing_wall_s": elapsed},
        "methods": METHOD_DESCRIPTIONS,
        "checks": checks,
        "results": results,
        "ratios": ratios,
        "geomeans": geomeans,
        "targets": targets,
        "targets_passed": all(t["passed"] for t in targets),
    }
    if cuda_extra:
        report["cuda"] = cuda_extra
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False, default=float) + "\n")
    tmp.replace(out_path)
    print(f"\nwrote {out_path} (timing took {elapsed:.0f} s)", file=stream)
    return report


def geomean_str(value):
    return f"{value:.2f}x" if math.isfinite(value) else "n/a"


def build_parser(default_out_dir=None):
    parser = argparse.ArgumentParser(
        prog="glow-ext bench-ops",
        description=__doc__.split("\n\n")[0],
        epilog="Baselines: " + "; ".join(f"{k}: {v}" for k, v in METHOD_DESCRIPTIONS.items()))
    add_arguments(parser, default_out_dir)
    return parser


def main(argv=None, default_out_dir=None):
    args = build_parser(default_out_dir).parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
