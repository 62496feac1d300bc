"""The methods `glow-ext bench-ops` compares (see glow_ext.bench.ops for what each one is), on a
Problem (one shape's input and parameters, shared by every method); their agreement checks; the
timing of one problem in every mode; the CUDA extras (bandwidth against a copy, host-sync check);
the per-shape table."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import roofline
from .common import gbps, geomean, synchronizer, time_methods

# A shape large enough for a meaningful bandwidth figure on a GPU (~100 MB each way).
CUDA_BANDWIDTH_SHAPE = (128, 48, 64, 64)

# "inverse fwd+bwd": the inverse with autograd into y and every parameter (reversible backprop,
# flows trained in the sampling direction).
MODES = ("forward", "fwd+bwd", "inverse", "inverse fwd+bwd")
TRAINING_MODES = ("fwd+bwd", "inverse fwd+bwd")
BASELINES = ("naive", "lu_layer", "folded", "folded_perm")
# The baselines of the training goals (folded_perm is a stronger plain-PyTorch form at large C).
TARGET_BASELINES = ("naive", "lu_layer", "folded")
METHODS_BY_MODE = {
    "forward": ("ours",) + BASELINES + ("clone",),
    "fwd+bwd": ("ours", "ours_backward") + BASELINES,
    "inverse": ("ours",) + BASELINES,
    "inverse fwd+bwd": ("ours",) + BASELINES,
}
METHOD_DESCRIPTIONS = {
    "ours": "glow_ext.ops.actnorm_invconv_lu / _inverse",
    "ours_backward": "ours' backward alone (timed in the fwd+bwd mode: one forward outside the "
                     "timed region, then backward(retain_graph=True) per call)",
    "naive": "(a) ActNorm + F.conv2d with a plain weight; logdet via slogdet; inverse via torch.inverse",
    "lu_layer": "(b) LU layer assembling W with two CxC matmuls per call (dense P, masks); ActNorm "
                "separate; F.conv2d; inverse via torch.inverse",
    "folded": "(c) plain float32 PyTorch as a user would write it: masks built once, W = P @ (lower*lmask + I) @ "
              "(upper*umask + diag(sign_s*exp(log_s))), a = exp(logs), y = baddbmm((W @ (a*bias))"
              ".view(1,C,1), (W*a).expand(N,C,C), x.view(N,C,H*W)), logdet = H*W*(logs.sum() + "
              "log_s.sum()), autograd for the rest; inverse: W^-1 from two solve_triangular calls "
              "on the same masked factors, folded likewise, one baddbmm",
    "folded_perm": "(c') the same fold with W = (tril(lower, -1) + I) @ (triu(upper, 1) + "
                   "diag(sign_s*exp(log_s))) with its rows permuted by indexing: one C x C matmul "
                   "fewer than (c), so faster at large C; inverse from two solve_triangular calls",
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

    def y(self):
        """The forward op's output at x: the input of the inverse modes."""
        with torch.no_grad():
            return ours_forward(self, self.x, *self.lu_theta())[0]

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


def _masked_factors(pb, lower, upper, log_s):
    """L = lower*lmask + I and U' = upper*umask + diag(sign_s*exp(log_s)), masks built once."""
    return lower * pb.l_mask + pb.eye, upper * pb.u_mask + torch.diag(pb.sign_s * log_s.exp())


def lu_layer_weight(pb, lower, upper, log_s):
    unit_lower, upper_factor = _masked_factors(pb, lower, upper, log_s)
    return pb.p_matrix @ unit_lower @ upper_factor


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


def folded_forward(pb, x, bias, logs, lower, upper, log_s):
    """The "folded" baseline: W from the masked factors, ActNorm folded into it, one baddbmm."""
    n, c, h, w = x.shape
    weight = lu_layer_weight(pb, lower, upper, log_s)
    a = logs.exp()
    y = torch.baddbmm((weight @ (a * bias)).view(1, c, 1), (weight * a).expand(n, c, c),
                      x.view(n, c, h * w))
    return y.view(n, c, h, w), (h * w) * (logs.sum() + log_s.sum())


