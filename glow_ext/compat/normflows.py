"""Drop-ins for the invertible linear flows of normflows (`normflows.flows.mixing`).

Same constructors, `forward(z)` / `inverse(z)` contracts and `state_dict` keys, dtypes and shapes,
so a normflows checkpoint loads with `load_state_dict(..., strict=True)` (and ours into normflows):

- `Invertible1x1Conv(num_channels, use_lu=False)` on (N, C, H, W): a per-pixel W.
- `InvertibleAffine(num_channels, use_lu=True)` on (N, C): z @ W, i.e. Wᵀ per sample.

State: dense, param `W` (C, C), a random rotation; LU, params `L`, `log_S`, `U`, buffers `P`,
`sign_S`, `eye`, with W = P @ (tril(L, -1) + eye) @ (triu(U, 1) + diag(sign_S·exp(log_S))).

normflows names the directions from the base distribution: `forward` is the sampling direction
and applies W⁻¹, `inverse` is the density direction and applies W. Both return (output, log_det)
with log_det a 0-dim tensor (the same for every sample), as in normflows: ±H·W·log|det W|.
"""
import torch
from torch import nn

from .. import ops, reference
from ..cache_invalidation import CachesDerivedTensors, cache_filled, cache_key
from . import _Memo, _permutation_of
from ._lu_samples import lu_sample_map

__all__ = ["Invertible1x1Conv", "InvertibleAffine"]


class _CachedLogAbsDet(torch.autograd.Function):
    """log|det W| from its cached value; backward g·W⁻ᵀ (the derivative of log|det W|) from the
    cached inverse. No factorisation per call."""

    @staticmethod
    def forward(ctx, weight, logabsdet64, inverse64):
        ctx.save_for_backward(inverse64)
        return logabsdet64.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inverse64,) = ctx.saved_tensors
        return (grad.to(torch.float64) * inverse64.T).to(grad.dtype), None, None


class _CachedInverse(torch.autograd.Function):
    """W⁻¹ from its cached float64 value, cast to W's dtype; backward −W⁻ᵀ·G·W⁻ᵀ (d(W⁻¹) =
    −W⁻¹·dW·W⁻¹), two matrix products in float64 instead of an inversion per call."""

    @staticmethod
    def forward(ctx, weight, inverse64):
        ctx.save_for_backward(inverse64)
        return inverse64.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inverse64,) = ctx.saved_tensors
        inverse_t = inverse64.T
        return (-(inverse_t @ grad.to(torch.float64) @ inverse_t)).to(grad.dtype), None


