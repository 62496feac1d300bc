"""bfloat16 activations in the CPU kernels: float32 arithmetic, each output rounded once.

The kernels widen bfloat16 on load and compute exactly as for float32 input, so every output must
equal the float32 op on the same (widened) values, rounded once to the output's dtype: compared
bit for bit, not within a tolerance. Against the float32 reference the outputs then differ by at
most the one rounding (the float32 op and the reference differ by a few float32 ulps, which can
move a value across a bfloat16 rounding boundary: one bfloat16 ulp, 2^-8 relative).

Two call patterns of the coupling op: the autocast case (float32 flow state x_b, bfloat16 network
output h) and all-bfloat16. The 1x1 op takes bfloat16 x with float32 parameters (or bfloat16 ones,
as on CUDA). Log-determinants are float32 throughout.
"""
import pytest
import torch

from glow_ext import coupling_ops, ops, reference

from conftest import DIFF_PARAM_NAMES, PARAM_NAMES, assert_rel_close, cast_params, make_params, requires_cuda

pytestmark = pytest.mark.skipif(not coupling_ops.kernels_available(),
                                reason="the compiled extension is not built")

BF16 = torch.bfloat16
BF16_TOL = 2 ** -7  # max-relative: the one rounding (2^-8) plus the reference's own float32 error

# (x_b dtype, h dtype): the autocast case and all-bfloat16.
COUPLING_DTYPES = [
    pytest.param(torch.float32, BF16, id="float32-x-bfloat16-h"),
    pytest.param(BF16, BF16, id="bfloat16"),
]
COUPLING_SHAPES = [
    pytest.param((1, 1, 1, 1), id="one-element"),
    pytest.param((3, 5, 7, 3), id="odd"),            # ragged chunks of the CPU loop
    pytest.param((2, 3, 37, 41), id="several-tasks"),
    pytest.param((16, 6, 16, 16), id="glow-level1"),
]


def coupling_inputs(shape, x_dtype, h_dtype, logit_scale=3.0):
    """(x_b, h) of fresh random non-zero values, drawn in float64 and rounded to the dtypes."""
    x_b = torch.randn(shape, dtype=torch.float64) + 0.3
    shift = torch.randn(shape, dtype=torch.float64) - 0.2
    logit = logit_scale * torch.randn(shape, dtype=torch.float64)
    return x_b.to(x_dtype), torch.cat([shift, logit], dim=1).to(h_dtype)


def assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert torch.equal(actual, expected), (
        f"{what}: {(actual != expected).sum().item()} of {actual.numel()} elements differ")


def widened(*tensors):
    return [t.float() for t in tensors]


# ----------------------------------------------------------------------------------------------
# the rounding itself: the AVX512-BF16 instruction where the CPU has it, else the portable one
# ----------------------------------------------------------------------------------------------

def rounding_cases():
    """Random values over many binades, then ties both ways, neighbours of ties, overflow,
    infinities and signed zeros (as float32)."""
    random = torch.randn(4099, dtype=torch.float64) * torch.exp2(torch.randint(-60, 60, (4099,)))
    ulp = 2.0 ** -7  # bfloat16 ulp at 1
    special = [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2 ** -20, 1 + ulp / 2 - 2 ** -20,
               3.3961e38, 3.4e38, -3.4e38, float("inf"), -float("inf"), 0.0, -0.0]
    return torch.cat([random.float(), torch.tensor(special)])


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "run-time-choice"])
def test_rounding_is_to_nearest_even_with_nan_kept(portable):
    values = rounding_cases()
    rounded = torch.ops.glow_ext._round_to_bfloat16(values, portable)
    assert rounded.dtype == BF16
    assert_bitwise(rounded, values.to(BF16), "rounded")
    nans = torch.tensor([float("nan"), -float("nan")])
    rounded_nans = torch.ops.glow_ext._round_to_bfloat16(nans, portable)
    assert rounded_nans.isnan().all() and torch.equal(rounded_nans.signbit(), nans.signbit())


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "run-time-choice"])
def test_rounding_of_subnormals(portable):
    """Below 2^-126 the portable rounding rounds as torch does; the AVX512-BF16 instruction, where
    the run-time choice takes it, flushes to zero of the same sign."""
    values = torch.tensor([2.0 ** -130, -3 * 2.0 ** -131, 5 * 2.0 ** -133 + 2.0 ** -140, 2.0 ** -149])
    rounded = torch.ops.glow_ext._round_to_bfloat16(values, portable)
    expected = values.to(BF16)
    if portable:
        assert_bitwise(rounded, expected, "subnormals")
    else:
        assert torch.all((rounded == expected) | (rounded == 0)), (rounded, expected)
    assert torch.equal(rounded.signbit(), values.signbit())


