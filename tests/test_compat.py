"""The drop-in layers of glow_ext.compat against reference modules built here from the documented
formulas (plain PyTorch: conv2d with the assembled weight, slogdet in float64, torch.inverse).

Each reference gets fresh random, non-trivial parameters; its state_dict is loaded (strict) into the
drop-in, and outputs, log-determinants, reverses and gradients are compared. Errors are
max |a − b| / max |b| (conftest.max_rel_error).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import glow_ext
from glow_ext.compat import glow_pytorch as gp
from glow_ext.compat import rosinality as ros

from conftest import CUDA_AVAILABLE, DEVICES, assert_rel_close, make_generator

N, H, W = 3, 5, 4
VALUE_TOL = 1e-5  # outputs and log-determinants, float32
GRAD_TOL = 1e-4   # float32 gradients through LU / slogdet / inverse backward (seen: < 1e-6 on CPU)
ROUNDTRIP_TOL = 1e-5


def ran_fused_op(y):
    """Whether y's autograd node is the fused op's: its registered autograd (torch.ops callers,
    torch.compile) or glow_ext.ops' eager training Function."""
    name = type(y.grad_fn).__name__
    return "glow_ext" in name or "FusedActNormInvConvLU" in name


pytestmark = pytest.mark.usefixtures("no_tf32")  # the references' products in true float32


# ----------------------------------------------------------------------------------------------
# Reference modules: each docstring states the formulas of the layer it stands for.

def _logabsdet64(matrix):
    return torch.linalg.slogdet(matrix.to(torch.float64))[1].to(matrix.dtype)


class RefActNorm(nn.Module):
    """rosinality ActNorm: y = scale·(x + loc), logdet = H·W·Σ log|scale|; init on the first forward
    while initialized == 0: loc = −mean, scale = 1/(unbiased std + 1e-6)."""

    def __init__(self, c, logdet=True):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.logdet = logdet

    def forward(self, x):
        if self.initialized.item() == 0:
            with torch.no_grad():
                per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-per_channel.mean(dim=1).view(1, -1, 1, 1))
                self.scale.copy_((1 / (per_channel.std(dim=1) + 1e-6)).view(1, -1, 1, 1))
            self.initialized.fill_(1)
        y = self.scale * (x + self.loc)
        logdet = x.shape[2] * x.shape[3] * self.scale.abs().log().sum()
        return (y, logdet) if self.logdet else y

    def reverse(self, y):
        return y / self.scale - self.loc