class _InvertibleLinearFlow(CachesDerivedTensors, nn.Module):
    """What the two normflows layers share: state, the cached inverse and the LU checks.

    Subclasses say how W acts on their input: `_transposed` is True where normflows computes
    z @ W (per sample Wᵀ·z) rather than a 1x1 convolution with W (per pixel W·z).

    Dense W: the density direction applies W itself (one `glow_ext.ops.channel_map` pass per
    image; z @ W for InvertibleAffine), whose autograd gives W's gradient. W⁻¹ and log|det W| are
    computed in float64 (inv and slogdet) once per change of W, not per call, and enter autograd
    through functions whose backward is the exact derivative written out from that cached inverse:
    exact, and no O(C³) factorisation per call.

    LU: the fused `glow_ext.ops` kernels run on L, U, log_S, sign_S directly (ActNorm part: bias =
    logs = 0), with perm = P.argmax(dim=1); they read only the strict triangles of L and U, which
    is what normflows' tril/triu select. InvertibleAffine's density direction instead assembles
    W and runs one GEMM over the (N, C) batch (glow_ext.compat._lu_samples: at tabular sizes the
    op's fixed costs exceed the work). The sampling direction without autograd is one pass with
    the cached W⁻¹ (float64 triangular solves): channel_map per image, a matrix product for
    InvertibleAffine.

    Every cache is keyed on the parameters' versions, storages, dtypes and devices and the
    optimizer step count (glow_ext.cache_invalidation), so it never outlives an optimizer step,
    load_state_dict or `.to()`.
    """

    _transposed = False
    _cache_attributes = ("_inverse_cache",)

    def __init__(self, num_channels, use_lu):
        super().__init__()
        self.num_channels = num_channels
        self.use_lu = use_lu
        rotation, _ = torch.linalg.qr(torch.randn(num_channels, num_channels))
        if use_lu:
            p, lower, upper = torch.linalg.lu(rotation)
            diag = upper.diagonal()
            # Registration order as in normflows, so state_dict() lists the keys in the same order.
            self.register_buffer("P", p)
            self.L = nn.Parameter(lower)
            self.register_buffer("sign_S", torch.sign(diag))
            self.log_S = nn.Parameter(diag.abs().log())
            self.U = nn.Parameter(torch.triu(upper, 1))
            self.register_buffer("eye", torch.eye(num_channels))
        else:
            self.W = nn.Parameter(rotation)
        self._perms = _Memo()
        self._inverse_cache = None  # (key, W⁻¹ in float64, log|det W| in float64)

    def _lu_perms(self):
        """(perm, its inverse) of P for the ops; P and eye are checked once per change."""
        return self._perms.get((self.P, self.eye), self._check_lu_buffers)

    def _check_lu_buffers(self):
        perm = _permutation_of(self.P)
        identity = torch.eye(self.num_channels, dtype=self.eye.dtype, device=self.eye.device)
        if perm is None or not torch.equal(self.eye, identity):
            raise ValueError(f"{type(self).__name__}: buffer `P` must be a permutation matrix and "
                             "`eye` the identity for the fused kernels")
        return perm, torch.argsort(perm)

    def _state_tensors(self):
        if self.use_lu:
            return (self.P, self.L, self.U, self.log_S, self.sign_S, self.eye)
        return (self.W,)

    @torch.no_grad()
    def _inverse_and_logabsdet64(self):
        """(W⁻¹, log|det W|) in float64, recomputed only when a parameter or buffer changed."""
        key = cache_key(self._state_tensors())
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            if self.use_lu:
                perm, _ = self._lu_perms()
                unit_lower, upper_factor = reference.lu_factors(
                    self.L, self.U, self.log_S, self.sign_S, torch.float64)
                eye = torch.eye(self.num_channels, dtype=torch.float64, device=self.L.device)
                inverse = torch.linalg.solve_triangular(unit_lower, eye[:, perm], upper=False,
                                                        unitriangular=True)
                inverse = torch.linalg.solve_triangular(upper_factor, inverse, upper=True)
                logabsdet = self.log_S.to(torch.float64).sum()
            else:
                weight = self.W.to(torch.float64)
                inverse, logabsdet = torch.linalg.inv(weight), torch.linalg.slogdet(weight)[1]
            self._inverse_cache = (key, inverse, logabsdet)
            cache_filled()
        return self._inverse_cache[1:]

    def _map(self, z, matrix):
        """matrix·v at every pixel (matrix cast to the kernel's dtype for z)."""
        matrix = matrix.to(reference.accumulation_dtype(z)).contiguous()
        return ops.channel_map(z, matrix, matrix.new_zeros(self.num_channels))

    def _pixels(self, z):
        return z.shape[2] * z.shape[3] if z.dim() == 4 else 1

    def _needs_autograd(self, z):
        return torch.is_grad_enabled() and (
            z.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _lu_args(self):
        """The fused op's arguments after the input: for W, or (transposed) for
        Wᵀ = (triu(U, 1)ᵀ·D⁻¹ + I)·(D·tril(L, -1)ᵀ + D)·Pᵀ, D = diag(sign_S·exp(log_S)): a unit
        lower times an upper factor with diagonal D, as the op wants, run with perm = identity
        (the inverse op's output then gathered for P). The op reads only the strict triangles, so
        Uᵀ·D⁻¹ and D·Lᵀ need no masks (and their gradients stay on normflows' strict triangles)."""
        perm = self._lu_perms()[0]
        zeros = self.log_S.new_zeros(self.num_channels)
        if not self._transposed:
            return zeros, zeros, perm, self.L, self.U, self.log_S, self.sign_S
        diag = self.sign_S * torch.exp(self.log_S)
        lower = self.U.T / diag  # column j scaled by 1/d[j]
        upper = diag.unsqueeze(1) * self.L.T  # row i scaled by d[i]
        identity = torch.arange(self.num_channels, device=perm.device)
        return zeros, zeros, identity, lower, upper, self.log_S, self.sign_S

    def inverse(self, z):
        """The density direction: W applied, log_det = H·W·log|det W| (0-dim)."""
        if not self.use_lu:
            inverse64, logabsdet64 = self._inverse_and_logabsdet64()
            log_det = _CachedLogAbsDet.apply(self.W, logabsdet64, inverse64) * self._pixels(z)
            return self._map(z, self.W), log_det
        output, logabsdet = self._lu_map(z)
        pixels = self._pixels(z)
        return output, logabsdet if pixels == 1 else logabsdet * pixels

    def _lu_map(self, z):
        """(W·v at every pixel, log|det W| = Σ log_S) from the LU parameters, on the fused op."""
        return ops.actnorm_invconv_lu(z, *self._lu_args())[0], torch.sum(self.log_S)

    def forward(self, z):
        """The sampling direction: W⁻¹ applied, log_det = −H·W·log|det W| (0-dim)."""
        if not self.use_lu:
            inverse64, logabsdet64 = self._inverse_and_logabsdet64()
            log_det = -_CachedLogAbsDet.apply(self.W, logabsdet64, inverse64) * self._pixels(z)
            return self._map(z, _CachedInverse.apply(self.W, inverse64)), log_det
        log_det = -torch.sum(self.log_S) * self._pixels(z)
        if not (self._needs_autograd(z) or torch.compiler.is_compiling()):
            return self._map(z, self._inverse_and_logabsdet64()[0]), log_det
        output = ops.actnorm_invconv_lu_inverse(z, *self._lu_args())
        if self._transposed:
            output = output.index_select(1, self._lu_perms()[0])  # P·v
        return output, log_det

    def extra_repr(self):
        return f"{self.num_channels}, use_lu={self.use_lu}"


class Invertible1x1Conv(_InvertibleLinearFlow):
    """normflows' invertible 1x1 convolution on (N, C, H, W): `inverse(z)` = (W·z per pixel,
    H·W·log|det W|), `forward(z)` = (W⁻¹·z per pixel, −H·W·log|det W|). See the base class for how
    each variant runs on the glow_ext kernels."""

    def __init__(self, num_channels, use_lu=False):
        super().__init__(num_channels, use_lu)


class InvertibleAffine(_InvertibleLinearFlow):
    """normflows' invertible affine map without shift on (N, C): `inverse(z, context=None)` =
    (z @ W, log|det W|), `forward(z, context=None)` = (z @ W⁻¹, −log|det W|). Dense W multiplies
    with BLAS; LU runs the fused op on the (N, C) batch, whose passes are then GEMMs over it."""

    _transposed = True

    def __init__(self, num_channels, use_lu=True):
        super().__init__(num_channels, use_lu)

    def _map(self, z, matrix):
        """z @ matrix: a dense (N, C) product (forward + backward of the density direction at
        (512, 64), one thread: 0.46 ms, against 0.91 ms through channel_map and 0.52 ms for
        normflows, which also runs slogdet)."""
        return z @ matrix.to(z.dtype)

    def _lu_map(self, z):
        """(z @ W, Σ log_S): one GEMM over the batch with W assembled from the factors
        (glow_ext.compat._lu_samples)."""
        perm, inverse_perm = self._lu_perms()
        return lu_sample_map(z, self.L, self.U, self.log_S, self.sign_S, perm, inverse_perm,
                             transposed=True)

    def forward(self, z, context=None):
        return super().forward(z)

    def inverse(self, z, context=None):
        return super().inverse(z)