def _triangular_factors(pb, lower, upper, log_s):
    """L and U' by tril/triu on every call (no mask buffers)."""
    return torch.tril(lower, -1) + pb.eye, torch.triu(upper, 1) + torch.diag(pb.sign_s * log_s.exp())


def folded_perm_forward(pb, x, bias, logs, lower, upper, log_s):
    n, c, h, w = x.shape
    unit_lower, upper_factor = _triangular_factors(pb, lower, upper, log_s)
    weight = (unit_lower @ upper_factor)[pb.perm]  # (P v)[i] = v[perm[i]]
    a = logs.exp()
    y = torch.baddbmm((weight @ (a * bias)).view(1, c, 1), (weight * a).expand(n, c, c),
                      x.view(n, c, h * w))
    return y.view(n, c, h, w), (h * w) * (logs.sum() + log_s.sum())


def folded_inverse(pb, y, bias, logs, lower, upper, log_s, factors=_masked_factors):
    n, c, h, w = y.shape
    unit_lower, upper_factor = factors(pb, lower, upper, log_s)
    m = torch.linalg.solve_triangular(unit_lower, pb.eye, upper=False, unitriangular=True)  # L⁻¹
    m = torch.linalg.solve_triangular(upper_factor, m, upper=True)  # U'⁻¹·L⁻¹
    w_inv = m[:, pb.perm]  # ·Pᵀ
    folded = w_inv * (-logs).exp().unsqueeze(1)  # diag(exp(-logs))·W⁻¹
    x = torch.baddbmm((-bias).view(1, c, 1), folded.expand(n, c, c), y.reshape(n, c, h * w))
    return x.view(n, c, h, w)


def folded_perm_inverse(pb, y, bias, logs, lower, upper, log_s):
    return folded_inverse(pb, y, bias, logs, lower, upper, log_s, factors=_triangular_factors)


FORWARD = {"ours": ours_forward, "naive": naive_forward, "lu_layer": lu_layer_forward,
           "folded": folded_forward, "folded_perm": folded_perm_forward}
INVERSE = {"ours": ours_inverse, "naive": naive_inverse, "lu_layer": lu_layer_inverse,
           "folded": folded_inverse, "folded_perm": folded_perm_inverse}


def training_loss(pb, mode, method):
    """(leaves, loss): fresh leaves requiring grad (the image, then the method's parameters) and a
    function computing the scalar that a training mode differentiates from them: <y, g> + logdet
    for "fwd+bwd", <x, g> through the inverse for "inverse fwd+bwd"."""
    g = pb.g
    if mode == "inverse fwd+bwd":
        fn = INVERSE[method]
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.y(),) + pb.theta(method))

        def loss():
            return (fn(pb, *leaves) * g).sum()
    else:
        fn = FORWARD[method]
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + pb.theta(method))

        def loss():
            y, logdet = fn(pb, *leaves)
            return (y * g).sum() + logdet

    return leaves, loss


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
        y = pb.y()
        return lambda: fn(pb, y, *theta)
    if method == "ours_backward":
        leaves, loss = training_loss(pb, mode, "ours")
        graph = loss()

        def backward_only():
            graph.backward(retain_graph=True)
            for t in leaves:
                t.grad = None

        return backward_only
    leaves, loss = training_loss(pb, mode, method)

    def step():
        loss().backward()
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


def _gradients(pb, mode, method):
    """{name: gradient} of one call of `method` in a training mode and its backward."""
    leaves, loss = training_loss(pb, mode, method)
    loss().backward()
    image = "x" if mode == "fwd+bwd" else "y"
    names = (image, "bias", "logs", "weight") if method == "naive" else (
        image, "bias", "logs", "lower", "upper", "log_s")
    return dict(zip(names, (t.grad for t in leaves)))


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

    for mode in TRAINING_MODES:
        grads = {method: _gradients(pb, mode, method) for method in ("ours",) + BASELINES}
        prefix = "grad" if mode == "fwd+bwd" else "inverse_grad"
        for method in BASELINES:
            # naive's parameter is the plain weight: only the image, bias and logs are shared.
            for name in [n for n in grads[method] if n in grads["ours"]]:
                record(f"{prefix}.{method}.{name}", rel_err(grads[method][name], grads["ours"][name]),
                       GRAD_TOL)
    if failures:
        raise AgreementError(f"shape {pb.label()}: the methods disagree with glow_ext.ops:\n  "
                             + "\n  ".join(failures))
    return errors


