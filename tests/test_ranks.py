"""The fused ops and the rank-generic layer on inputs of any rank (N, C, *spatial).

Feature vectors (N, C), sequences (N, C, T), images (N, C, H, W) and volumes (N, C, D, H, W): the
ops work per position, with M = the product of the spatial sizes positions per sample (1 for (N, C))
and logdet = M·(Σ logs + Σ log_s). Values are checked against glow_ext.reference and against a
float64 computation with the dense W (conftest.dense_weight64).
"""
import math

import pytest
import torch

import glow_ext
from glow_ext import nn as glow_nn
from glow_ext import ops, reference

from conftest import (
    DEVICES,
    DIFF_PARAM_NAMES,
    PARAM_NAMES,
    assert_rel_close,
    dense_weight64,
    make_generator,
    make_input,
    make_params,
)

pytestmark = pytest.mark.skipif(not glow_ext.ops.kernels_available(),
                                reason="the compiled extension is not built")

DTYPES = [torch.float32, torch.float64]

# Per rank: a small-C direct shape, a mid-C one, and one with C > 192 and N·M < C (the factored path).
SHAPES = [
    pytest.param((7, 5), id="r2-C5"),
    pytest.param((3, 40), id="r2-C40"),
    pytest.param((4, 300), id="r2-C300-factored"),
    pytest.param((3, 5, 11), id="r3-C5"),
    pytest.param((2, 40, 6), id="r3-C40"),
    pytest.param((1, 257, 3), id="r3-C257-factored"),
    pytest.param((1, 520, 530), id="r3-C520-gemm"),
    pytest.param((2, 5, 3, 4), id="r4-C5"),
    pytest.param((1, 257, 1, 2), id="r4-C257-factored"),
    pytest.param((2, 3, 2, 3, 4), id="r5-C3"),
    pytest.param((2, 12, 2, 2, 3), id="r5-C12"),
    pytest.param((1, 257, 1, 2, 1), id="r5-C257-factored"),
]
# One cheap shape per rank, for the gradient, registration and layer tests.
RANK_SHAPES = {2: (6, 4), 3: (2, 4, 5), 4: (2, 4, 3, 2), 5: (2, 3, 2, 1, 3)}


def positions(shape):
    return math.prod(shape[2:])


def forward_tol(dtype):
    return 1e-11 if dtype == torch.float64 else 3e-5


def inverse_tol(dtype, C):
    # fp32 triangular solves of the LU factors of a rotation (see test_ops.inverse_tol).
    if dtype == torch.float64:
        return 1e-10
    return 1e-5 if C <= 192 else 5e-5


def setup(shape, dtype, device, seed=0):
    g = make_generator(seed)
    params = make_params(shape[1], dtype=dtype, device=device, generator=g)
    x = make_input(shape, dtype=dtype, device=device, generator=g)
    return x, params


def with_grad(x, params):
    x = x.detach().clone().requires_grad_()
    params = tuple(p.detach().clone().requires_grad_(name in DIFF_PARAM_NAMES)
                   for name, p in zip(PARAM_NAMES, params))
    return x, params


def dense_forward64(x, params):
    """(y, logdet) in float64 from the dense W, with x flattened to (N, C, M) by hand."""
    bias, logs, perm, lower, upper, log_s, sign_s = params
    W = dense_weight64(perm, lower, upper, log_s, sign_s)
    x, bias, logs = (t.detach().to("cpu", torch.float64) for t in (x, bias, logs))
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    y3 = W @ ((x3 + bias.view(1, -1, 1)) * logs.exp().view(1, -1, 1))
    logabsdet = torch.linalg.slogdet(W)[1] + logs.sum()
    return y3.reshape(x.shape), logabsdet * positions(x.shape)


def dense_inverse64(y, params):
    bias, logs, perm, lower, upper, log_s, sign_s = params
    W = dense_weight64(perm, lower, upper, log_s, sign_s)
    y, bias, logs = (t.detach().to("cpu", torch.float64) for t in (y, bias, logs))
    v = torch.linalg.solve(W, y.reshape(y.shape[0], y.shape[1], -1))
    return (v * (-logs).exp().view(1, -1, 1) - bias.view(1, -1, 1)).reshape(y.shape)


