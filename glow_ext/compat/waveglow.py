"""Drop-in for the invertible 1x1 convolution of WaveGlow: NVIDIA/waveglow (`glow.py`) and
NVIDIA/DeepLearningExamples' Tacotron2 / FastPitch copies (`waveglow/model.py`).

- `Invertible1x1Conv(c)`: `conv.weight` (c, c, 1), nothing else in the state_dict, so the
  originals' checkpoints load with `strict=True`. Both call contracts:
  NVIDIA/waveglow's `forward(z, reverse=False)` (reverse returns only z) and DeepLearningExamples'
  `forward(z)`, `infer(z)` and `_invert()`. z is (batch, c, groups).

Runs on the fused `glow_ext.ops.channel_map` kernel (groups as the positions), with W⁻¹
and log|det W| derived only when W changes (glow_ext.compat._dense).
"""
import torch
from torch import nn

from .. import reference
from ._dense import DenseWeightCache

__all__ = ["Invertible1x1Conv"]


class Invertible1x1Conv(DenseWeightCache, nn.Module):
    """z ↦ W·z per time step, with W = conv.weight[:, :, 0]; forward returns
    (W·z, batch·groups·log|det W|), reverse / `infer` returns W⁻¹·z.

    Initialised as the originals: a random rotation (QR of a Gaussian), its first column negated
    if det < 0.

    The inverse is always that of the current W. The originals store `W_inverse` on the first
    reverse call and never refresh it, so after a training step (or a `load_state_dict`) their
    reverse silently inverts the old W; here W⁻¹ is recomputed whenever W changes (in place,
    replaced, or stepped by any optimizer, fused ones included: glow_ext.cache_invalidation) and
    `W_inverse` is a read-only view of it. `_invert()` computes it ahead of the first `infer`.

    Log-determinant: log|det W|. NVIDIA/waveglow's current `glow.py` computes the same
    (slogdet); its older version and DeepLearningExamples use `torch.logdet`, which is NaN when
    det W < 0. W starts with det W > 0 and training cannot move det W through 0 (log|det W| → −∞
    there), so the two agree wherever the original's is a number. Computed in float64, returned in
    float32 (float64 for a float64 W). Gradients reach W as in the originals: W·z through the
    channel map's backward, the log-determinant through W⁻ᵀ; reverse with autograd on gives W the
    gradient of the true inverse.
    """

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=1, stride=1, padding=0, bias=False)
        rotation = torch.linalg.qr(torch.randn(c, c))[0]
        if torch.det(rotation) < 0:
            rotation[:, 0] = -rotation[:, 0]
        with torch.no_grad():
            self.conv.weight.copy_(rotation.unsqueeze(2))
        self._dense_cache = None

    def _weight(self):
        return self.conv.weight[:, :, 0]

    def forward(self, z, reverse=False):
        if reverse:
            return self.infer(z)
        batch_size, _, groups = z.shape
        weight = self._weight()
        output = self._dense_map(z, weight)
        return output, batch_size * groups * self._dense_logabsdet(weight)

    def infer(self, z):
        """W⁻¹·z (DeepLearningExamples' name for `forward(z, reverse=True)`)."""
        return self._dense_inverse_map(z, self._weight())

    def _invert(self):
        """Computes W⁻¹ now (the originals' explicit inverse caching); `infer` keeps it current."""
        weight = self._weight()
        self._derived(weight, reference.accumulation_dtype(weight))

    @property
    def W_inverse(self):
        """The current W⁻¹ as (c, c, 1) in W's dtype (the originals' attribute, never stale here)."""
        weight = self._weight()
        inverse = self._derived(weight, reference.accumulation_dtype(weight))[0]
        return inverse.to(weight.dtype).unsqueeze(2)

    def extra_repr(self):
        return f"{self.conv.in_channels}"
