"""Drop-in replacements for the Glow layers of popular PyTorch implementations.

- `glow_ext.compat.rosinality`: `ActNorm`, `InvConv2d`, `InvConv2dLU`, `ZeroConv2d`,
  `AffineCoupling` with the constructor, `forward(x)` / `reverse(y)` contract and `state_dict` keys
  of rosinality/glow-pytorch (`model.py`).
- `glow_ext.compat.glow_pytorch`: `ActNorm2d`, `InvertibleConv1x1`, `Conv2d`, `Conv2dZeros` with
  the constructor, `forward(input, logdet=None, reverse=False)` contract and `state_dict` keys of
  y0ast/Glow-PyTorch and chaiyujin/glow-pytorch (`modules.py`), and y0ast's `FlowStep`
  (`model.py`), whose coupling runs on the fused coupling op.
- `glow_ext.compat.waveglow`: `Invertible1x1Conv` of NVIDIA/waveglow (`glow.py`,
  `forward(z, reverse=False)`) and NVIDIA/DeepLearningExamples (`forward(z)`, `infer(z)`,
  `_invert()`), state_dict `conv.weight`.
- `glow_ext.compat.glow_tts`: `ActNorm`, `InvConvNear` of jaywalnut310/glow-tts (`modules.py`) and
  `CoquiInvConvNear` for coqui-ai/TTS's `InvConvNear` (`num_splits`, `weight_inv`), with the
  `forward(x, x_mask=None, reverse=False)` contract, masks and per-sample log-determinants.
- `glow_ext.compat.radtts`: `Invertible1x1ConvLUS` of NVIDIA/radtts (`common.py`),
  `forward(z, inverse=False)`.
- `glow_ext.compat.normflows`: `Invertible1x1Conv`, `InvertibleAffine` with the constructor,
  `forward(z)` (sampling, W⁻¹) / `inverse(z)` (density, W) contract and `state_dict` keys of
  normflows (`normflows.flows.mixing`).
- `glow_ext.compat.nflows`: `LULinear`, `OneByOneConvolution` with the constructor,
  `forward(inputs, context=None)` / `inverse(inputs, context=None)` contract and `state_dict` keys
  of nflows (`nflows.transforms`), with an inverse cache that never goes stale.

Each loads the original module's `state_dict` unchanged (strict) and gives the same outputs and
log-determinants; the invertible 1x1 convolutions run on the fused `glow_ext.ops` kernels. The
classes are written from the documented formulas, not from those projects' code.

The helpers below are shared by the submodules (they are defined before the submodules are
imported, so `from . import _helper` inside them works during package import).
"""
import torch

from .. import reference
from ..distributed import all_reduce_mean

__all__ = ["rosinality", "glow_pytorch", "waveglow", "glow_tts", "radtts", "normflows", "nflows"]


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def _channel_mean_var(x: torch.Tensor, unbiased: bool):
    """Per-channel mean and variance over (N, H, W), two-pass, averaged over torch.distributed ranks.

    Two passes (mean, then mean of squared deviations) rather than E[x²] − E[x]², which cancels
    badly when |mean| ≫ std. Under torch.distributed each statistic is averaged over ranks (equal
    shard sizes assumed), so every replica initialises identically. `unbiased` applies Bessel's
    correction with the total count over all ranks (as torch.std does for one process).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {tuple(x.shape)}")
    x = x.detach().to(reference.accumulation_dtype(x))
    mean = all_reduce_mean(x.mean(dim=(0, 2, 3)))
    var = all_reduce_mean((x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)))
    if unbiased:
        count = (x.numel() // max(x.shape[1], 1)) * _world_size()
        var = var * (count / (count - 1)) if count > 1 else torch.full_like(var, float("nan"))
    return mean, var


def _version(tensor: torch.Tensor):
    """The tensor's in-place version counter, or None where it has none (inference tensors)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class _Memo:
    """A value derived from some tensors, recomputed only when one of them changes.

    "Changes" means replaced by another tensor (`module.to(...)`, `load_state_dict(assign=True)`)
    or modified in place (`load_state_dict` copies into the buffers, `fill_`, ...): tensor identity
    and the version counter are both Python-side reads, so checking costs no host synchronisation.
    Tensors without a version counter (made under `torch.inference_mode`) recompute every call.
    """

    def __init__(self):
        self._sources = ()
        self._versions = ()
        self.value = None

    def is_current(self, sources) -> bool:
        return (len(sources) == len(self._sources)
                and all(a is b for a, b in zip(sources, self._sources))
                and None not in self._versions
                and tuple(_version(t) for t in sources) == self._versions)

    def set(self, sources, value):
        self._sources = tuple(sources)
        self._versions = tuple(_version(t) for t in sources)
        self.value = value
        return value

    def get(self, sources, compute):
        if self.is_current(sources):
            return self.value
        return self.set(sources, compute())


def _permutation_of(matrix: torch.Tensor):
    """perm with matrix[i, j] == 1 iff j == perm[i] (so perm = matrix.argmax(dim=1)), or None when
    `matrix` is not exactly a permutation matrix. Synchronises with the device (run it once)."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        return None
    c = matrix.shape[0]
    perm = matrix.argmax(dim=1)
    one_hot = torch.eye(c, dtype=matrix.dtype, device=matrix.device)[perm]
    arange = torch.arange(c, device=matrix.device)
    if not (torch.equal(matrix, one_hot) and torch.equal(perm.sort().values, arange)):
        return None
    return perm


def _lu_of_dense(weight: torch.Tensor):
    """(perm, lower, upper, log_s, sign_s) of a dense C x C weight, for the fused ops.

    torch.linalg.lu with partial pivoting, W = P·L·U, computed in float64 (as the originals compute
    slogdet in float64) and cast back to the weight's dtype. O(C³), but no slogdet and no general
    inverse, and no host synchronisation. torch.linalg.lu is differentiable, so gradients reach
    `weight` through the factors. A singular W gives log_s = −inf (the CPU op then raises).
    """
    dtype = weight.dtype
    p, lower, upper = torch.linalg.lu(weight.to(torch.float64))
    diag = upper.diagonal()
    return (p.argmax(dim=1), lower.to(dtype), upper.to(dtype),
            diag.abs().log().to(dtype), diag.sign().to(dtype))


def _conv_layout(x: torch.Tensor) -> torch.Tensor:
    """The coupling network's input in the layout its convolutions run fastest in: channels_last on
    the CPU (oneDNN's native layout, faster for the rosinality- and y0ast-style coupling networks'
    forward + backward even with both conversions counted), unchanged on other devices, where the
    layout was not measured."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


# After the helpers, which the submodules import.
from . import glow_pytorch, glow_tts, nflows, normflows, radtts, rosinality, waveglow  # noqa: E402
