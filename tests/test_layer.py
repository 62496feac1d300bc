"""glow_ext.nn.ActNormInvConv2d: data-dependent init, checkpoints, invertibility, logdet, gradients."""
import pytest
import torch

from glow_ext import nn as glow_nn
from glow_ext import ops, reference

from conftest import DEVICES, assert_rel_close, make_generator, make_input


def make_layer(C, device="cpu", seed=0, **kwargs):
    return glow_nn.ActNormInvConv2d(C, generator=make_generator(seed), **kwargs).to(device)


def skewed_input(shape, device="cpu", seed=1):
    """Per-channel mean and scale far from 0 and 1, so that the init has something to undo."""
    g = make_generator(seed)
    C = shape[1]
    mean = torch.linspace(-3.0, 4.0, C).view(1, C, 1, 1)
    std = torch.linspace(0.2, 5.0, C).view(1, C, 1, 1)
    return (make_input(shape, generator=g, shift=0.0) * std + mean).to(device)


def actnorm_output(layer, x):
    """(x + bias)·exp(logs): the ActNorm half of the layer, before the 1x1 convolution."""
    return (x + layer.bias.view(1, -1, 1, 1)) * layer.logs.exp().view(1, -1, 1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [3, 16, 48])
def test_data_dependent_init_normalises_each_channel(C, device):
    layer = make_layer(C, device).train()
    x = skewed_input((16, C, 8, 8), device)
    assert not layer._initialized and not bool(layer.initialized)
    y, logdet = layer(x)
    assert layer._initialized and bool(layer.initialized)

    with torch.no_grad():
        a = actnorm_output(layer, x)
        torch.testing.assert_close(a.mean(dim=(0, 2, 3)), torch.zeros(C, device=device), rtol=0, atol=1e-4)
        torch.testing.assert_close(a.std(dim=(0, 2, 3), correction=0), torch.ones(C, device=device),
                                   rtol=0, atol=1e-4)
        # The same through the op with W = I (perm = identity, L = U' = I).
        zeros = torch.zeros(C, device=device)
        eye_perm = torch.arange(C, device=device)
        square_zeros = torch.zeros(C, C, device=device)
        a_op, _ = ops.actnorm_invconv_lu(x, layer.bias, layer.logs, eye_perm, square_zeros, square_zeros,
                                         zeros, torch.ones(C, device=device))
        assert_rel_close(a_op, a, 1e-5, "actnorm through the op")
        # And the layer's output is W applied to it.
        assert_rel_close(y, torch.einsum("ij,njhw->nihw", layer.weight(), a), 1e-5, "y = W·actnorm(x)")
        expected_logdet = 64 * (layer.logs.sum() + layer.log_s.sum())
        torch.testing.assert_close(logdet, expected_logdet, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_init_scale(device):
    layer = make_layer(6, device, scale=0.5).train()
    x = skewed_input((8, 6, 5, 5), device)
    layer(x)
    with torch.no_grad():
        std = actnorm_output(layer, x).std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(std, torch.full_like(std, 0.5), rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_init_happens_once_and_only_in_train_mode(device):
    layer = make_layer(4, device).eval()
    x = skewed_input((4, 4, 3, 3), device)
    layer(x)
    assert not bool(layer.initialized)
    assert torch.count_nonzero(layer.bias) == 0 and torch.count_nonzero(layer.logs) == 0

    layer.train()
    layer(x)
    bias, logs = layer.bias.detach().clone(), layer.logs.detach().clone()
    layer(skewed_input((4, 4, 3, 3), device, seed=7) * 3 + 1)
    torch.testing.assert_close(layer.bias, bias, rtol=0, atol=0)
    torch.testing.assert_close(layer.logs, logs, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_carries_the_initialized_flag(device):
    layer = make_layer(5, device).train()
    layer(skewed_input((8, 5, 4, 4), device))
    state = layer.state_dict()
    assert set(state) == {"bias", "logs", "lower", "upper", "log_s", "perm", "sign_s", "initialized"}
    assert state["initialized"].dtype == torch.bool and bool(state["initialized"])

    fresh = make_layer(5, device, seed=99).train()
    assert not fresh._initialized
    fresh.load_state_dict(state)
    assert fresh._initialized and bool(fresh.initialized)
    before = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    x = skewed_input((8, 5, 4, 4), device, seed=5) * 2 - 3  # statistics unlike the init batch
    y, _ = fresh(x)
    after = fresh.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=f"{name} changed on forward")
    y_orig, _ = layer(x)
    torch.testing.assert_close(y, y_orig, rtol=0, atol=0)

    # An uninitialised checkpoint loads as uninitialised: the next train-mode forward initialises.
    blank = make_layer(5, device, seed=3)
    target = make_layer(5, device, seed=4).train()
    target.load_state_dict(blank.state_dict())
    assert not target._initialized
    target(x)
    assert target._initialized


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 16, 5, 7), (2, 48, 4, 4), (1, 96, 2, 2)])
def test_reverse_inverts_forward(shape, device):
    layer = make_layer(shape[1], device).train()
    x = skewed_input(shape, device)
    y, _ = layer(x)
    with torch.no_grad():
        x_back = layer.reverse(y)
    assert x_back.shape == x.shape
    # fp32 rounding: ≤ 1e-5 relative (max abs error / max abs value).
    assert_rel_close(x_back, x, 1e-5, "reverse(forward(x))")
    layer.eval()
    assert_rel_close(layer(layer.reverse(x))[0], x, 1e-5, "forward(reverse(y))")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 4, 24, 96])