def time_problem(pb, sync, reps, min_time_s, warmup, ceilings, on_mode=None):
    """Every mode and method of MODES at one problem: (results, ratios).

    results[mode][method] is time_methods' summary, plus results["bandwidth_gbps"] (bytes read and
    written by the forward pass over its median time, ours and clone) and results["roofline"]
    (shape_roofline, against `ceilings` from glow_ext.bench.roofline.measure_ceilings);
    ratios[mode][baseline] is baseline time / ours, plus ratios["forward"]["clone_over_ours"].
    on_mode(mode), if given, is called before each mode is timed (progress display).
    """
    results = {}
    for mode in MODES:
        if on_mode is not None:
            on_mode(mode)
        callables = {m: make_callable(pb, mode, m) for m in METHODS_BY_MODE[mode]}
        results[mode] = time_methods(callables, sync, reps, min_time_s, warmup,
                                     grad_mode=(mode in TRAINING_MODES))
    ours_fwd = results["forward"]["ours"]["median_ms"]
    clone_fwd = results["forward"]["clone"]["median_ms"]
    ratios = {mode: {b: results[mode][b]["median_ms"] / results[mode]["ours"]["median_ms"]
                     for b in BASELINES} for mode in MODES}
    ratios["forward"]["clone_over_ours"] = clone_fwd / ours_fwd
    nbytes = 2 * pb.x.numel() * pb.x.element_size()
    results["bandwidth_gbps"] = {"ours_forward": gbps(nbytes, ours_fwd),
                                 "clone": gbps(nbytes, clone_fwd)}
    ours_ms = {m: results[m]["ours"]["median_ms"] for m in MODES}
    ours_ms["backward"] = results["fwd+bwd"]["ours_backward"]["median_ms"]
    results["roofline"] = shape_roofline(pb.shape, ours_ms, ceilings, pb.x.dtype,
                                         results["bandwidth_gbps"]["clone"])
    return results, ratios