# ----------------------------------------------------------------------------------------------
# values and paths
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_and_dense_float64(shape, dtype, device):
    x, params = setup(shape, dtype, device)
    y, logdet = ops.actnorm_invconv_lu(x, *params)
    assert y.shape == x.shape and y.dtype == dtype and logdet.shape == ()
    y_ref, logdet_ref = reference.actnorm_invconv_lu(x, *params)
    y64, logdet64 = dense_forward64(x, params)
    assert_rel_close(y, y_ref, forward_tol(dtype), "y vs reference")
    assert_rel_close(y, y64, forward_tol(dtype), "y vs dense float64")
    bias, logs, perm, lower, upper, log_s, sign_s = params
    expected_logdet = positions(shape) * (logs.double().sum() + log_s.double().sum())
    torch.testing.assert_close(logdet.double(), expected_logdet, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-5, atol=1e-5)  # float32 sums in the reference
    assert_rel_close(logdet, logdet64, 1e-9 if dtype == torch.float64 else 1e-5, "logdet vs slogdet")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_matches_reference_and_round_trips(shape, dtype, device):
    y, params = setup(shape, dtype, device, seed=1)
    x = ops.actnorm_invconv_lu_inverse(y, *params)
    assert x.shape == y.shape and x.dtype == dtype
    tol = inverse_tol(dtype, shape[1])
    assert_rel_close(x, reference.actnorm_invconv_lu_inverse(y, *params), tol, "x vs reference")
    assert_rel_close(x, dense_inverse64(y, params), tol, "x vs dense float64")
    x0 = make_input(shape, dtype=dtype, device=device, generator=make_generator(2))
    assert_rel_close(ops.actnorm_invconv_lu_inverse(ops.actnorm_invconv_lu(x0, *params)[0], *params),
                     x0, 4 * tol, "round trip")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, factored", [((4, 300), True), ((1, 257, 3), True), ((1, 257, 1, 2, 1), True),
                                             ((300, 300), False), ((7, 5), False), ((2, 3, 2, 3, 4), False)])
