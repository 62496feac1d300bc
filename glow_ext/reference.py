"""Pure-PyTorch reference of every glow_ext op.

The tests' oracle, the benchmarks' baseline and the fallback when the compiled kernels are missing.
Same signatures, dtypes and conventions as `glow_ext.ops`; differentiable through plain autograd.
"""
import math

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lu_factors(lower, upper, log_s, sign_s, dtype=None):
    """(L, U') with L = I + strict_lower(lower) and U' = strict_upper(upper) + diag(sign_s·exp(log_s))."""
    dtype = dtype or lower.dtype
    eye = torch.eye(lower.shape[0], dtype=dtype, device=lower.device)
    unit_lower = torch.tril(lower.to(dtype), -1) + eye
    upper_factor = torch.triu(upper.to(dtype), 1) + torch.diag(sign_s.to(dtype) * log_s.to(dtype).exp())
    return unit_lower, upper_factor


def lu_weight(perm, lower, upper, log_s, sign_s, dtype=None):
    """W = P·L·U' with (P·v)[i] = v[perm[i]]."""
    unit_lower, upper_factor = lu_factors(lower, upper, log_s, sign_s, dtype)
    return (unit_lower @ upper_factor)[perm]


def logdet_dtype(param):
    """The 1x1 op's log-determinant dtype: float64 for float64 parameters, else float32 (a float16
    sum of H·W·C terms would overflow)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def lu_logdet(logs, log_s, *spatial_sizes):
    """M·(Σ logs + Σ log_s), M = the product of the spatial sizes (1 when none are given)."""
    acc = logdet_dtype(logs)
    return (logs.sum(dtype=acc) + log_s.sum(dtype=acc)) * math.prod(spatial_sizes)


def _per_channel(v, x):
    """A (C,) vector shaped to broadcast against an (N, C, *spatial) x."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def actnorm_invconv_lu(x, bias, logs, perm, lower, upper, log_s, sign_s):
    """y = W·((x + bias)·exp(logs)) at every position of an (N, C, *spatial) x; logdet =
    M·(Σ logs + Σ log_s), 0-dim, M = the product of the spatial sizes (1 for (N, C))."""
    acc = accumulation_dtype(x)
    weight = lu_weight(perm, lower, upper, log_s, sign_s, acc)
    x_hat = (x.to(acc) + _per_channel(bias.to(acc), x)) * _per_channel(logs.to(acc).exp(), x)
    y = torch.einsum("ij,nj...->ni...", weight, x_hat)
    return y.to(x.dtype), lu_logdet(logs, log_s, *x.shape[2:])


def actnorm_invconv_lu_inverse(y, bias, logs, perm, lower, upper, log_s, sign_s):
    """x = (W⁻¹·y)·exp(−logs) − bias, with W⁻¹ = U'⁻¹·L⁻¹·Pᵀ applied as two triangular solves."""
    acc = accumulation_dtype(y)
    c = y.shape[1]
    unit_lower, upper_factor = lu_factors(lower, upper, log_s, sign_s, acc)
    inverse_perm = torch.empty_like(perm)
    inverse_perm[perm] = torch.arange(c, device=perm.device)
    v = y.to(acc).transpose(0, 1).reshape(c, -1)[inverse_perm]
    v = torch.linalg.solve_triangular(unit_lower, v, upper=False, unitriangular=True)
    v = torch.linalg.solve_triangular(upper_factor, v, upper=True)
    x = v * (-logs.to(acc)).exp().unsqueeze(1) - bias.to(acc).unsqueeze(1)
    return x.view(c, y.shape[0], *y.shape[2:]).transpose(0, 1).contiguous().to(y.dtype)


def channel_map(x, weight, offset):
    """y = weight·x + offset at every position; weight (C, C), offset (C,) in x's accumulation dtype."""
    acc = accumulation_dtype(x)
    y = torch.einsum("ij,nj...->ni...", weight.to(acc), x.to(acc)) + _per_channel(offset.to(acc), x)
    return y.to(x.dtype)


def affine_coupling(x_b, h):
    """(y_b, logdet): shift, logit = h[:, :C], h[:, C:]; y_b = (x_b + shift)·sigmoid(logit + 2),
    logdet (N,) = Σ log sigmoid(logit + 2) in x_b's accumulation dtype (h may be narrower: a
    float16/bfloat16 h with float32 x_b, as the kernels accept)."""
    acc = accumulation_dtype(x_b)
    c = x_b.shape[1]
    log_scale = torch.nn.functional.logsigmoid(h[:, c:].to(acc) + 2.0)
    y_b = (x_b.to(acc) + h[:, :c].to(acc)) * log_scale.exp()
    return y_b.to(x_b.dtype), log_scale.flatten(1).sum(1)


def affine_coupling_inverse(y_b, h):
    """x_b = y_b / sigmoid(logit + 2) - shift."""
    acc = accumulation_dtype(y_b)
    c = y_b.shape[1]
    log_scale = torch.nn.functional.logsigmoid(h[:, c:].to(acc) + 2.0)
    return (y_b.to(acc) * (-log_scale).exp() - h[:, :c].to(acc)).to(y_b.dtype)
