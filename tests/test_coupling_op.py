"""The fused affine coupling ops: values, gradients, extreme logits, layouts, registration, errors.

Values are checked against glow_ext.reference in the same dtype and against a float64 evaluation
written here with torch.sigmoid (independent of the op's softplus form). Errors are measured as
max |a − b| / max |b| (conftest.max_rel_error).
"""
import math

import pytest
import torch

from glow_ext import coupling_ops, reference
from glow_ext.nn import AffineCoupling

from conftest import DEVICES, assert_rel_close, requires_cuda

pytestmark = pytest.mark.skipif(not coupling_ops.kernels_available(),
                                reason="the compiled extension is not built")

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (N, C, H, W) of x_b: a single element, odd sizes, more elements per sample than one CPU task
# (2048) and than one chunk of the CPU's log-determinant reduction (64), the Glow level shapes.
SHAPES = [
    pytest.param((1, 1, 1, 1), id="one-element"),
    pytest.param((3, 5, 7, 3), id="odd"),
    pytest.param((2, 3, 37, 41), id="several-tasks"),
    pytest.param((16, 6, 16, 16), id="glow-level1"),
    pytest.param((16, 24, 4, 4), id="glow-level3"),
]


def make_pair(shape, dtype=torch.float32, device="cpu", logit_scale=3.0):
    """(x_b, h) with h = (shift, logit) of shape (N, 2C, H, W); fresh random, non-zero."""
    n, c, height, width = shape
    x_b = torch.randn(shape, dtype=torch.float64) + 0.3
    shift = torch.randn(shape, dtype=torch.float64) - 0.2
    logit = logit_scale * torch.randn(shape, dtype=torch.float64)
    h = torch.cat([shift, logit], dim=1)
    return x_b.to(device, dtype), h.to(device, dtype)