def test_weight_at_init_is_a_rotation(C, device):
    layer = make_layer(C, device)
    W = layer.weight().detach()
    assert W.shape == (C, C)
    eye = torch.eye(C, device=device)
    torch.testing.assert_close(W @ W.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(W.T @ W, eye, rtol=0, atol=1e-5)
    # |det W| = 1, so the 1x1 convolution adds nothing to the logdet at init.
    assert abs(layer.log_s.sum().item()) < 1e-4
    assert set(layer.sign_s.tolist()) <= {-1.0, 1.0}
    glow_nn.check_permutation(layer.perm, C)


def test_same_generator_same_weights():
    a, b = make_layer(8, seed=11), make_layer(8, seed=11)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert not torch.equal(make_layer(8, seed=12).lower, a.lower)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [3, 5])
def test_layer_logdet_matches_brute_force_jacobian(C, device):
    layer = make_layer(C, device).train()
    layer(skewed_input((8, C, 4, 4), device))  # initialise
    layer = layer.double().eval()
    with torch.no_grad():  # move off the rotation so that the 1x1 conv contributes too
        layer.log_s.add_(0.1)
        layer.lower.add_(0.05)
    x = make_input((1, C, 2, 2), torch.float64, device)
    _, logdet = layer(x)

    def flat(v):
        return layer(v.view(x.shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1))
    torch.testing.assert_close(logdet.detach(), torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)

    jac_rev = torch.autograd.functional.jacobian(lambda v: layer.reverse(v.view(x.shape)).reshape(-1),
                                                 layer(x)[0].detach().reshape(-1))
    torch.testing.assert_close(torch.linalg.slogdet(jac_rev)[1], -logdet.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_matches_reference(device):
    layer = make_layer(12, device).train()
    x = skewed_input((4, 12, 6, 6), device)
    y, logdet = layer(x)
    y_ref, logdet_ref = reference.actnorm_invconv_lu(x, *layer._params())
    assert_rel_close(y, y_ref, 1e-5)
    torch.testing.assert_close(logdet, logdet_ref)


@pytest.mark.parametrize(
    "perm, message",
    [
        (torch.tensor([0, 0, 2]), r"perm must be a permutation of 0\.\.2"),
        (torch.tensor([0, 1, 3]), r"perm must be a permutation"),
        (torch.tensor([-1, 1, 2]), r"perm must be a permutation"),
        (torch.tensor([0, 1, 2, 3]), r"perm must be an int64 tensor of shape \(3,\)"),
        (torch.tensor([[0, 1, 2]]), r"perm must be an int64 tensor of shape \(3,\)"),
        (torch.tensor([0, 1, 2], dtype=torch.int32), r"perm must be an int64 tensor"),
        (torch.tensor([0.0, 1.0, 2.0]), r"perm must be an int64 tensor"),
    ],
    ids=["repeated", "out-of-range", "negative", "too-long", "2d", "int32", "float"],
)
def test_check_permutation_rejects_bad_perms(perm, message):
    with pytest.raises(ValueError, match=message):
        glow_nn.check_permutation(perm, 3)


def test_check_permutation_accepts_permutations():
    for C in (1, 2, 7, 64):
        glow_nn.check_permutation(torch.randperm(C), C)
        glow_nn.check_permutation(torch.arange(C), C)


def test_num_channels_must_be_positive():
    with pytest.raises(ValueError, match="num_channels must be positive"):
        glow_nn.ActNormInvConv2d(0)


def test_parameters_and_buffers():
    layer = make_layer(6)
    assert {name for name, _ in layer.named_parameters()} == {"bias", "logs", "lower", "upper", "log_s"}
    assert {name for name, _ in layer.named_buffers()} == {"perm", "sign_s", "initialized"}
    assert layer.perm.dtype == torch.int64 and not layer.sign_s.requires_grad
    assert "6" in repr(layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [4, 40])
def test_gradients_reach_every_parameter(C, device):
    layer = make_layer(C, device).train()
    x = skewed_input((4, C, 5, 5), device).requires_grad_()
    y, logdet = layer(x)
    x_back = layer.reverse(torch.tanh(y))
    loss = 0.5 * y.square().mean() - logdet / x.numel() + x_back.square().mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert torch.count_nonzero(p.grad) > 0 or C == 1, name
    assert torch.count_nonzero(torch.triu(layer.lower.grad)) == 0
    assert torch.count_nonzero(torch.tril(layer.upper.grad)) == 0
    assert layer.perm.grad is None and layer.sign_s.grad is None

    # And they equal the reference's.
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    xr = x.detach().clone().requires_grad_()
    y, logdet = reference.actnorm_invconv_lu(xr, *layer._params())
    x_back = reference.actnorm_invconv_lu_inverse(torch.tanh(y), *layer._params())
    (0.5 * y.square().mean() - logdet / xr.numel() + x_back.square().mean()).backward()
    for name, p in layer.named_parameters():
        assert_rel_close(grads[name], p.grad, 1e-4, name)
    assert_rel_close(x.grad, xr.grad, 1e-4, "x")


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_keeps_invertibility(device):
    """A few optimiser steps move every parameter; the layer stays exactly invertible."""
    layer = make_layer(8, device).train()
    x = skewed_input((8, 8, 4, 4), device)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.05)
    start = {name: p.detach().clone() for name, p in layer.named_parameters()}
    for _ in range(3):
        optimiser.zero_grad()
        y, logdet = layer(x)
        (0.5 * y.square().mean() - logdet / x.numel()).backward()
        optimiser.step()
    for name, p in layer.named_parameters():
        assert not torch.equal(p.detach(), start[name]), name
    with torch.no_grad():
        y, _ = layer(x)
        assert_rel_close(layer.reverse(y), x, 1e-5, "after training")