def test_path_choice_counts_every_position(shape, factored, device):
    """The factored path (no folded map: the training ops return a (0, C) placeholder) is taken when
    C > 192 and N·M < C, whatever the rank; the fake kernels agree."""
    x, params = setup(shape, torch.float32, device)
    assert ops.uses_factored_path(shape[1], shape[0] * positions(shape)) == factored
    rows = 0 if factored else shape[1]
    assert torch.ops.glow_ext._actnorm_invconv_lu_train(x, *params)[2].shape == (rows, shape[1])
    assert torch.ops.glow_ext._actnorm_invconv_lu_inverse_train(x, *params)[1].shape == (rows, shape[1])
    meta = torch.ops.glow_ext._actnorm_invconv_lu_train(x.to("meta"), *(p.to("meta") for p in params))
    assert meta[2].shape == (rows, shape[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_channel_map_any_rank(rank, dtype, device):
    g = make_generator(rank)
    C = RANK_SHAPES[rank][1]
    x = make_input(RANK_SHAPES[rank], dtype=dtype, device=device, generator=g)
    acc = reference.accumulation_dtype(x)
    weight = torch.randn(C, C, generator=g, dtype=torch.float64)
    offset = torch.randn(C, generator=g, dtype=torch.float64)
    y = ops.channel_map(x, weight.to(device, acc), offset.to(device, acc))
    x3 = x.double().cpu().reshape(x.shape[0], C, -1)
    expected = (weight @ x3 + offset.view(1, -1, 1)).reshape(x.shape)
    assert y.shape == x.shape
    assert_rel_close(y, expected, forward_tol(dtype), "channel_map")


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 6), (4, 300), (2, 7, 5), (1, 257, 3), (2, 3, 2, 3, 4)],
                         ids=["r2-C6", "r2-C300-factored", "r3-C7", "r3-C257-factored", "r5-C3"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradients_match_reference(inverse, shape, dtype, device):
    x, params = setup(shape, dtype, device, seed=3)
    op, ref_op = ((ops.actnorm_invconv_lu_inverse, reference.actnorm_invconv_lu_inverse) if inverse
                  else (ops.actnorm_invconv_lu, reference.actnorm_invconv_lu))
    weight = torch.randn_like(x)
    grads = []
    for fn in (op, ref_op):
        xg, pg = with_grad(x, params)
        out = fn(xg, *pg)
        loss = (out * weight).sum() if inverse else (out[0] * weight).sum() + 0.3 * out[1]
        loss.backward()
        grads.append([xg.grad] + [p.grad for p in pg if p.requires_grad])
    tol = 1e-9 if dtype == torch.float64 else (1e-4 if shape[1] <= 192 else 5e-4)
    for name, got, expected in zip(("x",) + DIFF_PARAM_NAMES, *grads):
        assert_rel_close(got, expected, tol, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("op", [ops.actnorm_invconv_lu, ops.actnorm_invconv_lu_inverse],
                         ids=["forward", "inverse"])
def test_gradcheck(op, rank, device):
    x, params = with_grad(*setup(RANK_SHAPES[rank], torch.float64, device, seed=rank))
    assert torch.autograd.gradcheck(op, (x, *params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [ops.actnorm_invconv_lu, ops.actnorm_invconv_lu_inverse],
                         ids=["forward", "inverse"])
def test_gradcheck_factored_rank2(op, device):
    x, params = with_grad(*setup((2, 200), torch.float64, device, seed=5))
    assert torch.autograd.gradcheck(op, (x, *params), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3), (1, 4, 2), (1, 2, 2, 1, 2)], ids=["r2", "r3", "r5"])
def test_logdet_matches_brute_force_jacobian(shape, device):
    """logdet = log|det J| of the full (C·M)² Jacobian of one sample, in float64."""
    x, params = setup(shape, torch.float64, device, seed=len(shape))
    y, logdet = ops.actnorm_invconv_lu(x, *params)
    size = x.numel()
    jac = torch.autograd.functional.jacobian(
        lambda v: ops.actnorm_invconv_lu(v.view(x.shape), *params)[0].reshape(-1), x.reshape(-1))
    assert jac.shape == (size, size)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)
    jac_inv = torch.autograd.functional.jacobian(
        lambda v: ops.actnorm_invconv_lu_inverse(v.view(x.shape), *params).reshape(-1), y.reshape(-1))
    torch.testing.assert_close(torch.linalg.slogdet(jac_inv)[1], -logdet, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# registration: opcheck (torch.compile at rank 3: test_ops.test_torch_compile_fullgraph_matches_eager)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 5), (2, 3, 2, 1, 3), (2, 257)],
                         ids=["r2", "r3", "r5", "r2-C257-factored"])
def test_opcheck_every_op(shape, device):
    x, params = setup(shape, torch.float32, device)
    xg, pg = with_grad(x, params)
    for name in ("actnorm_invconv_lu", "actnorm_invconv_lu_inverse", "_actnorm_invconv_lu_train",
                 "_actnorm_invconv_lu_inverse_train"):
        torch.library.opcheck(getattr(torch.ops.glow_ext, name).default, (xg, *pg))
    grad = torch.randn_like(x)
    folded = torch.ops.glow_ext._actnorm_invconv_lu_train(x, *params)[2]
    folded_inverse = torch.ops.glow_ext._actnorm_invconv_lu_inverse_train(x, *params)[1]
    grad_logdet = torch.tensor(0.7, device=device)
    for saved, saved_inverse in ((None, None), (folded, folded_inverse)):
        torch.library.opcheck(torch.ops.glow_ext.actnorm_invconv_lu_backward.default,
                              (grad, grad_logdet, x, *params, saved))
        torch.library.opcheck(torch.ops.glow_ext.actnorm_invconv_lu_inverse_backward.default,
                              (grad, x, *params, saved_inverse))
    C = shape[1]
    weight = torch.randn(C, C, device=device, requires_grad=True)
    offset = torch.randn(C, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.glow_ext.channel_map.default, (xg, weight, offset))