def shape_roofline(shape, ours_ms, ceilings, dtype=torch.float32, clone_gbps=0.0):
    """{mode: {"flops", "bytes", "path", "floor_ms", "copy_gbps", "ms", "pct"}}: ours' median time per
    mode (MODES and "backward", the forward op's backward alone) against the least time its work
    could take (glow_ext.bench.roofline.layer_work).

    The memory side takes the faster of the run's copy bandwidth (a copy far past the last-level
    cache) and clone_gbps, x.clone()'s at this shape: a small image stays in cache, and the DRAM
    rate alone would make its floor too high."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    ceilings = dict(ceilings, copy_gbps=max(ceilings["copy_gbps"], clone_gbps))
    out = {}
    for mode, ms in ours_ms.items():
        work = roofline.layer_work(shape, mode, itemsize)
        floor = roofline.floor_ms(work["flops"], work["bytes"], ceilings, dtype)
        out[mode] = dict(work, floor_ms=floor, copy_gbps=ceilings["copy_gbps"], ms=ms,
                         pct=100.0 * floor / ms)
    return out


# --------------------------------------------------------------------------------------------------
# Summaries over shapes and the training goals

# The training goals: the training path never slower than plain PyTorch, 2x folded on average, the
# backward at most twice the forward and every pass at >= 70% of its roofline at C <= 48.
SMALL_C = 48
ROOFLINE_TARGET_PCT = 70.0


def ratio_summary(ratios):
    """{mode: {baseline: {"geomean", "shapes_below_1x", "n_shapes", "worst", "worst_shape"}}} over
    ratios = {shape label: time_problem's ratios}."""
    out = {}
    for mode in MODES:
        out[mode] = {}
        for b in BASELINES:
            per_shape = {label: r[mode][b] for label, r in ratios.items()}
            worst = min(per_shape, key=per_shape.get)
            out[mode][b] = {"geomean": geomean(per_shape.values()),
                            "shapes_below_1x": sum(v < 1.0 for v in per_shape.values()),
                            "n_shapes": len(per_shape), "worst": per_shape[worst], "worst_shape": worst}
    return out


def make_target(name, value, op, threshold, detail=None):
    """A goal as the reports store it: `target` names what is measured, `passed` whether
    value op threshold holds."""
    passed = value >= threshold if op == ">=" else value <= threshold
    entry = {"target": name, "value": value, "op": op, "threshold": threshold, "passed": bool(passed)}
    if detail:
        entry["detail"] = detail
    return entry


def training_targets(results, ratios):
    """The training goals (make_target entries) over {shape label: time_problem's results} and
    {label: ratios}."""
    summary = ratio_summary(ratios)
    targets = []
    for mode, baselines in (("fwd+bwd", TARGET_BASELINES), ("inverse fwd+bwd", ("naive",))):
        worst = min((summary[mode][b]["worst"], summary[mode][b]["worst_shape"], b) for b in baselines)
        below = ", ".join(f"{b} {summary[mode][b]['shapes_below_1x']}/{summary[mode][b]['n_shapes']}"
                          for b in baselines)
        targets.append(make_target(f"{mode}: >= 1.0x vs {', '.join(baselines)} at every shape",
                                   worst[0], ">=", 1.0,
                                   f"worst {worst[2]} at {worst[1]}; shapes below 1.0x: {below}"))
    targets.append(make_target("fwd+bwd geomean vs folded", summary["fwd+bwd"]["folded"]["geomean"],
                               ">=", 2.0))
    small = [label for label in results if int(label.split("x")[1]) <= SMALL_C]
    if not small:
        return targets
    roofs = {label: results[label]["roofline"] for label in small}
    per_shape = {label: r["backward"]["ms"] / r["forward"]["ms"] for label, r in roofs.items()}
    worst = max(per_shape, key=per_shape.get)
    targets.append(make_target(f"C <= {SMALL_C}: backward / forward time", per_shape[worst], "<=", 2.0,
                               f"worst at {worst}"))
    for mode in ("forward", "backward", "inverse"):
        pct = {label: r[mode]["pct"] for label, r in roofs.items()}
        worst = min(pct, key=pct.get)
        targets.append(make_target(f"C <= {SMALL_C}: {mode} % of roofline", pct[worst], ">=",
                                   ROOFLINE_TARGET_PCT, f"worst at {worst}"))
    return targets


# --------------------------------------------------------------------------------------------------
# CUDA extras: bandwidth and host-synchronisation check


def cuda_bandwidth(shape, reps, min_time_s, warmup, seed):
    pb = Problem(shape, "cuda", seed)
    sync = synchronizer("cuda")
    res = time_methods({"ours": make_callable(pb, "forward", "ours"),
                        "clone": make_callable(pb, "forward", "clone")},
                       sync, reps, min_time_s, warmup, grad_mode=False)
    nbytes = 2 * pb.x.numel() * pb.x.element_size()
    ours, clone = gbps(nbytes, res["ours"]["median_ms"]), gbps(nbytes, res["clone"]["median_ms"])
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


def _fmt_ms(ms):
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def print_shape_table(label, shape_results, stream):
    """ms per call (ours ± IQR, baselines with baseline/ours) and ours' % of the roofline, per mode."""
    cols = ("ours",) + BASELINES + ("clone",)
    roof = shape_results["roofline"]
    print(f"  {'mode':<15} " + " ".join(f"{c:>18}" for c in cols) + f" {'roofline':>9}", file=stream)
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
        print(f"  {mode:<15} " + " ".join(cells) + f" {roof[mode]['pct']:>8.1f}%", file=stream)
    print(f"  {'(backward)':<15} " + f"{_fmt_ms(roof['backward']['ms']):>18} "
          + " ".join(f"{'':>18}" for _ in cols[1:]) + f" {roof['backward']['pct']:>8.1f}%", file=stream)
    stream.flush()