# ----------------------------------------------------------------------------------------------
# the cached inverse map (sampling path of reverse)
# ----------------------------------------------------------------------------------------------

def _count_inverse_op_calls(monkeypatch):
    calls = []
    original = ops.actnorm_invconv_lu_inverse
    monkeypatch.setattr(ops, "actnorm_invconv_lu_inverse", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [3, 48, 257])
def test_cached_inverse_matches_inverse_op(C, dtype, device, monkeypatch):
    layer = make_layer(C, device).to(dtype).train()
    x = skewed_input((2, C, 3, 5), device).to(dtype)
    layer(x)
    y = torch.randn_like(x)
    expected = ops.actnorm_invconv_lu_inverse(y, *layer._params()).detach()
    calls = _count_inverse_op_calls(monkeypatch)
    with torch.no_grad():
        first = layer.reverse(y)
        cached = layer._inverse_cache
        second = layer.reverse(y)
    assert not calls, "no_grad reverse must not run the per-call inverse op"
    assert layer._inverse_cache is cached, "a second call must reuse the cached map"
    assert torch.equal(first, second)
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if C < 100 else 3e-5)
    assert_rel_close(first, expected, tol, "cached vs op")


@pytest.mark.parametrize("device", DEVICES)
def test_cache_invalidated_by_optimizer_step_load_state_dict_and_dtype(device):
    layer = make_layer(6, device).train()
    x = skewed_input((4, 6, 3, 3), device)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)

    def check(label):
        y = torch.randn_like(x)
        with torch.no_grad():
            got = layer.reverse(y)
        expected = ops.actnorm_invconv_lu_inverse(y, *layer._params()).detach()
        assert_rel_close(got, expected, 1e-12 if y.dtype == torch.float64 else 1e-5, label)

    layer(x)
    check("after init")
    for step in range(2):
        optimiser.zero_grad()
        y, logdet = layer(x)
        (0.5 * y.square().mean() - logdet / x.numel()).backward()
        optimiser.step()
        check(f"after optimizer step {step}")
    other = make_layer(6, device, seed=9).train()
    other(skewed_input((4, 6, 3, 3), device, seed=5))
    layer.load_state_dict(other.state_dict())
    check("after load_state_dict")
    with torch.no_grad():
        layer.lower.add_(0.1)
    check("after an in-place edit")
    layer.double()
    x = x.double()
    check("after .double()")


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_with_autograd_uses_the_differentiable_op(device, monkeypatch):
    layer = make_layer(5, device).train()
    x = skewed_input((3, 5, 4, 4), device)
    layer(x)
    calls = _count_inverse_op_calls(monkeypatch)
    y = torch.randn_like(x)
    out = layer.reverse(y)
    assert calls and out.requires_grad
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_cls", [glow_nn.ActNormInvConv2d, glow_nn.ActNorm2d])
@pytest.mark.parametrize("batch", ["empty_n", "empty_hw", "nan", "inf"])
def test_init_refuses_an_empty_or_non_finite_batch(layer_cls, batch, device):
    """Found by tests/test_fuzz.py: such a batch used to set bias and logs to NaN silently."""
    layer = layer_cls(4).to(device).train()
    x = skewed_input((3, 4, 5, 5), device)
    if batch == "empty_n":
        x = x[:0]
    elif batch == "empty_hw":
        x = x[:, :, :0]
    else:
        x[1, 2, 3, 4] = float(batch)
    with pytest.raises(ValueError, match="data-dependent initialisation needs a non-empty batch of finite"):
        layer(x)
    assert not layer._initialized and torch.isfinite(layer.logs).all() and torch.isfinite(layer.bias).all()
    layer(skewed_input((3, 4, 5, 5), device))  # a good batch still initialises it
    assert layer._initialized and torch.isfinite(layer.logs).all()