# ----------------------------------------------------------------------------------------------
# empty and bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (0, 4, 3), (2, 4, 0), (2, 3, 2, 0, 3), (0, 300), (2, 300, 0)])
def test_empty_inputs(shape, dtype, device):
    x, params = setup(shape, dtype, device)
    xg, pg = with_grad(x, params)
    y, logdet = ops.actnorm_invconv_lu(xg, *pg)
    assert y.shape == x.shape
    bias, logs, perm, lower, upper, log_s, sign_s = params
    expected_logdet = positions(shape) * (logs.double().sum() + log_s.double().sum())
    torch.testing.assert_close(logdet.double(), expected_logdet, rtol=1e-6, atol=1e-6)
    (y.sum() + logdet).backward()
    assert xg.grad.shape == x.shape
    # Only the logdet depends on the parameters: logs and log_s get M, the rest zero.
    torch.testing.assert_close(pg[1].grad.double(), torch.full_like(logs, positions(shape)).double())
    torch.testing.assert_close(pg[3].grad, torch.zeros_like(lower))
    x_back = ops.actnorm_invconv_lu_inverse(xg, *pg)
    assert x_back.shape == x.shape
    x_back.sum().backward()
    acc = reference.accumulation_dtype(x)
    eye = torch.eye(shape[1], dtype=acc, device=device)
    assert ops.channel_map(x, eye, bias.to(acc)).shape == x.shape


def bad_cases():
    """(id, x, channels of the parameters, message regex)."""
    return [
        ("1-D", torch.randn(4), 4, r"`x` must be at least 2-D \(N, C, \*spatial\), got shape \[4\]"),
        ("0-D", torch.tensor(1.0), 1, r"`x` must be at least 2-D \(N, C, \*spatial\), got shape \[\]"),
        ("rank2-no-channels", torch.randn(3, 0), 0, r"`x` must have at least one channel, got shape \[3, 0\]"),
        ("rank3-C-mismatch", torch.randn(2, 5, 7), 4, r"`bias` must have shape \(C,\) = \(5,\).*got \[4\]"),
        ("rank2-C-mismatch", torch.randn(2, 3), 4, r"`bias` must have shape \(C,\) = \(3,\).*got \[4\]"),
        ("rank5-C-mismatch", torch.randn(1, 2, 2, 2, 2), 3, r"`bias` must have shape \(C,\) = \(2,\)"),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("which", ["forward", "inverse"])
def test_bad_inputs_raise_clear_errors(case, which):
    _, x, C, message = case
    params = make_params(C) if C else tuple(t[:0] if t.dim() == 1 else t[:0, :0] for t in make_params(1))
    op, op_name, name = {
        "forward": (ops.actnorm_invconv_lu, "glow_ext::actnorm_invconv_lu: ", "`x`"),
        "inverse": (ops.actnorm_invconv_lu_inverse, "glow_ext::actnorm_invconv_lu_inverse: ", "`y`"),
    }[which]
    with pytest.raises(RuntimeError, match=op_name + message.replace("`x`", name)):
        op(x, *params)


def test_bad_rank_in_backward_ops_channel_map_and_fake_kernels():
    x, params = torch.randn(4), make_params(4)
    with pytest.raises(RuntimeError, match=r"actnorm_invconv_lu_backward: `x` must be at least 2-D"):
        torch.ops.glow_ext.actnorm_invconv_lu_backward(x, torch.tensor(1.0), x, *params)
    with pytest.raises(RuntimeError, match=r"actnorm_invconv_lu_inverse_backward: `x` must be at least 2-D"):
        torch.ops.glow_ext.actnorm_invconv_lu_inverse_backward(x, x, *params)
    with pytest.raises(RuntimeError, match=r"channel_map: `x` must be at least 2-D \(N, C, \*spatial\)"):
        ops.channel_map(x, torch.eye(4), torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"channel_map: `x` must have at least one channel"):
        ops.channel_map(torch.randn(3, 0, 2), torch.eye(0), torch.zeros(0))
    meta = [p.to("meta") for p in params]
    with pytest.raises(RuntimeError, match=r"actnorm_invconv_lu: `x` must be at least 2-D"):
        torch.ops.glow_ext.actnorm_invconv_lu(x.to("meta"), *meta)
    with pytest.raises(RuntimeError, match=r"channel_map: `x` must be at least 2-D"):
        torch.ops.glow_ext.channel_map(x.to("meta"), torch.eye(4, device="meta"), torch.zeros(4, device="meta"))


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 6), (8, 6, 9), (4, 6, 3, 2, 2), (2, 300)],
                         ids=["r2", "r3", "r5", "r2-C300-factored"])
