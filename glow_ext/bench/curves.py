"""Part 1 of `glow-ext bench`: the cost of the log-determinant and of the inverse against the
channel count C (one layer at 4x4 pixels, where the C x C work is all there is), forward and
forward+backward, each method checked against a float64 reference before it is timed, with the
exponent k of time ∝ C^k fitted on the large-C points."""
from __future__ import annotations

import math

import torch

from .. import ops, reference
from . import methods as opbench
from .common import BenchError, synchronizer, time_methods

LOGDET_CHANNELS = tuple(sorted({2 ** k for k in range(3, 12)} | {12 * 2 ** k for k in range(8)}))
QUICK_LOGDET_CHANNELS = (8, 16, 32, 64, 128, 256)
FIT_MIN_C = 256
QUICK_FIT_MIN_C = 64
# The layer-level quantities (logdet of ActNorm + 1x1 conv, the inverse op) are taken at 4x4 pixels of
# one image: a deep level, where the C x C work is all there is.
CURVE_PIXELS = (1, 4, 4)
CURVE_MODES = ("forward", "fwd+bwd")
CURVE_TOL = 1e-3  # float32 against a float64 reference, C up to 2048

LOGDET_METHODS = {
    "slogdet": "H·W·(Σ logs + torch.linalg.slogdet(W).logabsdet), float32",
    "slogdet_f64": "the same with slogdet(W.double()), as rosinality's InvConv2d and "
                   "glow_ext.nn.InvConv2d do",
    "det": "H·W·(Σ logs + log|torch.det(W)|), float32",
    "lu": "ours: H·W·(Σ logs + Σ log_s) (glow_ext.reference.lu_logdet, the formula the fused op "
          "evaluates), float32",
}
INVERSE_METHODS = {
    "inverse": "torch.inverse(W), float32 (returns the C x C inverse)",
    "linalg_inv_f64": "torch.linalg.inv(W.double()), as glow_ext.nn.InvConv2d.reverse (C x C)",
    "triangular": "W⁻¹ = U'⁻¹·L⁻¹·Pᵀ from two torch.linalg.solve_triangular calls on the LU factors "
                  "(C x C; the folded inverse's C x C part)",
    "ours_op": "glow_ext.ops.actnorm_invconv_lu_inverse on y of shape (1, C, 4, 4): for C > 192 with "
               "fewer pixels than channels it applies the triangular factors to the pixels and never "
               "forms W⁻¹",
    "naive_op": "the naive layer's inverse on the same y: torch.inverse(W), F.conv2d, ActNorm inverse",
}


def fit_power_law(channels, times_ms, min_c):
    """Least-squares fit of log t = k·log C + b over the points with C >= min_c.

    Returns {"slope": k, "prefactor_ms": e^b, "min_c", "n_points"}; slope is NaN with fewer than
    two points.
    """
    points = [(math.log(c), math.log(t)) for c, t in zip(channels, times_ms) if c >= min_c and t > 0]
    n = len(points)
    if n < 2:
        return {"slope": float("nan"), "prefactor_ms": float("nan"), "min_c": min_c, "n_points": n}
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    return {"slope": slope, "prefactor_ms": math.exp(mean_y - slope * mean_x), "min_c": min_c,
            "n_points": n}


