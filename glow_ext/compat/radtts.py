"""Drop-in for the LU-parametrised invertible 1x1 convolution of NVIDIA/radtts (`common.py`).

- `Invertible1x1ConvLUS(c, cache_inverse=False)`: params `lower` (c, c), `upper_diag` (c,),
  `upper` (c, c); buffers `p` (c, c), `lower_diag` (c,). `forward(z, inverse=False)` with z
  (B, c, T): `(W·z, Σ log|upper_diag|)` forward (the log-determinant unscaled by T, as the
  original), W⁻¹·z inverse. Runs on the fused `glow_ext.ops` kernels.
"""
import torch
from torch import nn

from .. import ops, reference
from ..cache_invalidation import CachesDerivedTensors, cache_filled, cache_key
from . import _Memo, _permutation_of

__all__ = ["Invertible1x1ConvLUS"]


class Invertible1x1ConvLUS(CachesDerivedTensors, nn.Module):
    """W = p·(tril(lower, −1) + diag(lower_diag))·(triu(upper, 1) + diag(upper_diag)) applied per
    time step; forward returns (W·z, Σ log|upper_diag|), inverse W⁻¹·z. Initialised as the
    original: the LU factors of a random rotation with det > 0; lower_diag = ones.

    On the fused op (`actnorm_invconv_lu` with an identity ActNorm, z viewed as (B, c, T, 1)):
    perm = p.argmax(dim=1), log_s = log|upper_diag|, sign_s = sign(upper_diag), `lower` and
    `upper` as they are (the op reads only their strict triangles, as the original's tril / triu
    do). No W is assembled. `lower_diag` is all ones in the original (it never changes: a buffer);
    a checkpoint with another diagonal D is folded in exactly, L·U = (I + S·D⁻¹)·(D·U), i.e. the
    strict lower part's columns divided by D and U's rows times D. The buffers are checked once per
    change (one host synchronisation); `p` must be a permutation matrix.

    inverse: with autograd on (grad mode and z or a parameter requiring grad) the op's
    differentiable inverse (triangular solves) every call; otherwise W⁻¹ is computed once per
    change of the parameters (glow_ext.cache_invalidation) and applied by `ops.channel_map`. The
    original recomputes W⁻¹ every call, or with cache_inverse=True keeps the first one forever
    (stale after a training step); here the inverse is always current, so `cache_inverse` changes
    only speed, never results.

    Log-determinant: Σ log|upper_diag|, the original's formula (it leaves out log|lower_diag|,
    which is 0 for the ones it is built with). The original disables autocast; the fused op is
    not autocast-sensitive and runs in z's dtype.
    """

    _cache_attributes = ("_inverse_cache",)

    def __init__(self, c, cache_inverse=False):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(c, c))[0]
        if torch.det(rotation) < 0:
            rotation[:, 0] = -rotation[:, 0]
        p, lower, upper = torch.linalg.lu(rotation)
        # Registration order as in the original, so state_dict() lists the keys in its order.
        self.register_buffer("p", p)
        self.register_buffer("lower_diag", torch.ones(c))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper_diag = nn.Parameter(torch.diagonal(upper).clone())
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.cache_inverse = cache_inverse
        self._buffers_memo = _Memo()
        self._inverse_cache = None

    def _perm_and_unit_diag(self):
        """(perm, whether lower_diag is all ones), recomputed only when the buffers change."""
        return self._buffers_memo.get((self.p, self.lower_diag), self._check_buffers)

    def _check_buffers(self):
        perm = _permutation_of(self.p)
        if perm is None:
            raise ValueError("Invertible1x1ConvLUS: buffer `p` is not a permutation matrix")
        return perm, bool(torch.all(self.lower_diag == 1))

    def _op_args(self):
        """The fused op's (bias, logs, perm, lower, upper, log_s, sign_s) and Σ log|upper_diag|."""
        perm, unit_diag = self._perm_and_unit_diag()
        log_abs_upper_diag = torch.log(torch.abs(self.upper_diag))
        lower, upper, log_s, diagonal = self.lower, self.upper, log_abs_upper_diag, self.upper_diag
        if not unit_diag:
            lower_diag = self.lower_diag
            lower = lower / lower_diag.view(1, -1)
            upper = upper * lower_diag.view(-1, 1)
            diagonal = diagonal * lower_diag
            log_s = torch.log(torch.abs(diagonal))
        identity = log_s.new_zeros(log_s.shape[0])
        args = (identity, identity, perm, lower, upper, log_s, torch.sign(diagonal).detach())
        return args, log_abs_upper_diag.sum()

    def forward(self, z, inverse=False):
        z4 = z.unsqueeze(3)
        if not inverse:
            args, logdet = self._op_args()
            return ops.actnorm_invconv_lu(z4, *args)[0].squeeze(3), logdet
        params = (self.lower, self.upper_diag, self.upper)
        needs_autograd = torch.is_grad_enabled() and (
            z.requires_grad or any(t.requires_grad for t in params))
        if needs_autograd or torch.compiler.is_compiling():
            return ops.actnorm_invconv_lu_inverse(z4, *self._op_args()[0]).squeeze(3)
        return ops.channel_map(z4, *self.inverse_map(reference.accumulation_dtype(z))).squeeze(3)

    @torch.no_grad()
    def inverse_map(self, dtype=torch.float32):
        """(W⁻¹ (c, c), zero offset (c,)) in dtype, for `ops.channel_map`; computed in float64
        and cached until a parameter or buffer changes."""
        sources = (self.p, self.lower_diag, self.lower, self.upper_diag, self.upper)
        key = (dtype, cache_key(sources))
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            _, _, perm, lower, upper, log_s, sign_s = self._op_args()[0]
            weight = reference.lu_weight(perm, lower, upper, log_s, sign_s, torch.float64)
            self._inverse_cache = (key, torch.linalg.inv(weight).to(dtype),
                                   weight.new_zeros(weight.shape[0], dtype=dtype))
            cache_filled()
        return self._inverse_cache[1:]

    def extra_repr(self):
        return f"{self.p.shape[0]}, cache_inverse={self.cache_inverse}"
