"""Shared fixtures and helpers of the glow_ext test suite.

Every test gets a fresh, deterministic random state (the autouse `_seed` fixture) and draws its own
non-zero inputs. `make_params` gives well-conditioned LU parameters: the LU factors of a random
rotation (as the layer initialises W), perturbed so that no entry is special.
"""
import os

import pytest
import torch

import glow_ext
from glow_ext import nn as glow_nn

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")

# Every device-parametrised test runs on "cpu" and, when a GPU is visible, on "cuda".
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]

# Parameter order of the ops after the image argument.
PARAM_NAMES = ("bias", "logs", "perm", "lower", "upper", "log_s", "sign_s")
# The differentiable ones (perm is an index, sign_s a constant ±1).
DIFF_PARAM_NAMES = ("bias", "logs", "lower", "upper", "log_s")


def pytest_configure(config):
    # Registered in pyproject.toml too; repeated here so the suite also runs from a bare checkout.
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: builds the extension from scratch")
    config.addinivalue_line("markers", "compile: runs torch.compile (cold compiles take minutes)")
    config.addinivalue_line("markers", "bigmem: allocates more than ~4 GiB")


@pytest.fixture(autouse=True)
def _seed():
    """A fixed seed per test, so a failure reproduces when the test is run on its own."""
    torch.manual_seed(0x610)
    if CUDA_AVAILABLE:
        torch.cuda.manual_seed_all(0x610)
    yield


@pytest.fixture
def no_tf32():
    """Reference layers' conv and matmul in true float32 on CUDA (TF32 would cost ~1e-3); our ops
    keep IEEE float32 by themselves."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def make_generator(seed=1234):
    return torch.Generator().manual_seed(seed)


def make_params(C, dtype=torch.float32, device="cpu", generator=None, factors="rotation"):
    """(bias, logs, perm, lower, upper, log_s, sign_s) for C channels, well conditioned.

    factors="rotation" (the default): the LU factors of a random rotation
    (glow_ext.nn.random_rotation_lu, as the layer initialises W), with the strict triangles
    perturbed by 0.3·randn/C and log_s by 0.1·randn. cond(W) stays below ~25 up to C = 512, but the
    triangular factors of a rotation have condition numbers of several hundred at C ≈ 256 (~1000 at
    C = 512), which is what limits the fp32 accuracy of triangular solves (see test_ops.inverse_tol).

    factors="near_identity": a random perm, strict triangles 0.3·randn/sqrt(C), log_s 0.1·randn and
    random signs: cond(L), cond(U') ≈ 2 at any C, so fp32 errors stay ~1e-6 up to C = 512.

    bias ~ randn and logs ~ 0.1·randn in both cases. Drawn in float64 on the CPU (so the values do
    not depend on dtype or device), then cast.
    """
    g = generator if generator is not None else make_generator()
    f64 = dict(dtype=torch.float64, generator=g)
    if factors == "rotation":
        perm, lower, upper, log_s, sign_s = glow_nn.random_rotation_lu(C, generator=g, dtype=torch.float64)
        lower = lower + 0.3 * torch.randn(C, C, **f64) / C
        upper = upper + 0.3 * torch.randn(C, C, **f64) / C
        log_s = log_s + 0.1 * torch.randn(C, **f64)
    elif factors == "near_identity":
        perm = torch.randperm(C, generator=g)
        lower = 0.3 * torch.randn(C, C, **f64) / C**0.5
        upper = 0.3 * torch.randn(C, C, **f64) / C**0.5
        log_s = 0.1 * torch.randn(C, **f64)
        sign_s = torch.where(torch.rand(C, **f64) < 0.5, -1.0, 1.0).to(torch.float64)
    else:
        raise ValueError(f"unknown factors {factors!r}")
    bias = torch.randn(C, **f64)
    logs = 0.1 * torch.randn(C, **f64)
    params = dict(bias=bias, logs=logs, perm=perm, lower=lower, upper=upper, log_s=log_s, sign_s=sign_s)
    return tuple(
        params[name].to(device=device, dtype=dtype) if name != "perm" else params[name].to(device)
        for name in PARAM_NAMES)


def make_input(shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0, shift=0.5):
    """Random non-zero input: scale·randn + shift, drawn in float64 on the CPU and cast."""
    g = generator if generator is not None else make_generator(4321)
    x = torch.randn(shape, dtype=torch.float64, generator=g) * scale + shift
    return x.to(device=device, dtype=dtype)


def cast_params(params, dtype=None, device=None):
    """The parameters with floating ones cast to dtype (perm stays int64)."""
    return tuple(
        p.to(device=device or p.device, dtype=(dtype or p.dtype) if p.is_floating_point() else p.dtype)
        for p in params)


def max_rel_error(actual, expected):
    """max |actual − expected| / max |expected| (in float64)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def assert_rel_close(actual, expected, tol, what=""):
    """max |actual − expected| ≤ tol · max |expected| (the max-relative criterion of the suite)."""
    err = max_rel_error(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.1e}"


def dense_weight64(perm, lower, upper, log_s, sign_s):
    """W = P·L·U' in float64 from explicit matrices, written independently of glow_ext.reference:
    P from one-hot rows (P[i, perm[i]] = 1), the masks from index comparisons."""
    C = perm.shape[0]
    perm = perm.to("cpu")
    lower, upper, log_s, sign_s = (t.detach().to("cpu", torch.float64) for t in (lower, upper, log_s, sign_s))
    rows = torch.arange(C).view(-1, 1)
    cols = torch.arange(C).view(1, -1)
    P = torch.nn.functional.one_hot(perm, C).to(torch.float64)
    L = torch.where(rows > cols, lower, torch.zeros_like(lower)) + torch.eye(C, dtype=torch.float64)
    U = torch.where(rows < cols, upper, torch.zeros_like(upper)) + torch.diag_embed(sign_s * torch.exp(log_s))
    return P @ L @ U


def dense_forward64(x, bias, logs, perm, lower, upper, log_s, sign_s):
    """(y, logdet) in float64 from the dense W; logdet from slogdet of the per-pixel Jacobian."""
    W = dense_weight64(perm, lower, upper, log_s, sign_s)
    x, bias, logs = (t.detach().to("cpu", torch.float64) for t in (x, bias, logs))
    x_hat = (x + bias.view(1, -1, 1, 1)) * torch.exp(logs).view(1, -1, 1, 1)
    y = torch.einsum("ij,njhw->nihw", W, x_hat)
    sign, logabsdet = torch.linalg.slogdet(W @ torch.diag_embed(torch.exp(logs)))
    return y, logabsdet * (x.shape[2] * x.shape[3])


def dense_inverse64(y, bias, logs, perm, lower, upper, log_s, sign_s):
    """x in float64 by a general dense solve with W (not the triangular solves of the op)."""
    W = dense_weight64(perm, lower, upper, log_s, sign_s)
    y, bias, logs = (t.detach().to("cpu", torch.float64) for t in (y, bias, logs))
    n, c, h, w = y.shape
    v = torch.linalg.solve(W, y.transpose(0, 1).reshape(c, -1))
    x_hat = v.view(c, n, h, w).transpose(0, 1)
    return x_hat * torch.exp(-logs).view(1, -1, 1, 1) - bias.view(1, -1, 1, 1)


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernels_available():
    return glow_ext.ops.kernels_available()