class CurveProblem:
    """The parameters of one layer with C channels, at CURVE_PIXELS pixels.

    The LU triangles are small random perturbations of the identity (cond(L), cond(U') ≈ 2 at any
    C), so float32 results can be checked against float64 up to C = 2048; what LAPACK and the op
    cost does not depend on the values. W = P·L·U' is assembled once, outside the timed region.
    """

    def __init__(self, c, device, seed=0, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed * 100003 + c)
        f64 = dict(dtype=torch.float64, generator=gen)
        perm = torch.randperm(c, generator=gen)
        lower = (0.3 / math.sqrt(c)) * torch.randn(c, c, **f64).tril(-1)
        upper = (0.3 / math.sqrt(c)) * torch.randn(c, c, **f64).triu(1)
        log_s = 0.1 * torch.randn(c, **f64)
        sign_s = torch.where(torch.rand(c, **f64) < 0.5, -1.0, 1.0).to(torch.float64)
        bias = 0.1 * torch.randn(c, **f64)
        logs = 0.1 * torch.randn(c, **f64)
        y = torch.randn((CURVE_PIXELS[0], c) + CURVE_PIXELS[1:], **f64)
        weight = reference.lu_weight(perm, lower, upper, log_s, sign_s)
        pixels = CURVE_PIXELS[1] * CURVE_PIXELS[2]

        self.channels = c
        self.device = torch.device(device)
        self.pixels = CURVE_PIXELS[1:]
        # float64 references for the agreement checks (on the device, next to what they check).
        self.ref_logdet = pixels * float(logs.sum() + log_s.sum())
        self.logdet_scale = pixels * float(logs.abs().sum() + log_s.abs().sum())
        ref_inverse = torch.linalg.inv(weight)
        ref_x = (torch.einsum("ij,njhw->nihw", ref_inverse, y) * (-logs).exp().view(1, -1, 1, 1)
                 - bias.view(1, -1, 1, 1))
        self.ref_inverse, self.ref_x = ref_inverse.to(self.device), ref_x.to(self.device)

        def put(t):
            return t.to(device=self.device, dtype=dtype if t.is_floating_point() else t.dtype)

        self.perm = perm.to(self.device)
        self.weight, self.lower, self.upper, self.log_s, self.sign_s, self.bias, self.logs, self.y = map(
            put, (weight, lower, upper, log_s, sign_s, bias, logs, y))
        self.eye = put(torch.eye(c, dtype=torch.float64))
        # Upstream gradients of the fwd+bwd mode: of a C x C matrix output or of the pixels.
        self.g_matrix = put(torch.randn(c, c, **f64))
        self.g_pixels = put(torch.randn(tuple(self.y.shape), **f64))

    def loss(self, out):
        """The scalar the fwd+bwd mode differentiates: a logdet itself, else <out, upstream gradient>."""
        if out.dim() == 0:
            return out
        return (out * (self.g_matrix if out.dim() == 2 else self.g_pixels)).sum()


def _dense_logdet(cp, logs, weight, logabsdet):
    h, w = cp.pixels
    return (h * w) * (logs.sum() + logabsdet(weight))


def logdet_slogdet(cp, logs, weight):
    return _dense_logdet(cp, logs, weight, lambda m: torch.linalg.slogdet(m)[1])


def logdet_slogdet_f64(cp, logs, weight):
    return _dense_logdet(cp, logs, weight, lambda m: torch.linalg.slogdet(m.double())[1].to(m.dtype))


def logdet_det(cp, logs, weight):
    return _dense_logdet(cp, logs, weight, lambda m: torch.det(m).abs().log())


def logdet_lu(cp, logs, log_s):
    return reference.lu_logdet(logs, log_s, *cp.pixels)


def inverse_torch(cp, weight):
    return torch.inverse(weight)


def inverse_linalg_f64(cp, weight):
    return torch.linalg.inv(weight.double()).to(weight.dtype)


def inverse_triangular(cp, lower, upper, log_s):
    """W⁻¹ = U'⁻¹·L⁻¹·Pᵀ: two triangular solves against the identity, then the column permutation."""
    unit_lower, upper_factor = reference.lu_factors(lower, upper, log_s, cp.sign_s)
    m = torch.linalg.solve_triangular(unit_lower, cp.eye, upper=False, unitriangular=True)
    m = torch.linalg.solve_triangular(upper_factor, m, upper=True)
    return m[:, cp.perm]  # (M·Pᵀ)[:, i] = M[:, perm[i]]


def inverse_ours_op(cp, y, bias, logs, lower, upper, log_s):
    return ops.actnorm_invconv_lu_inverse(y, bias, logs, cp.perm, lower, upper, log_s, cp.sign_s)


def inverse_naive_op(cp, y, bias, logs, weight):
    return opbench.naive_inverse(None, y, bias, logs, weight.view(*weight.shape, 1, 1))


# name -> (function(cp, *leaves), names of the CurveProblem attributes it differentiates)
CURVES = {
    "logdet": {
        "slogdet": (logdet_slogdet, ("logs", "weight")),
        "slogdet_f64": (logdet_slogdet_f64, ("logs", "weight")),
        "det": (logdet_det, ("logs", "weight")),
        "lu": (logdet_lu, ("logs", "log_s")),
    },
    "inverse": {
        "inverse": (inverse_torch, ("weight",)),
        "linalg_inv_f64": (inverse_linalg_f64, ("weight",)),
        "triangular": (inverse_triangular, ("lower", "upper", "log_s")),
        # fwd+bwd differentiates y too: the inverse in training (reversible backprop, flows trained
        # in the sampling direction) passes the gradient on to what produced y.
        "ours_op": (inverse_ours_op, ("y", "bias", "logs", "lower", "upper", "log_s")),
        "naive_op": (inverse_naive_op, ("y", "bias", "logs", "weight")),
    },
}
CURVE_DESCRIPTIONS = {"logdet": LOGDET_METHODS, "inverse": INVERSE_METHODS}