@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
@pytest.mark.parametrize("shape", COUPLING_SHAPES)
def test_coupling_forward_is_float32_rounded_once(shape, x_dtype, h_dtype):
    x_b, h = coupling_inputs(shape, x_dtype, h_dtype)
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    y32, logdet32 = coupling_ops.affine_coupling(*widened(x_b, h))
    assert y_b.is_contiguous() and logdet.shape == (shape[0],)
    assert_bitwise(y_b, y32.to(x_dtype), "y_b")
    assert_bitwise(logdet, logdet32, "logdet")
    y_ref, logdet_ref = reference.affine_coupling(x_b, h)
    assert_rel_close(y_b, y_ref, BF16_TOL if x_dtype == BF16 else 2e-6, "y_b vs reference")
    assert_rel_close(logdet, logdet_ref, 2e-6, "logdet vs reference")


@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
@pytest.mark.parametrize("shape", COUPLING_SHAPES)
def test_coupling_inverse_is_float32_rounded_once(shape, x_dtype, h_dtype):
    y_b, h = coupling_inputs(shape, x_dtype, h_dtype)
    x_b = coupling_ops.affine_coupling_inverse(y_b, h)
    assert_bitwise(x_b, coupling_ops.affine_coupling_inverse(*widened(y_b, h)).to(x_dtype), "x_b")
    assert_rel_close(x_b, reference.affine_coupling_inverse(y_b, h),
                     BF16_TOL if x_dtype == BF16 else 2e-6, "x_b vs reference")


@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
@pytest.mark.parametrize("shape", COUPLING_SHAPES[1:])
def test_coupling_backward_ops_are_float32_rounded_once(shape, x_dtype, h_dtype):
    x_b, h = coupling_inputs(shape, x_dtype, h_dtype)
    grad = torch.randn(shape).to(x_dtype)
    grad_logdet = torch.randn(shape[0])
    ops = torch.ops.glow_ext
    grad_x, grad_h = ops.affine_coupling_backward(grad, grad_logdet, x_b, h)
    grad_x32, grad_h32 = ops.affine_coupling_backward(*widened(grad, grad_logdet, x_b, h))
    assert_bitwise(grad_x, grad_x32.to(x_dtype), "grad_x_b")
    assert_bitwise(grad_h, grad_h32.to(h_dtype), "grad_h")
    grad_y, grad_h = ops.affine_coupling_inverse_backward(grad, x_b, h)
    grad_y32, grad_h32 = ops.affine_coupling_inverse_backward(*widened(grad, x_b, h))
    assert_bitwise(grad_y, grad_y32.to(x_dtype), "inverse: grad_y_b")
    assert_bitwise(grad_h, grad_h32.to(h_dtype), "inverse: grad_h")