def expected64(x_b, h):
    """(y_b, logdet) in float64 from the sigmoid itself."""
    x_b, h = x_b.detach().to("cpu", torch.float64), h.detach().to("cpu", torch.float64)
    c = x_b.shape[1]
    scale = torch.sigmoid(h[:, c:] + 2.0)
    return (x_b + h[:, :c]) * scale, scale.log().flatten(1).sum(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_and_float64(shape, dtype, device):
    x_b, h = make_pair(shape, dtype, device)
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    y_ref, logdet_ref = reference.affine_coupling(x_b, h)
    assert y_b.dtype == dtype and logdet.dtype == dtype and logdet.shape == (shape[0],)
    assert y_b.is_contiguous()
    y64, logdet64 = expected64(x_b, h)
    tol = TOLERANCE[dtype]
    assert_rel_close(y_b, y_ref, tol, "y_b vs reference")
    assert_rel_close(y_b, y64, tol, "y_b vs float64")
    assert_rel_close(logdet, logdet_ref, tol, "logdet vs reference")
    assert_rel_close(logdet, logdet64, tol, "logdet vs float64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_matches_reference_and_inverts(shape, dtype, device):
    x_b, h = make_pair(shape, dtype, device)
    y_b, _ = coupling_ops.affine_coupling(x_b, h)
    x_back = coupling_ops.affine_coupling_inverse(y_b, h)
    assert_rel_close(x_back, reference.affine_coupling_inverse(y_b, h), TOLERANCE[dtype], "inverse")
    assert_rel_close(x_back, x_b, 4 * TOLERANCE[dtype], "round trip")


def _grads(fn, inputs, grad_outputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return torch.autograd.grad(outputs, leaves, grad_outputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_gradients_match_reference(shape, dtype, device):
    x_b, h = make_pair(shape, dtype, device)
    grad_y, grad_logdet = torch.randn_like(x_b), torch.randn(shape[0], dtype=dtype, device=device)
    for op, ref, grad_outputs in (
            (coupling_ops.affine_coupling, reference.affine_coupling, (grad_y, grad_logdet)),
            (coupling_ops.affine_coupling_inverse, reference.affine_coupling_inverse, (grad_y,))):
        for got, want, name in zip(_grads(op, (x_b, h), grad_outputs),
                                   _grads(ref, (x_b, h), grad_outputs), ("input", "h")):
            assert_rel_close(got, want, 4 * TOLERANCE[dtype], f"{op.__name__}: grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [coupling_ops.affine_coupling, coupling_ops.affine_coupling_inverse])
def test_gradcheck_float64(op, device):
    x_b, h = make_pair((2, 3, 4, 5), torch.float64, device, logit_scale=2.0)
    assert torch.autograd.gradcheck(op, (x_b.requires_grad_(), h.requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_through_channel_slices(device):
    """x_b, h and the gradient of y_b as channel slices of larger tensors, as in the layer."""
    x, wide_h = make_pair((2, 7, 3, 4), torch.float64, device)

    def fn(x, wide_h):
        y_b, logdet = coupling_ops.affine_coupling(x[:, 4:], wide_h[:, 1:7])
        return torch.cat([x[:, :4], y_b], dim=1), logdet

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), wide_h.requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_finite_and_exact(dtype, device):
    """Scale logits of ±100 (and ±1e4, ±30, values near -2) against float64: all finite."""
    logits = torch.tensor([100.0, -100.0, 1e4, -1e4, 30.0, -30.0, -2.0, -2.5, 0.0, 17.0],
                          dtype=torch.float64)
    n, c = 2, logits.numel()
    x_b = (torch.rand(n, c, 1, 1, dtype=torch.float64) + 0.5).to(device, dtype)
    shift = (torch.rand(n, c, 1, 1, dtype=torch.float64) - 0.5).to(device, dtype)
    h = torch.cat([shift, logits.view(1, c, 1, 1).expand(n, c, 1, 1).to(device, dtype)], dim=1)
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    assert torch.isfinite(y_b).all() and torch.isfinite(logdet).all()
    y64, logdet64 = expected64(x_b, h)
    # log sigmoid(-9998) = -9998 exactly in float64's softplus form; sigmoid() underflows there.
    logdet64 = torch.nn.functional.logsigmoid(h[:, c:].cpu().double() + 2).flatten(1).sum(1)
    assert_rel_close(logdet, logdet64, TOLERANCE[dtype], "logdet")
    # Per element, relative, plus a few subnormal spacings: sigmoid(-98) ~ 2.7e-43 is a float32
    # subnormal, with only a few significant bits.
    spacing = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    excess = (y_b.cpu().double() - y64).abs() - 2 * TOLERANCE[dtype] * y64.abs() - 4 * spacing
    assert (excess <= 0).all(), f"y_b: error beyond tolerance by {excess.max().item():.2e}"
    grad_y = torch.ones_like(x_b)
    grad_logdet = torch.ones(n, dtype=dtype, device=device)
    grads = _grads(coupling_ops.affine_coupling, (x_b, h), (grad_y, grad_logdet))
    assert all(torch.isfinite(g).all() for g in grads)
    # dL/dlogit = (y_b + 1)·(1 - s): at logit +100 that is ~e^-102, at -100 it is y_b + 1.
    logit64 = h[:, c:].cpu().double()
    expected = (y64 + 1) * torch.sigmoid(-(logit64 + 2))
    assert_rel_close(grads[1][:, c:], expected, 4 * TOLERANCE[dtype], "grad logit")
    # The inverse of a moderate y_b: 1/s overflows to inf only where it should (logit -1e4).
    x_back = coupling_ops.affine_coupling_inverse(y_b, h)
    finite = logits > -50
    assert torch.isfinite(x_back[:, finite]).all()
    assert_rel_close(x_back[:, finite], x_b[:, finite], 4 * TOLERANCE[dtype], "round trip")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logdet_is_the_log_jacobian_determinant(dtype, device):
    x_b, h = make_pair((2, 2, 2, 2), dtype, device)
    _, logdet = coupling_ops.affine_coupling(x_b, h)
    for n in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda v: coupling_ops.affine_coupling(v.view(1, 2, 2, 2), h[n:n + 1])[0].flatten(),
            x_b[n].flatten().double() if dtype == torch.float64 else x_b[n].flatten())
        assert_rel_close(logdet[n], torch.linalg.slogdet(jac.double())[1], TOLERANCE[dtype], "logdet")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_channels_last_inputs(dtype, device):
    shape = (3, 4, 5, 6)
    x_b, h = make_pair(shape, dtype, device)
    expected_y, expected_logdet = coupling_ops.affine_coupling(x_b, h)
    expected_x = coupling_ops.affine_coupling_inverse(x_b, h)
    wide = torch.randn(3, 9, 5, 6, dtype=dtype, device=device)
    wide[:, 5:] = x_b
    layouts = {
        "channels_last": (x_b.contiguous(memory_format=torch.channels_last),
                          h.contiguous(memory_format=torch.channels_last)),
        "channel slice": (wide[:, 5:], h),
        "transposed": (x_b.transpose(2, 3).contiguous().transpose(2, 3), h),
        "strided": (torch.stack([x_b, x_b], dim=-1)[..., 0], h.transpose(0, 1).contiguous().transpose(0, 1)),
    }
    for name, (x_in, h_in) in layouts.items():
        y_b, logdet = coupling_ops.affine_coupling(x_in, h_in)
        assert y_b.is_contiguous(), name
        torch.testing.assert_close(y_b, expected_y, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(logdet, expected_logdet, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(coupling_ops.affine_coupling_inverse(x_in, h_in), expected_x,
                                   rtol=0, atol=0, msg=name)
        grad_y, grad_logdet = torch.randn_like(x_b), torch.randn(3, dtype=dtype, device=device)
        grad_y_cl = grad_y.contiguous(memory_format=torch.channels_last)
        got = _grads(coupling_ops.affine_coupling, (x_in, h_in), (grad_y_cl, grad_logdet))
        want = _grads(coupling_ops.affine_coupling, (x_b, h), (grad_y, grad_logdet))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_image(device):
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4)):
        x_b, h = make_pair(shape, torch.float32, device)
        x_b.requires_grad_()
        y_b, logdet = coupling_ops.affine_coupling(x_b, h)
        assert y_b.shape == shape and logdet.shape == (shape[0],)
        assert (logdet == 0).all()
        assert coupling_ops.affine_coupling_inverse(y_b, h).shape == shape
        (y_b.sum() + logdet.sum()).backward()
        assert x_b.grad.shape == shape


def test_deterministic_logdet_over_thread_counts():
    x_b, h = make_pair((5, 7, 33, 35))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(coupling_ops.affine_coupling(x_b, h)[1])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    x_b, h = make_pair((4, 6, 16, 16), dtype, "cuda")
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    assert y_b.dtype == dtype and logdet.dtype == torch.float32
    y64, logdet64 = expected64(x_b, h)
    assert_rel_close(y_b, y64, TOLERANCE[dtype], "y_b")
    assert_rel_close(logdet, logdet64, 1e-5, "logdet (float32 accumulation)")
    assert_rel_close(coupling_ops.affine_coupling_inverse(y_b, h), x_b, 4 * TOLERANCE[dtype], "round trip")
    grads = _grads(coupling_ops.affine_coupling, (x_b, h), (torch.ones_like(y_b), torch.ones_like(logdet)))
    grads64 = _grads(reference.affine_coupling, (x_b.double(), h.double()),
                     (torch.ones_like(y_b).double(), torch.ones_like(logdet).double()))
    for g, g64 in zip(grads, grads64):
        assert_rel_close(g, g64, 4 * TOLERANCE[dtype], "grad")


# ----------------------------------------------------------------------------------------------
# bad inputs: each a clear error
# ----------------------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(lambda x, h: (x, h[:, :6]), "must have shape \\(N, 2C, H, W\\)", id="h-channels"),
    pytest.param(lambda x, h: (x, h[:, :7]), "even number of channels", id="h-odd-channels"),
    pytest.param(lambda x, h: (x, h[:1]), "must have shape \\(N, 2C, H, W\\)", id="h-batch"),
    pytest.param(lambda x, h: (x, h[..., :2]), "must have shape \\(N, 2C, H, W\\)", id="h-width"),
    pytest.param(lambda x, h: (x[0], h), "must be 4-D", id="x-3d"),
    pytest.param(lambda x, h: (x, h.double()), "`h` must have the dtype of", id="dtype-mix"),
    pytest.param(lambda x, h: (x.long(), h.long()), "must be a floating-point tensor", id="integer"),
    pytest.param(lambda x, h: (x.half(), h.half()), "supported on CUDA only", id="cpu-half"),
]


@pytest.mark.parametrize("op", [coupling_ops.affine_coupling, coupling_ops.affine_coupling_inverse])
@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(op, make_bad, message):
    x_b, h = make_pair((2, 4, 3, 3))
    with pytest.raises(RuntimeError, match=message):
        op(*make_bad(x_b, h))


def test_bad_backward_inputs_raise_clear_errors():
    x_b, h = make_pair((2, 4, 3, 3))
    grad_y, grad_logdet = torch.randn_like(x_b), torch.randn(2)
    backward = torch.ops.glow_ext.affine_coupling_backward
    with pytest.raises(RuntimeError, match="`grad_y_b` must have the shape of `x_b`"):
        backward(grad_y[:1], grad_logdet, x_b, h)
    with pytest.raises(RuntimeError, match="`grad_logdet` must have shape \\(N,\\)"):
        backward(grad_y, grad_logdet[:1], x_b, h)
    with pytest.raises(RuntimeError, match="`grad_y_b` has dtype"):
        backward(grad_y.double(), grad_logdet, x_b, h)
    with pytest.raises(RuntimeError, match="`grad_x_b` must have the shape of `y_b`"):
        torch.ops.glow_ext.affine_coupling_inverse_backward(grad_y[:, :2], x_b, h)


@requires_cuda
@pytest.mark.cuda
def test_device_mix_raises_clear_error():
    x_b, h = make_pair((2, 4, 3, 3))
    for op in (coupling_ops.affine_coupling, coupling_ops.affine_coupling_inverse):
        with pytest.raises(RuntimeError, match="must be on one device"):
            op(x_b, h.cuda())


def test_device_mix_is_caught_by_the_fake_kernel():
    """Without a GPU, the same check seen through meta tensors (what torch.compile traces)."""
    x_b, h = make_pair((2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="must be on one device"):
        coupling_ops.affine_coupling(x_b, h.to("meta"))


def test_double_backward_raises_clear_error():
    x_b, h = make_pair((2, 3, 2, 2), torch.float64)
    x_b.requires_grad_()
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    (grad,) = torch.autograd.grad(y_b.square().sum() + logdet.sum(), x_b, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------
# registration: opcheck, fake kernels, torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["affine_coupling", "affine_coupling_inverse"])
def test_opcheck_forward_and_inverse(op_name, device):
    x_b, h = make_pair((2, 3, 4, 5), torch.float32, device)
    torch.library.opcheck(getattr(torch.ops.glow_ext, op_name).default,
                          (x_b.requires_grad_(), h.requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    x_b, h = make_pair((2, 3, 4, 5), torch.float32, device)
    grad = torch.randn_like(x_b)
    torch.library.opcheck(torch.ops.glow_ext.affine_coupling_backward.default,
                          (grad, torch.randn(2, device=device), x_b, h))
    torch.library.opcheck(torch.ops.glow_ext.affine_coupling_inverse_backward.default, (grad, x_b, h))


def test_fake_kernels_on_meta_tensors():
    x_b = torch.empty(2**14, 8, 2**7, 2**7, device="meta")  # > 2^31 elements, never allocated
    h = torch.empty(2**14, 16, 2**7, 2**7, device="meta")
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    assert y_b.shape == x_b.shape and logdet.shape == (2**14,) and logdet.dtype == torch.float32
    assert coupling_ops.affine_coupling_inverse(y_b, h).shape == x_b.shape
    grad_x, grad_h = torch.ops.glow_ext.affine_coupling_backward(y_b, logdet, x_b, h)
    assert grad_x.shape == x_b.shape and grad_h.shape == h.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.compile
def test_torch_compile_fullgraph_of_the_layer_matches_eager(device):
    torch.manual_seed(3)
    layer = AffineCoupling(6, hidden_channels=16).to(device)
    for p in layer.nn.net[-1].parameters():  # leave the zero init, so the scale is not constant
        torch.nn.init.normal_(p, 0.0, 0.1)
    x = torch.randn(3, 6, 5, 5, device=device)

    def loss_fn(x):
        y, logdet = layer(x)
        return y.square().mean() - logdet.mean() + layer.reverse(torch.tanh(y)).square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        loss = fn(xg)
        loss.backward()
        results.append((loss.detach(), xg.grad, [p.grad.clone() for p in layer.parameters()]))
    (loss_e, gx_e, gp_e), (loss_c, gx_c, gp_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert_rel_close(gx_c, gx_e, 1e-5, "grad x")
    for a, b in zip(gp_c, gp_e):
        assert_rel_close(a, b, 1e-5, "grad parameter")


@pytest.mark.parametrize("device", DEVICES)
def test_layer_matches_the_plain_formulation(device):
    """AffineCoupling through the op equals the formulation it replaced, value and gradients."""
    layer = AffineCoupling(7, hidden_channels=8).to(device, torch.float64)
    for p in layer.nn.net[-1].parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 7, 4, 3, dtype=torch.float64, device=device, requires_grad=True)

    def plain(x):
        x_a, x_b = x[:, :layer.passive], x[:, layer.passive:]
        h = layer.nn(x_a)
        log_scale = torch.nn.functional.logsigmoid(h[:, layer.active:] + 2.0)
        y_b = (x_b + h[:, :layer.active]) * log_scale.exp()
        return torch.cat([x_a, y_b], 1), log_scale.flatten(1).sum(1)

    (y, logdet), (y0, logdet0) = layer(x), plain(x)
    torch.testing.assert_close(y, y0, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(logdet, logdet0, rtol=1e-13, atol=1e-13)
    g = torch.autograd.grad((y.sum() + logdet.sum()), [x, *layer.parameters()])
    g0 = torch.autograd.grad((y0.sum() + logdet0.sum()), [x, *layer.parameters()])
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.reverse(y), x, rtol=1e-12, atol=1e-12)


def test_fallback_uses_the_reference(monkeypatch):
    """Without the kernels the public functions are the reference (the import-time warning is
    emitted by glow_ext.ops, tested in test_build.py)."""
    monkeypatch.setattr(coupling_ops, "_AVAILABLE", False)
    x_b, h = make_pair((2, 3, 2, 2))
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    y_ref, logdet_ref = reference.affine_coupling(x_b, h)
    assert torch.equal(y_b, y_ref) and torch.equal(logdet, logdet_ref)
    assert torch.equal(coupling_ops.affine_coupling_inverse(y_b, h),
                       reference.affine_coupling_inverse(y_b, h))
    assert math.isfinite(logdet.sum().item())