def curve_callable(cp, curve, method, mode):
    """A no-argument function running one call (forward) or one call and its backward (fwd+bwd)."""
    fn, names = CURVES[curve][method]
    if mode == "forward":
        leaves = tuple(getattr(cp, name) for name in names)
        return lambda: fn(cp, *leaves)
    leaves = tuple(getattr(cp, name).detach().clone().requires_grad_(True) for name in names)

    def step():
        cp.loss(fn(cp, *leaves)).backward()
        for t in leaves:
            t.grad = None

    return step


def _gradients(cp, curve, method):
    fn, names = CURVES[curve][method]
    leaves = tuple(getattr(cp, name).detach().clone().requires_grad_(True) for name in names)
    cp.loss(fn(cp, *leaves)).backward()
    return dict(zip(names, (t.grad for t in leaves)))


def check_curve_problem(cp):
    """Every curve method against float64 references (values) and against each other (gradients)."""
    errors, failures = {}, []

    def record(key, value):
        errors[key] = value
        if not value < CURVE_TOL:  # also catches NaN
            failures.append(f"{key}: relative error {value:.3g} >= {CURVE_TOL:g}")

    with torch.no_grad():
        for method, (fn, names) in CURVES["logdet"].items():
            value = float(fn(cp, *(getattr(cp, n) for n in names)))
            record(f"logdet.{method}", abs(value - cp.ref_logdet) / max(cp.logdet_scale, 1e-30))
        for method, (fn, names) in CURVES["inverse"].items():
            out = fn(cp, *(getattr(cp, n) for n in names))
            ref = cp.ref_inverse if out.dim() == 2 else cp.ref_x
            record(f"inverse.{method}", opbench.rel_err(out, ref))
    # Gradients: the methods that share a parametrisation must agree.
    for curve, group, anchor in (("logdet", ("slogdet_f64", "det"), "slogdet"),
                                 ("inverse", ("linalg_inv_f64",), "inverse"),
                                 ("inverse", ("naive_op",), "ours_op"),
                                 ("logdet", ("lu",), "slogdet")):
        ref_grads = _gradients(cp, curve, anchor)
        for method in group:
            grads = _gradients(cp, curve, method)
            for name in set(grads) & set(ref_grads):
                record(f"grad.{curve}.{method}.{name}", opbench.rel_err(grads[name], ref_grads[name]))
    if failures:
        raise BenchError(f"C={cp.channels}: the cost-curve methods disagree:\n  " + "\n  ".join(failures))
    return errors


def run_curves(device, channels, fit_min_c, settings, seed, progress):
    """Time every CURVES method at every C; returns the logdet part's report body."""
    reps, min_time_ms, warmup = settings
    sync = synchronizer(device)
    times = {curve: {mode: {m: {} for m in CURVES[curve]} for mode in CURVE_MODES} for curve in CURVES}
    checks = {}
    for c in channels:
        cp = CurveProblem(c, device, seed)
        progress.task(f"logdet/inverse C={c}: agreement check")
        checks[str(c)] = check_curve_problem(cp)
        for curve in CURVES:
            for mode in CURVE_MODES:
                progress.task(f"{curve} {mode} C={c}: {', '.join(CURVES[curve])}")
                res = time_methods(
                    {m: curve_callable(cp, curve, m, mode) for m in CURVES[curve]}, sync, reps,
                    min_time_ms / 1e3, warmup, grad_mode=(mode == "fwd+bwd"))
                for m, summary in res.items():
                    times[curve][mode][m][str(c)] = summary
        del cp
        if device == "cuda":
            torch.cuda.empty_cache()
    fits = {curve: {mode: {m: fit_power_law(channels, [times[curve][mode][m][str(c)]["median_ms"]
                                                        for c in channels], fit_min_c)
                           for m in CURVES[curve]} for mode in CURVE_MODES} for curve in CURVES}
    return {"channels": list(channels), "fit_min_c": fit_min_c, "pixels": list(CURVE_PIXELS),
            "methods": CURVE_DESCRIPTIONS, "checks": checks, "times": times, "fits": fits,
            "inverse_training": inverse_training_ratios(times, channels)}


def inverse_training_ratios(times, channels):
    """The inverse in training: naive inverse layer time / the inverse op's, forward + backward,
    at every C of the sweep (the goal: >= 1.0x at every C)."""
    per_c = times["inverse"]["fwd+bwd"]
    ratios = {str(c): per_c["naive_op"][str(c)]["median_ms"] / per_c["ours_op"][str(c)]["median_ms"]
              for c in channels}
    return {"naive_op_over_ours_op": ratios,
            "channels_below_1x": [int(c) for c, r in ratios.items() if r < 1.0]}
