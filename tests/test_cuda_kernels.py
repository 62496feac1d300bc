"""The CUDA kernels' launch logic, precision rules and input checks.

Host tests (they run everywhere with the compiled kernels): the direct channel mix's grid — the
launch shape csrc/cuda_launch_plan.h chooses, run block by block and thread by thread on the CPU with
the kernel's own shared-memory fill and per-pixel loop — and the grid cap the GPU tests lower.
GPU tests (skipped without one): the grid-stride loops reached through a lowered cap, C = 63/64/65
(the direct kernel's edge) in every dtype, float32 maps for half/bf16 input, TF32 left off by our
ops, a float32 log-determinant for float16 parameters, and the device-side check of `perm`.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from glow_ext import coupling_ops, ops, reference

from conftest import (
    DEVICES,
    assert_rel_close,
    cast_params,
    make_generator,
    make_input,
    make_params,
    requires_cuda,
)

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason="needs the compiled kernels")
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]


def _map(C, dtype, seed=0):
    g = make_generator(seed)
    weight = torch.randn(C, C, dtype=torch.float64, generator=g) / C**0.5 + torch.eye(C, dtype=torch.float64)
    offset = torch.randn(C, dtype=torch.float64, generator=g)
    return weight.to(dtype), offset.to(dtype)


@pytest.fixture
def grid_cap():
    """Sets the kernels' grid cap for one test and restores it afterwards."""
    previous = []

    def set_cap(blocks):
        previous.append(torch.ops.glow_ext._set_max_grid_blocks(blocks))

    yield set_cap
    if previous:
        torch.ops.glow_ext._set_max_grid_blocks(previous[0])


# ----------------------------------------------------------------------------------------------
# On the host: the direct channel mix's grid, and the grid cap
# ----------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape, multiprocessors, max_blocks", [
    ((2, 5, 3, 3), 1, 16384),        # one block, one row group, a row tail (5 = 4 + 1)
    ((1, 64, 4, 4), 132, 16384),     # a deep level: 16 pixels, output rows split into 16 groups
    ((3, 63, 5, 7), 132, 16384),     # groups whose last one is short (63 rows)
    ((4, 12, 33, 17), 2, 3),         # pixels > 3 blocks · 256 threads: the grid-stride loop
    ((2, 65, 2, 2), 132, 4),         # row groups limited by the cap
    ((1, 1, 1, 1), 132, 16384),      # C = 1
])
def test_channel_mix_grid_on_the_host(shape, multiprocessors, max_blocks, dtype):
    """Every output written exactly once and right, whatever split the launch plan picks."""
    x = make_input(shape, dtype=dtype)
    weight, offset = _map(shape[1], dtype)
    y = torch.ops.glow_ext._channel_mix_grid_on_host(x, weight, offset, multiprocessors, max_blocks)
    assert not y.isnan().any(), "an output the grid never wrote"
    expected = torch.einsum("ij,njhw->nihw", weight.double(), x.double()) + offset.double().view(1, -1, 1, 1)
    assert_rel_close(y, expected, 1e-12 if dtype == torch.float64 else 2e-6)


@needs_kernels
def test_grid_cap_is_set_and_restored():
    previous = torch.ops.glow_ext._set_max_grid_blocks(7)
    try:
        assert torch.ops.glow_ext._set_max_grid_blocks(9) == 7
    finally:
        assert torch.ops.glow_ext._set_max_grid_blocks(previous) == 9
    assert previous == 1 << 14
    with pytest.raises(RuntimeError, match="the cap must be at least 1, got 0"):
        torch.ops.glow_ext._set_max_grid_blocks(0)


