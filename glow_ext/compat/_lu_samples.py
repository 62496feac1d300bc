"""An LU-parametrised W applied to a batch of feature vectors (N, C): nflows' LULinear and
normflows' InvertibleAffine.

With one position per sample the whole pass is one GEMM over the batch, and at tabular sizes
(C = 8 ... 64) fixed costs outweigh it: the fused op's argument checks and identity ActNorm, and
for normflows' z @ W a gather of the input to move Pᵀ first. Here W = P·L·U' is assembled per call
(one C x C product, P a row gather of it) and applied in one GEMM, and the backward is the chain
rule written out in the same autograd node: no further nodes for the factors, the scale exp(log_s)
or the log-determinant.
"""
import torch
from torch.autograd.function import once_differentiable

__all__ = ["lu_sample_map"]


class _LUSampleMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lower, upper, log_s, sign_s, perm, inverse_perm, bias, transposed):
        scale = torch.exp(log_s) if sign_s is None else sign_s * torch.exp(log_s)
        upper_factor = upper.triu(1)
        upper_factor.diagonal().copy_(scale)
        strict_lower = lower.tril(-1)
        # (I + strict_lower)·U' = U' + strict_lower·U', then P·(...) as a row gather.
        weight = torch.addmm(upper_factor, strict_lower, upper_factor)
        if perm is not None:
            weight = weight.index_select(0, perm)
        matrix = weight if transposed else weight.T  # per sample Wᵀ or W: x @ matrix
        y = torch.mm(x, matrix) if bias is None else torch.addmm(bias, x, matrix)
        ctx.save_for_backward(x, strict_lower, upper_factor, scale, inverse_perm, matrix)
        ctx.transposed = transposed
        return y, log_s.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        x, strict_lower, upper_factor, scale, inverse_perm, matrix = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = torch.mm(grad_y, matrix.T) if needs[0] else None
        grad_lower = grad_upper = grad_log_s = None
        if any(needs[1:4]):
            grad_matrix = torch.mm(x.T, grad_y)
            grad_weight = grad_matrix if ctx.transposed else grad_matrix.T
            if inverse_perm is not None:
                grad_weight = grad_weight.index_select(0, inverse_perm)  # Pᵀ·dL/dW
            # With V = Pᵀ·W = (I + strict_lower)·U': dL/dU' = dL/dV + strict_lowerᵀ·dL/dV and
            # dL/d strict_lower = dL/dV·U'ᵀ, each on the triangle it is read from.
            grad_upper_factor = torch.addmm(grad_weight, strict_lower.T, grad_weight)
            grad_upper = grad_upper_factor.triu(1)
            grad_log_s = torch.addcmul(grad_logdet, grad_upper_factor.diagonal(), scale)
            grad_lower = torch.mm(grad_weight, upper_factor.T).tril_(-1)
        grad_bias = grad_y.sum(0) if needs[7] else None
        return grad_x, grad_lower, grad_upper, grad_log_s, None, None, None, grad_bias, None


def lu_sample_map(x, lower, upper, log_s, sign_s=None, perm=None, inverse_perm=None, bias=None,
                  transposed=False):
    """(x·Wᵀ + bias, Σ log_s): W applied per sample of x (N, C), or x·W + bias when `transposed`,
    with W = P·(I + strict_lower(lower))·(strict_upper(upper) + diag(sign_s·exp(log_s))),
    P[i, j] = 1 iff j == perm[i] (identity when perm is None; inverse_perm = argsort(perm)) and
    sign_s all ones when None. Differentiable in x, lower, upper, log_s and bias; only the strict
    triangles of lower and upper are read."""
    return _LUSampleMap.apply(x, lower, upper, log_s, sign_s, perm, inverse_perm, bias, transposed)