def _reference_grads(fn, inputs, grad_outputs):
    """Gradients of the float32 reference at the same (widened) inputs."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return torch.autograd.grad(outputs, leaves, [g.float() for g in grad_outputs])


@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_coupling_autograd_dtypes_and_values(direction, x_dtype, h_dtype):
    """Gradients come back in their inputs' dtypes (x_b's, h's) and match float32's within the
    one rounding."""
    op, ref = {
        "forward": (coupling_ops.affine_coupling, reference.affine_coupling),
        "inverse": (coupling_ops.affine_coupling_inverse, reference.affine_coupling_inverse),
    }[direction]
    x_b, h = coupling_inputs((4, 6, 8, 8), x_dtype, h_dtype)
    x_b.requires_grad_()
    h.requires_grad_()
    outputs = op(x_b, h)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert outputs[0].dtype == x_dtype and all(o.dtype == torch.float32 for o in outputs[1:])
    grad_outputs = [torch.randn_like(o) for o in outputs]
    grad_x, grad_h = torch.autograd.grad(outputs, (x_b, h), grad_outputs)
    assert grad_x.dtype == x_dtype and grad_h.dtype == h_dtype
    ref_x, ref_h = _reference_grads(ref, (x_b, h), grad_outputs)
    assert_rel_close(grad_x, ref_x, BF16_TOL if x_dtype == BF16 else 2e-6, "grad x_b")
    assert_rel_close(grad_h, ref_h, BF16_TOL, "grad h")


def test_coupling_rounds_to_nearest_even_and_keeps_specials():
    """With logit 100 the scale is exactly 1, so y_b = x_b + shift in float32 and the rounding is
    seen alone: ties to even in both directions, NaN, infinities, float32 overflow to inf."""
    tie = 2.0 ** -8  # half a bfloat16 ulp at 1
    cases = [  # (x_b, shift, expected y_b)
        (1.0, tie, 1.0),                                  # tie, down to even
        (1.0 + 2 * tie, tie, 1.0 + 4 * tie),              # tie, up to even
        (1.0 + 2 * tie, -tie, 1.0),                       # tie below, down to even
        (1.0, tie * 1.5, 1.0 + 2 * tie),                  # above the tie
        (float("nan"), 1.0, float("nan")),
        (float("inf"), 1.0, float("inf")),
        (-float("inf"), 1.0, -float("inf")),
        (3.0e38, 3.0e38, float("inf")),                   # float32 overflow
    ]
    x_b = torch.tensor([c[0] for c in cases]).view(1, -1, 1, 1).to(BF16)
    shift = torch.tensor([c[1] for c in cases]).view(1, -1, 1, 1).to(BF16)
    expected = torch.tensor([c[2] for c in cases]).view(1, -1, 1, 1).to(BF16)
    h = torch.cat([shift, torch.full_like(shift, 100.0)], dim=1)
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    torch.testing.assert_close(y_b, expected, rtol=0, atol=0, equal_nan=True)
    assert logdet.dtype == torch.float32 and logdet.abs().item() < 1e-30
    torch.testing.assert_close(coupling_ops.affine_coupling_inverse(x_b, h),
                               (x_b.float() - shift.float()).to(BF16), rtol=0, atol=0, equal_nan=True)


def test_coupling_subnormal_results_round_or_flush_to_zero():
    """Results below 2^-126: rounded as torch rounds them, or ±0 where the CPU's AVX512-BF16
    conversion is used (it flushes subnormal inputs)."""
    x_b = torch.tensor([2.0 ** -130, -3 * 2.0 ** -131, 5 * 2.0 ** -133]).view(1, -1, 1, 1).to(BF16)
    shift = torch.tensor([2.0 ** -131, -2.0 ** -132, 2.0 ** -133]).view(1, -1, 1, 1).to(BF16)
    h = torch.cat([shift, torch.full_like(shift, 100.0)], dim=1)
    y_b, _ = coupling_ops.affine_coupling(x_b, h)
    rounded = (x_b.float() + shift.float()).to(BF16)
    assert torch.all((y_b == rounded) | (y_b == 0)), (y_b, rounded)
    assert torch.equal(torch.signbit(y_b), torch.signbit(rounded))


@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
def test_coupling_empty_tensors(x_dtype, h_dtype):
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4)):
        x_b, h = coupling_inputs(shape, x_dtype, h_dtype)
        x_b.requires_grad_()
        h.requires_grad_()
        y_b, logdet = coupling_ops.affine_coupling(x_b, h)
        assert y_b.shape == shape and y_b.dtype == x_dtype
        assert logdet.shape == (shape[0],) and logdet.dtype == torch.float32 and (logdet == 0).all()
        x_back = coupling_ops.affine_coupling_inverse(y_b, h)
        assert x_back.shape == shape and x_back.dtype == x_dtype
        grad_x, grad_h = torch.autograd.grad((y_b.sum() + logdet.sum()), (x_b, h))
        assert grad_x.dtype == x_dtype and grad_h.dtype == h_dtype and grad_h.shape == h.shape


def test_coupling_reads_channel_slices_of_bfloat16_h_in_place():
    """h as a channel slice of a wider bfloat16 tensor (any sample stride) gives the same result."""
    x_b, h = coupling_inputs((3, 4, 5, 6), torch.float32, BF16)
    wide = torch.cat([torch.randn(3, 2, 5, 6).to(BF16), h], dim=1)
    y_b, logdet = coupling_ops.affine_coupling(x_b, wide[:, 2:])
    y_ref, logdet_ref = coupling_ops.affine_coupling(x_b, h)
    assert_bitwise(y_b, y_ref, "y_b")
    assert_bitwise(logdet, logdet_ref, "logdet")


@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
def test_coupling_opcheck(x_dtype, h_dtype):
    x_b, h = coupling_inputs((2, 3, 4, 5), x_dtype, h_dtype)
    ops = torch.ops.glow_ext
    torch.library.opcheck(ops.affine_coupling.default, (x_b.requires_grad_(), h.requires_grad_()))
    torch.library.opcheck(ops.affine_coupling_inverse.default, (x_b, h))
    grad = torch.randn(x_b.shape).to(x_dtype)
    torch.library.opcheck(ops.affine_coupling_backward.default,
                          (grad, torch.randn(2), x_b.detach(), h.detach()))
    torch.library.opcheck(ops.affine_coupling_inverse_backward.default, (grad, x_b.detach(), h.detach()))


@pytest.mark.compile
@pytest.mark.parametrize("x_dtype, h_dtype", COUPLING_DTYPES)
def test_coupling_torch_compile_matches_eager(x_dtype, h_dtype):
    x_b, h = coupling_inputs((3, 4, 5, 5), x_dtype, h_dtype)

    def loss_fn(x_b, h):
        y_b, logdet = coupling_ops.affine_coupling(x_b, h)
        x_back = coupling_ops.affine_coupling_inverse(torch.tanh(y_b), h)
        return y_b.float().square().mean() - logdet.mean() + x_back.float().square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        xg, hg = x_b.clone().requires_grad_(), h.clone().requires_grad_()
        loss = fn(xg, hg)
        results.append((loss.detach(), *torch.autograd.grad(loss, (xg, hg))))
    # Inductor fuses the bfloat16 arithmetic around the ops (tanh, the sum of h's two gradients)
    # without eager's intermediate roundings: equal within those, a few bfloat16 ulps.
    for eager, traced in zip(*results):
        assert traced.dtype == eager.dtype
        assert_rel_close(traced, eager, 4 * BF16_TOL if x_dtype == BF16 else 1e-5, "compiled vs eager")


PAIR_REFUSED = "`h` has dtype \\S+ but `[xy]_b` has dtype \\S+; `h` must have the dtype of"
COUPLING_BAD_DTYPES = [
    pytest.param(BF16, torch.float32, PAIR_REFUSED, id="bfloat16-x-float32-h"),
    pytest.param(torch.float64, BF16, PAIR_REFUSED, id="float64-x-bfloat16-h"),
    pytest.param(BF16, torch.float16, PAIR_REFUSED, id="bfloat16-x-float16-h"),
    pytest.param(torch.float32, torch.float16, "dtype Half is supported on CUDA only",
                 id="float16-h-on-cpu"),
    pytest.param(torch.float16, torch.float16, "dtype Half is supported on CUDA only", id="float16-on-cpu"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("x_dtype, h_dtype, message", COUPLING_BAD_DTYPES)
def test_coupling_bad_dtype_pairs_raise_clear_errors(x_dtype, h_dtype, message, device):
    """The kernels and (on meta tensors, as torch.compile traces) the fake kernels refuse the same
    pairs; float16 is a CUDA dtype, which only the kernels know."""
    if device == "meta" and "CUDA only" in message:
        pytest.skip("the fake kernels see no device capabilities")
    x_b, h = coupling_inputs((2, 4, 3, 3), x_dtype, h_dtype)
    x_b, h = x_b.to(device), h.to(device)
    for call in (lambda: coupling_ops.affine_coupling(x_b, h),
                 lambda: coupling_ops.affine_coupling_inverse(x_b, h),
                 lambda: torch.ops.glow_ext.affine_coupling_inverse_backward(x_b, x_b, h)):
        with pytest.raises(RuntimeError, match=message):
            call()


def test_coupling_backward_grad_must_have_the_input_dtype():
    x_b, h = coupling_inputs((2, 4, 3, 3), torch.float32, BF16)
    with pytest.raises(RuntimeError, match="`grad_y_b` has dtype BFloat16 but `x_b` has dtype Float"):
        torch.ops.glow_ext.affine_coupling_backward(x_b.to(BF16), torch.randn(2), x_b, h)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("h_dtype", [torch.float16, BF16])
def test_coupling_cuda_float32_x_with_16_bit_h(h_dtype):
    """On CUDA too, float32 x_b with 16-bit h equals the float32 op on the widened h."""
    x_b, h = (t.cuda() for t in coupling_inputs((4, 6, 16, 16), torch.float32, h_dtype))
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    y32, logdet32 = coupling_ops.affine_coupling(x_b, h.float())
    assert_bitwise(y_b, y32, "y_b")
    torch.testing.assert_close(logdet, logdet32, rtol=1e-6, atol=0)  # the block reduction's order
    assert_bitwise(coupling_ops.affine_coupling_inverse(x_b, h),
                   coupling_ops.affine_coupling_inverse(x_b, h.float()), "x_b")
    grad, grad_logdet = torch.randn_like(x_b), torch.randn(4, device="cuda")
    grad_x, grad_h = torch.ops.glow_ext.affine_coupling_backward(grad, grad_logdet, x_b, h)
    grad_x32, grad_h32 = torch.ops.glow_ext.affine_coupling_backward(grad, grad_logdet, x_b, h.float())
    assert_bitwise(grad_x, grad_x32, "grad_x_b")
    assert_bitwise(grad_h, grad_h32.to(h_dtype), "grad_h")


# ----------------------------------------------------------------------------------------------
# the 1x1 op: bfloat16 x with float32 parameters, float32 maps, logdet and parameter gradients
# ----------------------------------------------------------------------------------------------

# The CPU's paths for an image: the direct channel mix (the one-sweep backward at C <= 32, the
# GEMM backward above), the factored path (C > 192, fewer pixels than C), the GEMM channel mix
# (C > 512), a sequence, and (N, C) feature vectors.
INVCONV_SHAPES = [
    pytest.param((4, 12, 8, 8), id="direct-C12"),
    pytest.param((2, 48, 5, 7), id="direct-C48-ragged"),
    pytest.param((2, 256, 3, 3), id="factored-C256"),
    pytest.param((1, 520, 24, 24), id="gemm-C520"),
    pytest.param((3, 5, 7), id="sequence"),
    pytest.param((6, 10), id="features"),
]


def invconv_inputs(shape, param_dtype=torch.float32):
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).to(BF16)
    return x, make_params(shape[1], dtype=param_dtype)


def assert_within_one_ulp(actual, expected32, what):
    """actual is one of the two bfloat16 neighbours of expected32: its rounding after float32
    arithmetic in another order (which may cross a rounding boundary)."""
    ulp = torch.exp2(torch.floor(torch.log2(expected32.abs())) - 7)
    assert actual.dtype == BF16 and ((actual.float() - expected32).abs() <= ulp).all(), what


@pytest.mark.parametrize("shape", INVCONV_SHAPES)
def test_invconv_forward_and_inverse_are_float32_rounded_once(shape):
    """Bit for bit where the bfloat16 op runs the float32 op's arithmetic; for (N, C) input the
    float32 op takes a GEMM and the bfloat16 op the channel-mix loop: within one ulp there."""
    x, params = invconv_inputs(shape)
    y, logdet = ops.actnorm_invconv_lu(x, *params)
    y32, logdet32 = ops.actnorm_invconv_lu(x.float(), *params)
    x_back = ops.actnorm_invconv_lu_inverse(x, *params)
    x_back32 = ops.actnorm_invconv_lu_inverse(x.float(), *params)
    assert y.is_contiguous() and logdet.dtype == torch.float32
    assert_bitwise(logdet, logdet32, "logdet")
    if len(shape) > 2:
        assert_bitwise(y, y32.to(BF16), "y")
        assert_bitwise(x_back, x_back32.to(BF16), "inverse")
    else:
        assert_within_one_ulp(y, y32, "y")
        assert_within_one_ulp(x_back, x_back32, "inverse")
    y_ref, logdet_ref = reference.actnorm_invconv_lu(x, *params)
    assert_rel_close(y, y_ref, BF16_TOL, "y vs reference")
    assert_rel_close(logdet, logdet_ref, 4e-6, "logdet vs reference")


def _invconv_grads(op, x, params, grad_outputs):
    leaves = [x.detach().requires_grad_()] + [
        p.detach().requires_grad_(name in DIFF_PARAM_NAMES) for name, p in zip(PARAM_NAMES, params)]
    outputs = op(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    names = ("x",) + tuple(name for name in PARAM_NAMES if name in DIFF_PARAM_NAMES)
    return dict(zip(names, torch.autograd.grad(
        outputs, [t for t in leaves if t.requires_grad], grad_outputs[:len(outputs)])))


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("shape", INVCONV_SHAPES)
def test_invconv_gradients_dtypes_and_values(shape, direction):
    """dL/dx in bfloat16 within one rounding of float32's, the parameter gradients float32. They
    are sums of products of bfloat16-exact values in float32 for the forward op; the inverse op's
    read its dL/dy output after the rounding, hence bfloat16's tolerance."""
    op = ops.actnorm_invconv_lu if direction == "forward" else ops.actnorm_invconv_lu_inverse
    x, params = invconv_inputs(shape)
    grad_outputs = [torch.randn(shape).to(BF16), torch.randn(())]
    grads = _invconv_grads(op, x, params, grad_outputs)
    grads32 = _invconv_grads(op, x.float(), params, [grad_outputs[0].float(), grad_outputs[1]])
    assert grads["x"].dtype == BF16
    assert_rel_close(grads["x"], grads32["x"], BF16_TOL, "grad x")
    for name in ("bias", "logs", "lower", "upper", "log_s"):
        assert grads[name].dtype == torch.float32, name
        assert_rel_close(grads[name], grads32[name], 1e-5 if direction == "forward" else BF16_TOL,
                         f"grad {name}")