@needs_kernels
@pytest.mark.parametrize("with_folded", [True, False], ids=["folded", "terms"])
@pytest.mark.parametrize("C", [1, 5, 33, 64])
def test_chain_rule_phases_on_the_host(C, with_folded):
    """The CUDA one-block chain rule's phases (glow_ext_math.h), run on the host, against autograd
    through the reference's Wf = W·diag(exp(logs)) and c = Wf·bias."""
    params = make_params(C, dtype=torch.float64, generator=make_generator(C))
    bias, logs, perm, lower, upper, log_s, sign_s = params
    g = make_generator(C + 1)
    grad_folded = torch.randn(C, C, dtype=torch.float64, generator=g)
    grad_offset = torch.randn(C, dtype=torch.float64, generator=g)
    grad_logdet_hw = torch.tensor(0.7, dtype=torch.float64)

    leaves = [t.clone().requires_grad_() for t in (bias, logs, lower, upper, log_s)]
    b, lg, lo, up, ls = leaves
    folded = reference.lu_weight(perm, lo, up, ls, sign_s) * lg.exp().unsqueeze(0)
    offset = folded @ b
    loss = (grad_folded * folded).sum() + (grad_offset * offset).sum() + grad_logdet_hw * (lg.sum() + ls.sum())
    expected = torch.autograd.grad(loss, leaves)
    expected = (*expected[:2], expected[2].tril(-1), expected[3].triu(1), expected[4])

    wf = folded.detach()
    terms = (None, None) if with_folded else (wf.t() @ grad_offset, (grad_folded * wf).sum(0))
    got = torch.ops.glow_ext._chain_on_host(
        grad_folded, grad_offset, wf if with_folded else None, *terms, grad_logdet_hw, *params)
    for name, a, e in zip(("bias", "logs", "lower", "upper", "log_s"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_reference_logdet_accumulates_in_float32(param_dtype):
    """The oracle's rule the kernels follow: float32 (float64 for float64 parameters), no overflow."""
    C, H, W = 4, 128, 128
    logs = torch.full((C,), 1.5).to(param_dtype)
    log_s = torch.full((C,), 0.25).to(param_dtype)
    logdet = reference.lu_logdet(logs, log_s, H, W)
    assert logdet.dtype == (torch.float64 if param_dtype == torch.float64 else torch.float32)
    assert logdet.item() == pytest.approx(H * W * C * 1.75)  # 114688: past float16's 65504


# ----------------------------------------------------------------------------------------------
# On the GPU
# ----------------------------------------------------------------------------------------------

def _params_for(C, dtype, device):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return make_params(C, dtype=param_dtype, device=device, generator=make_generator(C))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("C", [63, 64, 65])
def test_direct_kernel_edge(C, dtype, device):
    """C = 64 is the last C of the direct CUDA kernels (fold and channel mix); 63 and 65 on either
    side. Forward, inverse and gradients against the float64 reference, in every dtype."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 needs CUDA")
    params = _params_for(C, dtype, device)
    x = make_input((3, C, 5, 6), dtype=torch.float64, device=device).to(dtype)
    ref_params = cast_params(params, torch.float64)
    tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]

    y, logdet = ops.actnorm_invconv_lu(x, *params)
    y_ref, logdet_ref = reference.actnorm_invconv_lu(x.double(), *ref_params)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, tol, "y")
    torch.testing.assert_close(logdet.double(), logdet_ref, rtol=1e-6, atol=1e-6)
    assert_rel_close(ops.actnorm_invconv_lu_inverse(y, *params),
                     reference.actnorm_invconv_lu_inverse(y.double(), *ref_params), 2 * tol, "inverse")

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and i not in (0, 7))
              for i, t in enumerate((x, *params))]
    ref_leaves = [t.detach().double().requires_grad_() if t.is_floating_point() and i not in (0, 7) else t
                  for i, t in enumerate((x.double(), *ref_params))]
    ref_leaves[0] = x.double().requires_grad_()
    leaves[0].requires_grad_()
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=device)
    for fn, inputs in ((ops.actnorm_invconv_lu, leaves), (reference.actnorm_invconv_lu, ref_leaves)):
        out, out_logdet = fn(*inputs)
        ((out.double() * grad_y).sum() + 0.5 * out_logdet.double()).backward()
    for got, expected in zip(leaves, ref_leaves):
        if got.grad is not None:
            assert_rel_close(got.grad, expected.grad, 4 * tol, "gradient")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("C", [12, 64])
def test_cuda_channel_mix_grid_stride_loop(C, grid_cap):
    """With the grid capped at 2 blocks, each thread loops over many pixels and row groups are few."""
    grid_cap(2)
    params = _params_for(C, torch.float32, "cuda")
    x = make_input((5, C, 17, 19), device="cuda")  # 1615 pixels: 7 blocks' worth
    y, _ = ops.actnorm_invconv_lu(x, *params)
    assert_rel_close(y, reference.actnorm_invconv_lu(x, *params)[0], 2e-5, "y")
    assert_rel_close(ops.actnorm_invconv_lu_inverse(y, *params), x, 2e-5, "round trip")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_coupling_beyond_the_grid_cap(dtype, grid_cap):
    """The coupling kernels with more tasks than blocks: the forward's per-sample slices and the
    element-wise passes loop (the path inputs beyond 16384 blocks take)."""
    grid_cap(3)
    g = make_generator(5)
    x_b = (torch.randn(9, 6, 20, 20, generator=g)).to("cuda", dtype)
    h = (0.5 * torch.randn(9, 12, 20, 20, generator=g)).to("cuda", dtype)
    y_b, logdet = coupling_ops.affine_coupling(x_b, h)
    y_ref, logdet_ref = reference.affine_coupling(x_b.double(), h.double())
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert_rel_close(y_b, y_ref, tol, "y_b")
    assert_rel_close(logdet, logdet_ref, tol, "logdet")
    assert_rel_close(coupling_ops.affine_coupling_inverse(y_b, h), x_b.double(), 2 * tol, "inverse")
    leaves = [t.detach().clone().requires_grad_() for t in (x_b, h)]
    out, out_logdet = coupling_ops.affine_coupling(*leaves)
    (out.float().square().sum() + out_logdet.sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x_b, h)]
    out, out_logdet = reference.affine_coupling(*ref_leaves)
    (out.square().sum() + out_logdet.sum()).backward()
    for got, expected in zip(leaves, ref_leaves):
        assert_rel_close(got.grad, expected.grad, 4 * tol, "gradient")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("C", [12, 64, 65, 96, 257])
def test_cuda_reduced_precision_maps_stay_float32(C, dtype):
    """For half/bf16 activations the map is applied in float32 at every C, so y is the float32
    result rounded once: at most a few elements differ (float32 sums in another order, near a
    rounding tie), by one unit in the last place. A map rounded to the activation dtype (the
    precision cliff past C = 64 that this guards against) changes a large fraction of them."""
    params = _params_for(C, torch.float32, "cuda")
    x = make_input((4, C, 6, 6), device="cuda").to(dtype)
    y, _ = ops.actnorm_invconv_lu(x, *params)
    expected = reference.actnorm_invconv_lu(x.float(), *params)[0].to(dtype)
    differ = y != expected
    assert differ.float().mean().item() <= 0.01
    # One unit in the last place, plus the float32 sums' own error where y cancels to near zero.
    expected = expected.float()
    ulp = torch.finfo(dtype).eps * expected.abs()
    assert ((y.float() - expected).abs() <= 2 * ulp + 1e-5 * expected.abs().max()).all()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("C", [12, 96, 257])
def test_cuda_exact_with_tf32_enabled(C):
    """A training script's torch.backends.cuda.matmul.allow_tf32 = True leaves our ops in IEEE
    float32: the round trip stays at float32 accuracy, where TF32 GEMMs give ~1e-3."""
    params = _params_for(C, torch.float32, "cuda")
    x = make_input((2, C, 8, 8), device="cuda")
    a = torch.randn(512, 512, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32_error = ((a @ a).double() - a.double() @ a.double()).abs().max().item()
        y, _ = ops.actnorm_invconv_lu(x, *params)
        x_back = ops.actnorm_invconv_lu_inverse(y, *params)
        y_ref = reference.actnorm_invconv_lu(x.double(), *cast_params(params, torch.float64))[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    if tf32_error < 1e-3:
        pytest.skip("this GPU does not run float32 matmuls in TF32, so the flag cannot matter")
    assert_rel_close(y, y_ref, 2e-5, "y")
    assert_rel_close(x_back, x, 2e-5, "round trip")


def _set_reduced_cpu_matmuls(mode):
    """torch's CPU switch for reduced-precision float32 matmuls (oneDNN bf16); returns a restorer."""
    if hasattr(torch.backends.mkldnn, "matmul") and hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        previous = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = mode
        return lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", previous)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium" if mode == "bf16" else "highest")
    return lambda: torch.set_float32_matmul_precision(previous)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 300, 8, 8), (1, 512, 4, 4)], ids=["generic-fold", "factored"])