def test_layer_init_round_trip_and_cache(shape, dtype, device):
    C = shape[1]
    layer = glow_nn.ActNormInvConv(C, scale=0.5, generator=make_generator(C)).to(device, dtype)
    x = make_input(shape, dtype=dtype, device=device, generator=make_generator(7), scale=3.0, shift=1.5)
    y, logdet = layer(x)
    assert y.shape == x.shape and bool(layer.initialized)
    # ActNorm's output (x + bias)·exp(logs) has zero mean and std `scale` over N and the positions.
    dims = (0, *range(2, x.dim()))
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    actnorm = (x + layer.bias.view(per_channel)) * layer.logs.exp().view(per_channel)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(actnorm.mean(dim=dims), torch.zeros_like(layer.bias), rtol=0, atol=tol)
    raw_std = x.std(dim=dims, correction=0)  # the init divides by std + 1e-6
    torch.testing.assert_close(actnorm.std(dim=dims, correction=0), 0.5 * raw_std / (raw_std + 1e-6),
                               rtol=tol, atol=tol)
    expected_logdet = positions(shape) * (layer.logs.double().sum() + layer.log_s.double().sum())
    torch.testing.assert_close(logdet.double(), expected_logdet, rtol=1e-6, atol=1e-5)
    round_trip_tol = 1e-10 if dtype == torch.float64 else (1e-5 if C <= 192 else 5e-5)
    # The differentiable inverse, then the cached inverse map.
    assert_rel_close(layer.reverse(y), x, round_trip_tol, "reverse with autograd")
    with torch.no_grad():
        assert_rel_close(layer.reverse(y), x, round_trip_tol, "reverse through the cache")
        assert layer._inverse_cache is not None
        assert_rel_close(layer.reverse(y), x, round_trip_tol, "reverse through the filled cache")


@pytest.mark.parametrize("device", DEVICES)
def test_layer_state_dict_matches_actnorm_invconv2d(device):
    """The rank-generic layer and ActNormInvConv2d have one state_dict format: a 2-D checkpoint loads
    into the generic layer, which then computes the same on images and its own ranks."""
    image_layer = glow_nn.ActNormInvConv2d(5, generator=make_generator(1)).to(device)
    x = make_input((3, 5, 4, 2), device=device)
    image_layer(x)  # data-dependent init
    generic = glow_nn.ActNormInvConv(5, generator=make_generator(2)).to(device)
    assert list(generic.state_dict()) == list(image_layer.state_dict())
    generic.load_state_dict(image_layer.state_dict())
    assert generic._initialized
    for a, b in zip(generic(x), image_layer(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # On a sequence: the same map at every position as on the image's pixels.
    seq = x.flatten(2)
    y_seq, logdet_seq = generic(seq)
    torch.testing.assert_close(y_seq, image_layer(x)[0].flatten(2), rtol=0, atol=0)
    torch.testing.assert_close(logdet_seq, image_layer(x)[1])


@pytest.mark.parametrize("shape", [(2, 5), (2, 5, 3), (1, 5, 2, 2, 2)], ids=["r2", "r3", "r5"])
def test_actnorm_invconv2d_takes_images_only(shape):
    layer = glow_nn.ActNormInvConv2d(5)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"ActNormInvConv2d takes 4-D input \(N, C, H, W\).*ActNormInvConv"):
        layer(x)
    with pytest.raises(ValueError, match=r"ActNormInvConv2d takes 4-D input"):
        layer.reverse(x)
    assert isinstance(layer, glow_nn.ActNormInvConv)


def test_layer_empty_batch_cannot_initialise():
    layer = glow_nn.ActNormInvConv(4)
    with pytest.raises(ValueError, match="data-dependent initialisation needs a non-empty batch"):
        layer(torch.randn(0, 4, 3))