class RefInvConv2d(nn.Module):
    """rosinality InvConv2d: y = conv2d(x, W), logdet = H·W·log|det W| (float64 slogdet)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(c).view(c, c, 1, 1))

    def forward(self, x):
        c = self.weight.shape[0]
        return F.conv2d(x, self.weight), x.shape[2] * x.shape[3] * _logabsdet64(self.weight.view(c, c))

    def reverse(self, y):
        c = self.weight.shape[0]
        return F.conv2d(y, torch.inverse(self.weight.view(c, c)).view(c, c, 1, 1))


class RefInvConv2dLU(nn.Module):
    """rosinality InvConv2dLU: W = w_p @ (w_l·l_mask + l_eye) @ (w_u·u_mask + diag(s_sign·exp(w_s))),
    logdet = H·W·Σ w_s."""

    def __init__(self, c):
        super().__init__()
        u_mask = torch.triu(torch.ones(c, c), 1)
        self.register_buffer("w_p", torch.eye(c))
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.clone())
        self.register_buffer("s_sign", torch.ones(c))
        self.register_buffer("l_eye", torch.eye(c))
        self.w_l = nn.Parameter(torch.eye(c))
        self.w_s = nn.Parameter(torch.zeros(c))
        self.w_u = nn.Parameter(torch.zeros(c, c))

    def weight(self):
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s))
        return self.w_p @ lower @ upper

    def forward(self, x):
        c = self.w_s.shape[0]
        return F.conv2d(x, self.weight().view(c, c, 1, 1)), x.shape[2] * x.shape[3] * self.w_s.sum()

    def reverse(self, y):
        c = self.w_s.shape[0]
        return F.conv2d(y, torch.inverse(self.weight()).view(c, c, 1, 1))


class RefActNorm2d(nn.Module):
    """y0ast / chaiyujin ActNorm2d: y = (x + bias)·exp(logs), logdet ± H·W·Σ logs; init (training):
    bias = −mean, logs = log(scale / (population std + 1e-6)); `inited` a plain attribute."""

    def __init__(self, c, scale=1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = scale
        self.inited = False

    def forward(self, x, logdet=None, reverse=False):
        if not self.inited and self.training:
            with torch.no_grad():
                mean = x.mean(dim=(0, 2, 3), keepdim=True)
                std = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
                self.bias.copy_(-mean)
                self.logs.copy_(torch.log(self.scale / (std + 1e-6)))
            self.inited = True
        dlogdet = x.shape[2] * x.shape[3] * self.logs.sum()
        if reverse:
            y, dlogdet = x * torch.exp(-self.logs) - self.bias, -dlogdet
        else:
            y = (x + self.bias) * torch.exp(self.logs)
        return y, (None if logdet is None else logdet + dlogdet)


class RefInvertibleConv1x1(nn.Module):
    """y0ast / chaiyujin InvertibleConv1x1: plain `weight` (C, C), or LU
    W = p @ (lower·tril_mask + I) @ (upper·triu_mask + diag(sign_s·exp(log_s)))."""

    def __init__(self, c, lu):
        super().__init__()
        self.lu = lu
        if not lu:
            self.weight = nn.Parameter(torch.eye(c))
        else:
            self.register_buffer("p", torch.eye(c))
            self.register_buffer("sign_s", torch.ones(c))
            self.lower = nn.Parameter(torch.eye(c))
            self.log_s = nn.Parameter(torch.zeros(c))
            self.upper = nn.Parameter(torch.zeros(c, c))

    def forward(self, x, logdet=None, reverse=False):
        if not self.lu:
            weight = self.weight
            dlogdet = x.shape[2] * x.shape[3] * _logabsdet64(weight)
        else:
            c = self.log_s.shape[0]
            ones = torch.ones(c, c, device=x.device)
            lower = self.lower * torch.tril(ones, -1) + torch.eye(c, device=x.device)
            upper = self.upper * torch.triu(ones, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
            weight = self.p @ lower @ upper
            dlogdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        c = weight.shape[0]
        if reverse:
            weight, dlogdet = torch.inverse(weight), -dlogdet
        y = F.conv2d(x, weight.view(c, c, 1, 1))
        return y, (None if logdet is None else logdet + dlogdet)


# ----------------------------------------------------------------------------------------------
# Random, non-trivial parameters (fresh per test; never zeros, never the constructors' values).

def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _random_dense(c, g):
    """Q1·diag(exp(u))·Q2 with Q1, Q2 random rotations: log|det| = Σ u, clearly non-zero."""
    q1, _ = torch.linalg.qr(_randn(g, c, c))
    q2, _ = torch.linalg.qr(_randn(g, c, c))
    u = 0.3 * _randn(g, c) + 0.3
    return (q1 @ torch.diag(u.exp()) @ q2).float()


def _random_lu(c, g):
    """(P matrix, lower, upper, log_s, sign_s) with random values in every entry (the masked ones
    too) and a random permutation; both signs in sign_s."""
    perm = torch.randperm(c, generator=g)
    sign = torch.where(_randn(g, c) > 0, 1.0, -1.0)
    sign[0], sign[-1] = 1.0, -1.0 if c > 1 else 1.0
    scale = 0.3 / c ** 0.5
    return (torch.eye(c)[perm], (scale * _randn(g, c, c)).float(), (scale * _randn(g, c, c)).float(),
            (0.2 * _randn(g, c) + 0.3).float(), sign.float())


@torch.no_grad()
def randomize(module, g):
    c = next(module.parameters()).shape[1 if isinstance(module, (RefActNorm, RefActNorm2d)) else 0]
    if isinstance(module, RefActNorm):
        module.loc.copy_(_randn(g, 1, c, 1, 1))
        sign = torch.where(_randn(g, 1, c, 1, 1) > 0, 1.0, -1.0)
        module.scale.copy_(sign * (0.3 * _randn(g, 1, c, 1, 1) + 0.3).exp())
        module.initialized.fill_(1)
    elif isinstance(module, RefActNorm2d):
        module.bias.copy_(_randn(g, 1, c, 1, 1))
        module.logs.copy_(0.3 * _randn(g, 1, c, 1, 1) + 0.3)
        module.inited = True
    elif isinstance(module, RefInvConv2d):
        module.weight.copy_(_random_dense(c, g).view(c, c, 1, 1))
    elif isinstance(module, RefInvConv2dLU):
        p, lower, upper, log_s, sign_s = _random_lu(c, g)
        module.w_p.copy_(p), module.w_l.copy_(lower), module.w_u.copy_(upper)
        module.w_s.copy_(log_s), module.s_sign.copy_(sign_s)
    elif isinstance(module, RefInvertibleConv1x1) and not module.lu:
        module.weight.copy_(_random_dense(c, g))
    else:
        p, lower, upper, log_s, sign_s = _random_lu(c, g)
        module.p.copy_(p), module.lower.copy_(lower), module.upper.copy_(upper)
        module.log_s.copy_(log_s), module.sign_s.copy_(sign_s)
    return module


# name: (reference constructor, drop-in constructor, calling convention)
CASES = {
    "ros.ActNorm": (RefActNorm, ros.ActNorm, "ros"),
    "ros.InvConv2d": (RefInvConv2d, ros.InvConv2d, "ros"),
    "ros.InvConv2dLU": (RefInvConv2dLU, ros.InvConv2dLU, "ros"),
    "gp.ActNorm2d": (RefActNorm2d, gp.ActNorm2d, "gp"),
    "gp.InvertibleConv1x1-plain": (lambda c: RefInvertibleConv1x1(c, False),
                                   lambda c: gp.InvertibleConv1x1(c, LU_decomposed=False), "gp"),
    "gp.InvertibleConv1x1-LU": (lambda c: RefInvertibleConv1x1(c, True),
                                lambda c: gp.InvertibleConv1x1(c, LU_decomposed=True), "gp"),
}
KERNEL_BACKED = {"ros.InvConv2d", "ros.InvConv2dLU", "gp.InvertibleConv1x1-plain", "gp.InvertibleConv1x1-LU"}


def make_pair(name, c, device, g=None):
    """(reference with random parameters, drop-in that loaded its state_dict strictly)."""
    make_ref, make_ours, _ = CASES[name]
    ref = randomize(make_ref(c), g or make_generator(17)).to(device)
    ours = make_ours(c).to(device)
    x = make_x(c, device)
    forward(name, ours, x)  # warm any cache (e.g. the permutation) before the load replaces it
    missing_unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    return ref, ours


def make_x(c, device, g=None, requires_grad=False):
    g = g or make_generator(99)
    shift = _randn(g, 1, c, 1, 1)
    scale = (0.5 * _randn(g, 1, c, 1, 1)).exp()
    x = (_randn(g, N, c, H, W) * scale + shift).float().to(device)
    return x.requires_grad_(requires_grad)


def forward(name, module, x):
    """(y, logdet increment) under either contract (glow-pytorch: added onto zeros, so (N,))."""
    if CASES[name][2] == "ros":
        return module(x)
    return module(x, torch.zeros(x.shape[0], device=x.device))


def reverse(name, module, y):
    if CASES[name][2] == "ros":
        return module.reverse(y)
    return module(y, None, reverse=True)[0]


def assert_logdet_close(actual, expected, tol=VALUE_TOL, what="logdet"):
    expected = expected.detach().double().cpu()
    assert expected.abs().min() > 0.1, "test logdet too close to zero for a relative check"
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = ((actual.detach().double().cpu() - expected).abs() / expected.abs()).max().item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_layout_matches(name):
    make_ref, make_ours, _ = CASES[name]
    for c in (1, 5):
        ref, ours = make_ref(c).state_dict(), make_ours(c).state_dict()
        assert list(ours) == list(ref)
        for key in ref:
            assert ours[key].dtype == ref[key].dtype, key
            assert ours[key].shape == ref[key].shape, key
    if name == "ros.ActNorm":
        assert ours["initialized"].dtype == torch.uint8 and ours["initialized"].shape == ()
    if name == "ros.InvConv2dLU":  # the LU vectors are 1-D
        assert ours["w_s"].shape == (5,) and ours["s_sign"].shape == (5,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [6, 40])
@pytest.mark.parametrize("name", list(CASES))
def test_loaded_checkpoint_gives_same_outputs(name, c, device):
    ref, ours = make_pair(name, c, device)
    x = make_x(c, device)
    params_before = {k: v.clone() for k, v in ours.state_dict().items()}
    if CASES[name][2] == "ros":
        y_ref, ld_ref = ref(x)
        y, ld = ours(x)
    else:
        incoming = torch.randn(N, device=device)
        y_ref, ld_ref = ref(x, incoming)
        y, ld = ours(x, incoming)
        assert ours(x)[1] is None and ours(x, None, reverse=True)[1] is None
        ld_ref, ld = ld_ref - incoming, ld - incoming
    assert_rel_close(y, y_ref, VALUE_TOL, f"{name} forward")
    assert_logdet_close(ld, ld_ref)
    if CASES[name][2] == "gp":  # reverse subtracts the same increment
        _, ld_rev = ours(y, torch.zeros(N, device=device), reverse=True)
        assert_logdet_close(-ld_rev, ld_ref, what="reverse logdet")
    assert_rel_close(reverse(name, ours, y_ref), reverse(name, ref, y_ref), VALUE_TOL, f"{name} reverse")
    assert_rel_close(reverse(name, ours, y), x, ROUNDTRIP_TOL, f"{name} reverse(forward(x))")
    # A loaded checkpoint is never re-initialised (the modules are in train mode here).
    assert ours.training
    for key, value in ours.state_dict().items():
        assert torch.equal(value, params_before[key]), f"{key} changed by a forward after loading"
    if name in KERNEL_BACKED and glow_ext.ops.kernels_available():
        assert ran_fused_op(y), f"{name} did not run the fused op"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match(name, direction, device):
    c = 6
    ref, ours = make_pair(name, c, device)
    g = make_generator(5)
    x = make_x(c, device)
    grad_out = _randn(g, N, c, H, W).float().to(device)
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_(True)
        if direction == "forward":
            y, logdet = forward(name, module, xi)
            loss = (y * grad_out).sum() + 0.7 * logdet.sum()
        else:
            loss = (reverse(name, module, xi) * grad_out).sum()
        module.zero_grad()
        loss.backward()
        results.append({"x": xi.grad, **{k: p.grad for k, p in module.named_parameters()}})
    ref_grads, our_grads = results
    assert set(ref_grads) == set(our_grads)
    for key, expected in ref_grads.items():
        actual = our_grads[key]
        assert actual is not None and torch.isfinite(actual).all(), f"{key}: no gradient"
        if expected.abs().max() > 0:
            assert actual.abs().max() > 0, f"{key}: zero gradient"
        assert_rel_close(actual, expected, GRAD_TOL, f"{name} {direction} grad {key}")


@pytest.mark.parametrize("device", DEVICES)
def test_rosinality_actnorm_init(device):
    c = 6
    x = make_x(c, device)
    ours, ref = ros.ActNorm(c).to(device), RefActNorm(c).to(device)
    y, logdet = ours(x)
    y_ref, logdet_ref = ref(x)
    per_channel = x.transpose(0, 1).reshape(c, -1)
    assert_rel_close(ours.loc.view(-1), -per_channel.mean(dim=1), VALUE_TOL, "loc")
    assert_rel_close(ours.scale.view(-1), 1 / (per_channel.std(dim=1) + 1e-6), VALUE_TOL, "scale")
    assert ours.initialized.dtype == torch.uint8 and ours.initialized.item() == 1
    assert_rel_close(y, y_ref, VALUE_TOL, "initialised output")
    assert_logdet_close(logdet, logdet_ref)
    out = y.transpose(0, 1).reshape(c, -1)
    assert out.mean(dim=1).abs().max() < 1e-5 and (out.std(dim=1) - 1).abs().max() < 1e-4
    # Initialised once: a second batch leaves the parameters alone.
    loc = ours.loc.detach().clone()
    ours(make_x(c, device, make_generator(3)))
    assert torch.equal(ours.loc, loc)
    # As in the original: init on the first forward in eval mode too; logdet=False returns y only.
    evaluated = ros.ActNorm(c, logdet=False).to(device).eval()
    assert torch.is_tensor(evaluated(x)) and evaluated.initialized.item() == 1
    # A checkpoint saved before init (initialized == 0) initialises on its first forward ...
    fresh = ros.ActNorm(c).to(device)
    fresh.load_state_dict(ros.ActNorm(c).state_dict())
    fresh(x)
    assert_rel_close(fresh.loc, ours.loc, VALUE_TOL, "init after loading an uninitialised state")
    # ... and one saved after init never does, also when loaded through a parent module.
    model = nn.Sequential(ros.ActNorm(c)).to(device)
    checkpoint = nn.Sequential(randomize(RefActNorm(c), make_generator(8))).state_dict()
    model.load_state_dict(checkpoint)
    model(x)
    assert torch.equal(model[0].loc.cpu(), checkpoint["0.loc"])
    assert torch.equal(model[0].scale.cpu(), checkpoint["0.scale"])
    # Modifying the buffer in place is noticed (the Python-side mirror follows the buffer).
    model[0].initialized.fill_(0)
    model(x)
    assert_rel_close(model[0].loc, ours.loc, VALUE_TOL, "re-init after initialized.fill_(0)")


@pytest.mark.parametrize("device", DEVICES)
def test_glow_pytorch_actnorm_init(device):
    c, scale = 6, 2.0
    x = make_x(c, device)
    ours, ref = gp.ActNorm2d(c, scale=scale).to(device), RefActNorm2d(c, scale=scale).to(device)
    logdet0 = torch.randn(N, device=device)
    y, logdet = ours(x, logdet0)
    y_ref, logdet_ref = ref(x, logdet0)
    mean = x.mean(dim=(0, 2, 3))
    std = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3)).sqrt()
    assert_rel_close(ours.bias.view(-1), -mean, VALUE_TOL, "bias")
    assert_rel_close(ours.logs.view(-1), torch.log(scale / (std + 1e-6)), VALUE_TOL, "logs")
    assert ours.inited
    assert_rel_close(y, y_ref, VALUE_TOL, "initialised output")
    assert_logdet_close(logdet - logdet0, logdet_ref - logdet0)
    out = y.transpose(0, 1).reshape(c, -1)
    assert out.mean(dim=1).abs().max() < 1e-5
    assert (out.var(dim=1, unbiased=False).sqrt() - scale).abs().max() < 1e-4
    # No init in eval mode, nor from a reverse call.
    for module, call in ((gp.ActNorm2d(c).to(device).eval(), lambda m: m(x)),
                         (gp.ActNorm2d(c).to(device), lambda m: m(x, reverse=True))):
        call(module)
        assert not module.inited and not module.bias.detach().any() and not module.logs.detach().any()
    # A loaded checkpoint (nested, so the keys carry a prefix) is never re-initialised in training.
    model = nn.ModuleDict({"flow": nn.Sequential(gp.ActNorm2d(c))}).to(device).train()
    trained = randomize(RefActNorm2d(c), make_generator(8))
    checkpoint = nn.ModuleDict({"flow": nn.Sequential(trained)}).state_dict()
    assert set(checkpoint) == {"flow.0.bias", "flow.0.logs"}
    model.load_state_dict(checkpoint)
    assert model["flow"][0].inited
    model["flow"][0](x)
    assert torch.equal(model["flow"][0].bias.cpu(), checkpoint["flow.0.bias"])
    assert torch.equal(model["flow"][0].logs.cpu(), checkpoint["flow.0.logs"])


@pytest.mark.parametrize("device", DEVICES)
def test_nonstandard_lu_buffers_fall_back_to_the_formula(device):
    c = 6
    g = make_generator(23)
    x = make_x(c, device)
    # rosinality: masks are buffers, so a checkpoint may carry others; w_p may not be a permutation.
    variants = []
    ref = randomize(RefInvConv2dLU(c), g)
    ref.u_mask[0, 3] = 0.0
    ref.l_mask[4, 1] = 0.5
    variants.append(("ros.InvConv2dLU", ref))
    ref = randomize(RefInvConv2dLU(c), g)
    ref.w_p[2] *= -1  # a signed permutation: invertible, but not a permutation matrix
    variants.append(("ros.InvConv2dLU", ref))
    ref = randomize(RefInvertibleConv1x1(c, True), g)
    ref.p[1] *= 1.5  # a scaled permutation: invertible, but not a permutation matrix
    variants.append(("gp.InvertibleConv1x1-LU", ref))
    for name, ref in variants:
        ref = ref.to(device)
        ours = CASES[name][1](c).to(device)
        forward(name, ours, x)  # warm the fast path with standard buffers first
        ours.load_state_dict(ref.state_dict(), strict=True)
        y_ref, ld_ref = forward(name, ref, x)
        y, ld = forward(name, ours, x)
        assert_rel_close(y, y_ref, VALUE_TOL, f"{name} fallback forward")
        assert_logdet_close(ld, ld_ref)
        assert_rel_close(reverse(name, ours, y_ref), reverse(name, ref, y_ref), VALUE_TOL,
                         f"{name} fallback reverse")
    # Loading standard buffers again returns to the fused op.
    name = "ros.InvConv2dLU"
    ref, ours = make_pair(name, c, device)
    ours.load_state_dict(randomize(RefInvConv2dLU(c), g).state_dict())
    y, _ = ours(x)
    if glow_ext.ops.kernels_available():
        assert ran_fused_op(y)


@pytest.mark.parametrize("device", DEVICES)
def test_permutation_follows_state_changes(device):
    """The cached permutation is recomputed when the buffer changes: after load_state_dict (in
    place), after `.to()` and after an in-place edit."""
    c = 6
    g = make_generator(31)
    x = make_x(c, device)
    ours = gp.InvertibleConv1x1(c, LU_decomposed=True).to(device)
    for _ in range(2):
        ref = randomize(RefInvertibleConv1x1(c, True), g).to(device)
        ours.load_state_dict(ref.state_dict())
        assert_rel_close(ours(x)[0], ref(x)[0], VALUE_TOL, "after load")
    ours = ours.double().float()  # new buffer tensors
    assert_rel_close(ours(x)[0], ref(x)[0], VALUE_TOL, "after .to()")
    new_perm = torch.eye(c, device=device)[torch.randperm(c, generator=g).to(device)]
    with torch.no_grad():
        ours.p.copy_(new_perm)
        ref.p.copy_(new_perm)
    assert_rel_close(ours(x)[0], ref(x)[0], VALUE_TOL, "after in-place edit")


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")
@pytest.mark.cuda
def test_no_host_sync_per_call_on_cuda():
    """After the first call, ActNorm and the LU layers run without synchronising with the host."""
    c = 6
    x = make_x(c, "cuda")
    layers = [("ros", ros.ActNorm(c)), ("ros", ros.InvConv2dLU(c)),
              ("gp", gp.ActNorm2d(c)), ("gp", gp.InvertibleConv1x1(c, LU_decomposed=True))]
    layers = [(kind, layer.cuda()) for kind, layer in layers]
    for kind, layer in layers:  # first calls: init and the one-time buffer checks
        layer(x) if kind == "ros" else layer(x, torch.zeros(N, device="cuda"))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kind, layer in layers:
            if kind == "ros":
                y, _ = layer(x)
                layer.reverse(y)
            else:
                y, _ = layer(x, torch.zeros(N, device="cuda"))
                layer(y, torch.zeros(N, device="cuda"), reverse=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