def test_exact_under_reduced_precision_matmul_flags_on_cpu(shape):
    """The host counterpart of TF32: with oneDNN's bf16 float32 matmuls switched on, our ops' GEMMs
    (generic fold and chain rule past C = 256, the factored path) stay IEEE float32, and the user's
    setting is back in force after the call."""
    C = shape[1]
    params = make_params(C)
    x = make_input(shape)
    ref = reference.actnorm_invconv_lu(x.double(), *cast_params(params, torch.float64))[0]
    a = torch.randn(256, 256)
    restore = _set_reduced_cpu_matmuls("bf16")
    try:
        reduced_error = ((a @ a).double() - a.double() @ a.double()).abs().max().item()
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in (x, *params)]
        leaves[7].requires_grad_(False)  # sign_s
        y, logdet = ops.actnorm_invconv_lu(*leaves)
        x_back = ops.actnorm_invconv_lu_inverse(y.detach(), *params)
        (y.square().sum() + logdet).backward()
        after_error = ((a @ a).double() - a.double() @ a.double()).abs().max().item()
    finally:
        restore()
    if reduced_error < 1e-2:
        pytest.skip("this CPU has no reduced-precision float32 matmuls, so the flag cannot matter")
    assert after_error == reduced_error, "the user's matmul precision was not restored"
    assert_rel_close(y, ref, 2e-5, "y")
    assert_rel_close(x_back, x, 1e-4, "round trip")
    ref_leaves = [t.double().requires_grad_() if t.is_floating_point() else t for t in (x, *params)]
    ref_leaves[7].requires_grad_(False)
    y_ref, logdet_ref = reference.actnorm_invconv_lu(*ref_leaves)
    (y_ref.square().sum() + logdet_ref).backward()
    for got, expected in zip(leaves, ref_leaves):
        if got.grad is not None:
            assert_rel_close(got.grad, expected.grad, 1e-4, "gradient")