def test_invconv_bfloat16_parameters():
    """bfloat16 parameters with bfloat16 x, as on CUDA: the maps and logdet are still float32."""
    shape = (3, 16, 6, 6)
    x, params = invconv_inputs(shape, BF16)
    params32 = cast_params(params, torch.float32)
    y, logdet = ops.actnorm_invconv_lu(x, *params)
    assert y.dtype == BF16 and logdet.dtype == torch.float32
    y32, logdet32 = ops.actnorm_invconv_lu(x.float(), *params32)
    assert_within_one_ulp(y, y32, "y")  # the map folded by ATen, not the float32 parameters' loops
    torch.testing.assert_close(logdet, logdet32, rtol=1e-6, atol=1e-5)
    assert_rel_close(ops.actnorm_invconv_lu_inverse(y, *params),
                     reference.actnorm_invconv_lu_inverse(y, *params32), BF16_TOL, "inverse")
    grads = _invconv_grads(ops.actnorm_invconv_lu, x, params, [torch.randn(shape).to(BF16), torch.randn(())])
    assert all(grads[name].dtype == BF16 for name in ("x", "bias", "logs", "lower", "upper", "log_s"))


def test_channel_map_is_float32_rounded_once():
    x = (torch.randn(3, 20, 9, 7) - 0.2).to(BF16)
    weight, offset = torch.randn(20, 20) / 5, torch.randn(20)
    y = ops.channel_map(x, weight, offset)
    assert_bitwise(y, ops.channel_map(x.float(), weight, offset).to(BF16), "y")


