"""Property-based fuzzing (hypothesis) of the public ops and layers.

Every generated case must end in one of three ways (the rules in README "Reliability"):
  * a correct result: within a rounding bound of the float64 oracle (glow_ext.reference in float64),
    the bound scaled by C, the dtype's epsilon and the magnitudes summed (and, for an inverse, the
    condition number of W);
  * the documented non-finite propagation: a NaN or Inf in a pixel of the input makes every output
    channel of that pixel non-finite and leaves the other pixels exact; an output whose exact value
    or intermediate (the folded C x C map) overflows the dtype is Inf/NaN, never a finite wrong number;
  * a RuntimeError or ValueError with a message.
Derandomized, bounded example counts and no example database: fast and reproducible in CI.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICES
from glow_ext import nn as gnn
from glow_ext import ops, reference

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "channels_last", "strided", "transposed_hw", "expanded"])
NON_FINITE = st.sampled_from([None, float("nan"), float("inf"), float("-inf")])
# An inverse is checked for accuracy only while eps64·cond(W) stays below this; beyond it no
# floating-point method recovers x (log_s at ±80 makes W that ill-conditioned).
ILL_CONDITIONED = 1e-3


@st.composite
def shapes(draw, max_large_c=600):
    """(N, C, H, W): small images at C up to 12 (zero-size dims, C = 1, odd H and W), or C up to
    max_large_c with at most 4 pixels per image (the kernels' factored path)."""
    if draw(st.booleans()):
        return (draw(st.integers(0, 3)), draw(st.integers(1, 12)), draw(st.integers(0, 7)),
                draw(st.integers(0, 7)))
    return (draw(st.integers(0, 2)), draw(st.integers(13, max_large_c)), draw(st.integers(1, 2)),
            draw(st.integers(0, 2)))


def make_input(shape, dtype, layout, special, generator, device="cpu"):
    """Random values in the given memory layout, with `special` (NaN/Inf) at one random element."""
    n, c, h, w = shape
    expanded = layout == "expanded" and n > 0  # stride 0 along N: one image repeated
    x = torch.randn((1, c, h, w) if expanded else shape, generator=generator, dtype=torch.float64).to(dtype)
    if special is not None and x.numel():
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=generator))] = special
    x = x.to(device)
    if expanded:
        return x.expand(shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor whose gaps are NaN: never read
        wide = torch.full((n, c, h, 2 * w), float("nan"), dtype=dtype, device=device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed_hw":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def random_lu_params(c, dtype, extreme, generator):
    """bias, logs, perm, lower, upper, log_s, sign_s around a random rotation; the triangles the
    ops must ignore are NaN. extreme: some log_s at ±80 and logs at ±50."""
    def randn(*size):
        return torch.randn(size, generator=generator, dtype=torch.float64)

    perm, lower, upper, log_s, sign_s = gnn.random_rotation_lu(c, generator, torch.float64)
    ignored = torch.full((c, c), float("nan"), dtype=torch.float64)
    noise = 0.1 / c**0.5  # larger random triangles are ill-conditioned beyond any use
    lower = torch.where(torch.ones(c, c, dtype=torch.bool).tril(-1), lower + noise * randn(c, c), ignored)
    upper = torch.where(torch.ones(c, c, dtype=torch.bool).triu(1), upper + noise * randn(c, c), ignored)
    bias, logs, log_s = randn(c), 0.5 * randn(c), log_s + 0.3 * randn(c)
    if extreme:
        signs = torch.randint(0, 2, (2, c), generator=generator) * 2.0 - 1
        pick = torch.rand(2, c, generator=generator) < 0.3
        log_s = torch.where(pick[0], 80.0 * signs[0], log_s)
        logs = torch.where(pick[1], 50.0 * signs[1], logs)
    return [t if t.dtype == torch.int64 else t.to(dtype) for t in
            (bias, logs, perm, lower, upper, log_s, sign_s)]


def float64(params):
    """The parameters in float64 on the CPU, where the oracle runs."""
    return [t.cpu() if t.dtype == torch.int64 else t.double().cpu() for t in params]


def bad_pixels(x):
    """(N, 1, H, W): the pixels with a NaN or Inf in any channel."""
    return ~torch.isfinite(x).all(dim=1, keepdim=True)


def check_result(out, truth, bound, overflow, x, dtype, tol=None):
    """out against the float64 truth: non-finite in every channel of a bad input pixel; elsewhere
    within 8·eps·bound (+ tol) of the truth, except that where `overflow` it may be non-finite.
    bound sums the magnitudes of the terms; measured errors stay below 2.5·eps·bound at C <= 600."""
    assert out.dtype == dtype and out.shape == x.shape
    out, x, c = out.cpu(), x.cpu(), x.shape[1]
    info = torch.finfo(dtype)
    bad = bad_pixels(x).expand_as(out)
    assert not torch.isfinite(out[bad]).any(), "a non-finite input pixel gave a finite output"
    out = out.double()
    tol = 8 * info.eps * bound + c * info.tiny + (0 if tol is None else tol)
    close = (out - truth).abs() <= tol
    allowed = close | (overflow & ~torch.isfinite(out))
    wrong = ~bad & ~allowed
    assert not wrong.any(), (f"{int(wrong.sum())} wrong outputs, e.g. {out[wrong][:4].tolist()} "
                             f"instead of {truth[wrong][:4].tolist()} (tolerance {tol[wrong][:4].tolist()})")


def mix(weight, v):
    return torch.einsum("ij,njhw->nihw", weight, v)


def check_forward(params, x, y, logdet):
    dtype, x, y, logdet = x.dtype, x.cpu(), y.cpu(), logdet.cpu()
    p64 = float64(params)
    bias, logs, perm, lower, upper, log_s, sign_s = p64
    truth, logdet_truth = reference.actnorm_invconv_lu(x.double(), *p64)
    unit_lower, upper_factor = reference.lu_factors(lower, upper, log_s, sign_s)
    # |L|·|U'| bounds |W| and every partial product of either kernel path (folded or factored).
    weight_abs = (unit_lower.abs() @ upper_factor.abs())[perm] * logs.exp()
    x_abs = x.double().abs().nan_to_num(0, 0, 0) + bias.abs().view(1, -1, 1, 1)
    bound = mix(weight_abs, x_abs)
    fmax = torch.finfo(dtype).max
    overflow = (bound > fmax) | (weight_abs.amax(1) > fmax).view(1, -1, 1, 1)
    check_result(y, truth, bound, overflow, x, dtype)
    assert logdet.dim() == 0
    magnitude = (logs.abs().sum() + log_s.abs().sum()).item() * x.shape[2] * x.shape[3]
    torch.testing.assert_close(logdet.double(), logdet_truth, rtol=0,
                               atol=4 * x.shape[1] * torch.finfo(dtype).eps * magnitude + 1e-30)


def check_inverse(params, y, x):
    """x = inverse(y) against the float64 reference inverse, with the error bound of a solve."""
    dtype, y, x = y.dtype, y.cpu(), x.cpu()
    p64 = float64(params)
    bias, logs, perm, lower, upper, log_s, sign_s = p64
    weight = reference.lu_weight(perm, lower, upper, log_s, sign_s)
    # The kernels form W⁻¹ in float64 for float32 input too: a cond-dependent error at float64's eps.
    eps64 = torch.finfo(torch.float64).eps
    cond = float(torch.linalg.cond(weight)) if weight.isfinite().all() else float("inf")
    if not eps64 * cond < ILL_CONDITIONED:
        # Accuracy is out of reach; the non-finite rule and the output's type still hold.
        assert x.dtype == dtype and x.shape == y.shape
        assert not torch.isfinite(x[bad_pixels(y).expand_as(x)]).any()
        return
    truth = reference.actnorm_invconv_lu_inverse(y.double(), *p64)
    inverse = torch.linalg.inv(weight)
    folded_inverse = inverse * (-logs).exp().unsqueeze(1)
    y_clean = y.double().nan_to_num(0, 0, 0)
    bound = mix(folded_inverse.abs(), y_clean.abs()) + bias.abs().view(1, -1, 1, 1)
    # Normwise forward error of the float64 solves, C·cond·eps64·max|W⁻¹y| per pixel, scaled by
    # exp(-logs); the measured errors are far below it.
    solved = mix(inverse, y_clean).abs().amax(1, keepdim=True)
    solve_error = 8 * y.shape[1] * eps64 * cond * solved * (-logs).exp().view(1, -1, 1, 1)
    fmax = torch.finfo(dtype).max
    overflow = (bound > fmax) | (folded_inverse.abs().amax(1) > fmax).view(1, -1, 1, 1)
    check_result(x, truth, bound, overflow, y, dtype, solve_error)


# --------------------------------------------------------------------------------------------------
# The ops

@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(shape=shapes(), dtype=DTYPES, layout=LAYOUTS, special=NON_FINITE, extreme=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_forward_op(device, shape, dtype, layout, special, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    params = [t.to(device) for t in random_lu_params(shape[1], dtype, extreme, g)]
    x = make_input(shape, dtype, layout, special, g, device)
    y, logdet = ops.actnorm_invconv_lu(x, *params)
    check_forward(params, x, y, logdet)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(shape=shapes(), dtype=DTYPES, layout=LAYOUTS, special=NON_FINITE, extreme=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_inverse_op(device, shape, dtype, layout, special, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    params = [t.to(device) for t in random_lu_params(shape[1], dtype, extreme, g)]
    y = make_input(shape, dtype, layout, special, g, device)
    check_inverse(params, y, ops.actnorm_invconv_lu_inverse(y, *params))


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(shape=shapes(), dtype=DTYPES, layout=LAYOUTS, special=NON_FINITE, seed=st.integers(0, 2**31 - 1))
def test_fuzz_channel_map(device, shape, dtype, layout, special, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    weight = torch.randn(c, c, generator=g, dtype=torch.float64)
    offset = torch.randn(c, generator=g, dtype=torch.float64)
    x = make_input(shape, dtype, layout, special, g, device)
    acc = reference.accumulation_dtype(x)
    y = ops.channel_map(x, weight.to(device, acc), offset.to(device, acc)).cpu()
    x = x.cpu()
    x_clean = x.double().nan_to_num(0, 0, 0)
    truth = mix(weight, x.double()) + offset.view(1, -1, 1, 1)
    bound = mix(weight.abs(), x_clean.abs()) + offset.abs().view(1, -1, 1, 1)
    check_result(y, truth, bound, torch.zeros((), dtype=torch.bool), x, dtype)


MISUSES = ("int_x", "half_x_on_cpu", "param_dtype", "x_1d", "param_shape", "perm_int32",
           "perm_not_permutation", "log_s_not_finite", "device")


@FUZZ
@given(shape=shapes(max_large_c=64), misuse=st.sampled_from(MISUSES), inverse=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_bad_arguments_raise_clear_errors(shape, misuse, inverse, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    params = random_lu_params(c, torch.float32, False, g)
    x = make_input(shape, torch.float32, "contiguous", None, g)
    if misuse == "int_x":
        x = x.to(torch.int64)
    elif misuse == "half_x_on_cpu":
        x = x.to(torch.float16)
    elif misuse == "param_dtype":
        params[1] = params[1].double()
    elif misuse == "x_1d":
        x = x.flatten()
    elif misuse == "param_shape":
        params[0] = torch.zeros(c + 1)
    elif misuse == "perm_int32":
        params[2] = params[2].int()
    elif misuse == "perm_not_permutation":
        params[2] = torch.zeros(c, dtype=torch.int64) if c > 1 else torch.tensor([1])
    elif misuse == "log_s_not_finite":
        params[5][int(torch.randint(c, (1,), generator=g))] = float("nan")
    else:
        params[3] = params[3].to("meta")
    op = ops.actnorm_invconv_lu_inverse if inverse else ops.actnorm_invconv_lu
    with pytest.raises((RuntimeError, ValueError), match=r"glow_ext::actnorm_invconv_lu\w*: .+"):
        op(x, *params)


# --------------------------------------------------------------------------------------------------
# The layers

def perturb_(module, generator, scale=0.1):
    """Random parameters everywhere (the zero-initialised convolutions included), in place."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in ("lower", "upper", "log_s"):  # keep W the random rotation
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(shape=shapes(max_large_c=256), dtype=DTYPES, layout=LAYOUTS, special=NON_FINITE, fused=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_lu_layers(device, shape, dtype, layout, special, fused, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    layer = (gnn.ActNormInvConv2d if fused else gnn.InvConv2dLU)(c, generator=g).to(device, dtype)
    x = make_input(shape, dtype, layout, special, g, device)
    if fused and (x.numel() == 0 or special is not None):
        # Data-dependent init refuses such a batch rather than make every later output NaN.
        with pytest.raises(ValueError, match="ActNorm's data-dependent initialisation"):
            layer(x)
        layer.eval()
    perturb_(layer, g)
    y, logdet = layer(x)
    params = [t.detach() for t in layer._params()]
    check_forward(params, x, y, logdet)
    with torch.no_grad():  # the cached folded inverse map through channel_map
        check_inverse(params, y, layer.reverse(y))
    y_grad = y.detach().requires_grad_()  # the differentiable inverse op
    check_inverse(params, y_grad.detach(), layer.reverse(y_grad).detach())


@FUZZ
@given(shape=shapes(), dtype=DTYPES, layout=LAYOUTS, special=NON_FINITE, seed=st.integers(0, 2**31 - 1))
def test_fuzz_actnorm(shape, dtype, layout, special, seed):
    g = torch.Generator().manual_seed(seed)
    layer = gnn.ActNorm2d(shape[1]).to(dtype)
    x = make_input(shape, dtype, layout, special, g)
    if x.numel() == 0 or special is not None:
        with pytest.raises(ValueError, match="ActNorm's data-dependent initialisation"):
            layer(x)
        layer.eval()
        perturb_(layer, g)
    y, logdet = layer(x)
    spread = x.double().transpose(0, 1).flatten(1).std(1, unbiased=False) if x.numel() else None
    if layer.training and bool((spread > 1e-3).all()):  # initialised on x: unit output statistics
        stats = y.double().transpose(0, 1).flatten(1)
        assert stats.mean(1).abs().max() < 1e-4 and (stats.std(1, unbiased=False) - 1).abs().max() < 1e-3
    bias, logs = layer.bias.detach().double().view(1, -1, 1, 1), layer.logs.detach().double().view(1, -1, 1, 1)
    truth = (x.double() + bias) * logs.exp()
    # Elementwise: a non-finite input stays in its own element.
    assert torch.equal(torch.isfinite(y), torch.isfinite(x))
    fin = torch.isfinite(x)
    torch.testing.assert_close(y.double()[fin], truth[fin], rtol=4 * torch.finfo(dtype).eps, atol=1e-30)
    torch.testing.assert_close(logdet.double(), layer.logs.double().sum() * shape[2] * shape[3],
                               rtol=4 * shape[1] * torch.finfo(dtype).eps, atol=1e-30)
    x_back = layer.reverse(y).detach()
    scale = (x.double().abs() + bias.abs())[fin]
    assert ((x_back.double()[fin] - x.double()[fin]).abs() <= 8 * torch.finfo(dtype).eps * scale + 1e-30).all()


@FUZZ
@given(shape=shapes(), dtype=DTYPES, layout=LAYOUTS, special=NON_FINITE,
       coupling=st.sampled_from([gnn.AffineCoupling, gnn.AdditiveCoupling]), seed=st.integers(0, 2**31 - 1))
def test_fuzz_couplings(shape, dtype, layout, special, coupling, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if c < 2:
        with pytest.raises(ValueError, match="at least 2 channels"):
            coupling(c, hidden_channels=4)
        return
    layer = coupling(min(c, 32), hidden_channels=4).to(dtype)  # C <= 32 keeps the convolutions cheap
    x = make_input((n, min(c, 32), h, w), dtype, layout, special, g)
    perturb_(layer, g, scale=0.3)
    y, logdet = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and logdet.shape in ((n,), ())
    assert torch.equal(y[:, :layer.passive].nan_to_num(), x[:, :layer.passive].nan_to_num())
    reference_layer = copy.deepcopy(layer).double()
    y64, logdet64 = reference_layer(x.double())
    # Non-finite values spread within the network's receptive field; finite outputs are exact.
    fin = torch.isfinite(y64)
    assert torch.equal(torch.isfinite(y), fin)
    eps = torch.finfo(dtype).eps
    atol = 1e3 * eps * (1 + y64[fin].abs().max().item() if fin.any() else 1)
    torch.testing.assert_close(y.double()[fin], y64[fin], rtol=1e3 * eps, atol=atol)
    torch.testing.assert_close(logdet.double().expand(n).nan_to_num(0, 0, 0),
                               logdet64.expand(n).nan_to_num(0, 0, 0), rtol=1e3 * eps, atol=1e3 * eps * c * h * w)
    if torch.isfinite(x).all():
        x_back = layer.reverse(y)
        torch.testing.assert_close(x_back.double(), x.double(), rtol=1e3 * eps, atol=1e3 * eps)