@requires_cuda
@pytest.mark.cuda
def test_cuda_float16_parameters_logdet_in_float32():
    """float16 parameters: H·W·Σ(logs + log_s) = 114688 here, past float16's 65504."""
    C = 4
    params = list(make_params(C, dtype=torch.float16, device="cuda"))
    params[1] = torch.full((C,), 1.5, dtype=torch.float16, device="cuda")  # logs
    params[5] = torch.full((C,), 0.25, dtype=torch.float16, device="cuda")  # log_s
    x = make_input((1, C, 128, 128), device="cuda").half()
    _, logdet = ops.actnorm_invconv_lu(x, *params)
    assert logdet.dtype == torch.float32
    assert logdet.item() == pytest.approx(128 * 128 * C * 1.75)


_BAD_PERM_SCRIPT = textwrap.dedent("""
    import sys, torch, glow_ext
    sys.path.insert(0, {tests!r})
    from conftest import make_params, make_input
    C = {C}
    params = list(make_params(C, device="cuda"))
    perm = params[2].clone()
    {corrupt}
    params[2] = perm
    x = make_input((2, C, 3, 3), device="cuda")
    try:
        glow_ext.ops.actnorm_invconv_lu(x, *params)
        torch.cuda.synchronize()
    except RuntimeError as error:
        print("RAISED", error)
        sys.exit(3)
    print("NO ERROR")
""")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("C, corrupt, message", [
    (12, "perm[1] = C", "out of range"),        # the one-block fold would read past `lower`
    (64, "perm[1] = perm[0]", "repeats an entry"),
    (65, "perm[1] = -1", "out of range"),       # the generic fold (index_select)
    (300, "perm[1] = perm[0]", "repeats an entry"),
], ids=["C12-too-large", "C64-repeated", "C65-negative", "C300-repeated"])
def test_cuda_bad_permutation_stops_with_a_device_assert(C, corrupt, message):
    """A device-side assert leaves the CUDA context unusable, so each case runs in its own process
    (a few seconds each: a CUDA context per case)."""
    from pathlib import Path

    script = _BAD_PERM_SCRIPT.format(tests=str(Path(__file__).parent), C=C, corrupt=corrupt)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 3 and "RAISED" in output, output[-3000:]
    assert "device-side assert" in output
    assert f"glow_ext: perm" in output and message in output, output[-3000:]