def test_invconv_empty_tensors():
    x, params = invconv_inputs((2, 6, 3, 3))
    for empty in (x[:0], x[:, :, :0]):
        y, logdet = ops.actnorm_invconv_lu(empty, *params)
        assert y.shape == empty.shape and y.dtype == BF16 and logdet.dtype == torch.float32
        assert ops.actnorm_invconv_lu_inverse(empty, *params).dtype == BF16
        assert ops.channel_map(empty, torch.eye(6), torch.zeros(6)).dtype == BF16
        grad_outputs = [torch.randn(empty.shape).to(BF16), torch.randn(())]
        grads = _invconv_grads(ops.actnorm_invconv_lu, empty, params, grad_outputs)
        assert grads["x"].dtype == BF16 and grads["x"].shape == empty.shape


@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (2, 200, 2, 2)], ids=["folded", "factored"])
def test_invconv_opcheck(shape):
    x, params = invconv_inputs(shape)
    differentiable = [x.requires_grad_()] + [
        p.requires_grad_(name in DIFF_PARAM_NAMES) for name, p in zip(PARAM_NAMES, params)]
    glow = torch.ops.glow_ext
    for op in (glow.actnorm_invconv_lu, glow.actnorm_invconv_lu_inverse, glow._actnorm_invconv_lu_train,
               glow._actnorm_invconv_lu_inverse_train):
        torch.library.opcheck(op.default, tuple(differentiable))
    plain = [t.detach() for t in differentiable]
    grad = torch.randn(shape).to(BF16)
    torch.library.opcheck(glow.actnorm_invconv_lu_backward.default, (grad, torch.randn(()), *plain))
    torch.library.opcheck(glow.actnorm_invconv_lu_inverse_backward.default, (grad, *plain))
    torch.library.opcheck(glow.channel_map.default,
                          (plain[0], torch.randn(shape[1], shape[1]), torch.randn(shape[1])))


@pytest.mark.compile
def test_invconv_torch_compile_matches_eager():
    x, params = invconv_inputs((3, 8, 5, 5))

    def loss_fn(x, *params):
        y, logdet = ops.actnorm_invconv_lu(x, *params)
        x_back = ops.actnorm_invconv_lu_inverse(torch.tanh(y), *params)
        return y.float().square().mean() - logdet + x_back.float().square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [x.clone().requires_grad_()] + [
            p.clone().requires_grad_(name in DIFF_PARAM_NAMES) for name, p in zip(PARAM_NAMES, params)]
        loss = fn(*leaves)
        results.append((loss.detach(), *torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])))
    for eager, traced in zip(*results):  # as for the coupling: inductor's fused bfloat16 tanh
        assert traced.dtype == eager.dtype
        assert_rel_close(traced, eager, 4 * BF16_TOL, "compiled vs eager")
