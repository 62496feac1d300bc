"""The coupling drop-ins of glow_ext.compat (rosinality `ZeroConv2d` / `AffineCoupling`, y0ast
`Conv2d` / `Conv2dZeros` / `FlowStep`) against the original-style modules of the benchmark anchors
(glow_ext.bench.anchor_rosinality / anchor_y0ast, written from the documented formulas): same
state_dict (loaded strict), same outputs, log-determinants, reverses and gradients."""
import pytest
import torch
from torch import nn

from glow_ext.bench import anchor_rosinality as ros_anchor
from glow_ext.bench import anchor_y0ast as y0_anchor
from glow_ext.compat import glow_pytorch as gp
from glow_ext.compat import rosinality as ros

from conftest import DEVICES, assert_rel_close

# (dtype, tolerance): float64 agrees to round-off; float32 to its round-off through a few convs.
DTYPES = [(torch.float64, 1e-10), (torch.float32, 2e-5)]


def _perturb(module, scale=0.1):
    """Non-trivial values for every parameter (the zero-initialised convs included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _pair(original, dropin, device, dtype):
    original = _perturb(original).to(device, dtype)
    dropin = dropin.to(device, dtype)
    dropin.load_state_dict(original.state_dict(), strict=True)
    assert list(dropin.state_dict()) == list(original.state_dict())
    return original, dropin


def _inputs(c, device, dtype, n=3, size=6):
    x = torch.randn(n, c, size, size, device=device, dtype=dtype)
    return x.requires_grad_()


def _check(original, dropin, call, x, tol):
    """call(module, x): outputs (a tuple of tensors or Nones) and the gradients of a random projection
    of them with respect to x and every parameter agree."""
    outputs = [[t for t in call(m, x) if t is not None] for m in (original, dropin)]
    assert len(outputs[0]) == len(outputs[1])
    for a, b in zip(*outputs):
        assert_rel_close(b, a, tol, "output")
    seeds = [torch.randn_like(t) for t in outputs[0]]
    grads = []
    for module, outs in zip((original, dropin), outputs):
        leaves = [x] + list(module.parameters())
        grads.append(torch.autograd.grad(sum((o * s).sum() for o, s in zip(outs, seeds)), leaves))
    names = ["input"] + [n for n, _ in original.named_parameters()]
    for name, a, b in zip(names, *grads):
        assert_rel_close(b, a, tol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_rosinality_zeroconv_matches(device, dtype, tol):
    original, dropin = _pair(ros_anchor.ZeroConv2d(5, 8), ros.ZeroConv2d(5, 8), device, dtype)
    x = _inputs(5, device, dtype)
    assert_rel_close(dropin(x), original(x), tol)
    order = torch.randperm(8, device=device)
    assert_rel_close(dropin(x, order), original(x)[:, order], tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_rosinality_affine_coupling_matches(device, dtype, tol):
    original, dropin = _pair(ros_anchor.AffineCoupling(6, 16), ros.AffineCoupling(6, 16), device, dtype)
    x = _inputs(6, device, dtype)
    _check(original, dropin, lambda m, t: m(t), x, tol)
    y, _ = original(x)
    assert_rel_close(dropin.reverse(y.detach()), original.reverse(y.detach()), tol)
    assert_rel_close(dropin.reverse(dropin(x)[0]), x, tol * 10)


@pytest.mark.parametrize("device", DEVICES)
def test_rosinality_additive_coupling_matches_the_formula(device):
    dropin = _perturb(ros.AffineCoupling(6, 16, affine=False)).to(device, torch.float64)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                        ros_anchor.ZeroConv2d(16, 3)).to(device, torch.float64)
    net.load_state_dict(dropin.net.state_dict(), strict=True)
    x = _inputs(6, device, torch.float64)
    y, logdet = dropin(x)
    assert logdet is None
    assert_rel_close(y, torch.cat([x[:, :3], x[:, 3:] + net(x[:, :3])], 1), 1e-12)
    assert_rel_close(dropin.reverse(y), x, 1e-12)


def _y0ast_steps(device, dtype, coupling="affine", c=8, hidden=16):
    original = y0_anchor.FlowStep(c, hidden, 1.0, "invconv", "affine", True)
    dropin = gp.FlowStep(c, hidden, 1.0, "invconv", coupling, True)
    if coupling == "affine":
        original, dropin = _pair(original, dropin, device, dtype)
    for module in original.modules():
        if isinstance(module, y0_anchor.ActNorm2d):
            module.inited = True  # loaded from a trained checkpoint
    return original, dropin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_y0ast_flow_step_matches(device, dtype, tol):
    original, dropin = _y0ast_steps(device, dtype)
    x = _inputs(8, device, dtype)
    logdet = torch.randn(3, device=device, dtype=dtype)
    _check(original, dropin, lambda m, t: m(t, logdet), x, tol)
    z, out_logdet = original(x.detach(), logdet)
    for model in (original, dropin):
        back, back_logdet = model(z, out_logdet, reverse=True)
        assert_rel_close(back, x, tol * 10, "reverse")
        assert_rel_close(back_logdet, logdet, tol * 10, "reverse logdet")


@pytest.mark.parametrize("device", DEVICES)
def test_y0ast_flow_step_initialises_every_actnorm_as_the_original(device):
    original, dropin = _y0ast_steps(device, torch.float64)
    actnorms = [[m for m in model.modules() if isinstance(m, cls)]
                for model, cls in ((original, y0_anchor.ActNorm2d), (dropin, gp.ActNorm2d))]
    assert len(actnorms[0]) == len(actnorms[1]) == 3
    for module in actnorms[0] + actnorms[1]:
        module.inited = False
    x = 2 + 3 * torch.randn(16, 8, 6, 6, device=device, dtype=torch.float64)
    assert_rel_close(dropin(x, 0)[0], original(x, 0)[0], 1e-10)
    for a, b in zip(*actnorms):
        assert b.inited and a.inited
        assert_rel_close(b.logs, a.logs, 1e-10)
        assert_rel_close(b.bias, a.bias, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_y0ast_flow_step_falls_back_when_p_is_no_permutation(device):
    original, dropin = _y0ast_steps(device, torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    for model in (original, dropin):
        model.invconv.p.copy_(rotation)
    x = _inputs(8, device, torch.float64)
    assert_rel_close(dropin(x, 0)[0], original(x, 0)[0], 1e-10)
    assert_rel_close(dropin(dropin(x, 0)[0], 0, reverse=True)[0], x, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_y0ast_additive_flow_step_matches_the_formula(device):
    _, dropin = _y0ast_steps(device, torch.float64, coupling="additive")
    dropin = _perturb(dropin).to(device, torch.float64)
    for module in dropin.modules():
        if isinstance(module, gp.ActNorm2d):
            module.inited = True
    block = y0_anchor.coupling_block(4, 4, 16, y0_anchor.ActNorm2d).to(device, torch.float64)
    block.load_state_dict(dropin.block.state_dict(), strict=True)
    for module in block.modules():
        if isinstance(module, y0_anchor.ActNorm2d):
            module.inited = True
    x = _inputs(8, device, torch.float64)
    z, logdet = dropin.invconv(*dropin.actnorm(x, 0))
    expected = torch.cat([z[:, :4], z[:, 4:] + block(z[:, :4])], 1)
    y, out_logdet = dropin(x, 0)
    assert_rel_close(y, expected, 1e-12)
    assert_rel_close(out_logdet, logdet, 1e-12)
    assert_rel_close(dropin(y, out_logdet, reverse=True)[0], x, 1e-10)


def test_y0ast_flow_step_refuses_other_permutations():
    with pytest.raises(ValueError, match="flow_permutation must be 'invconv'"):
        gp.FlowStep(8, 16, 1.0, "shuffle", "affine", True)
