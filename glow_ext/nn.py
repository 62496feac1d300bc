"""Glow layers: the fused ActNormInvConv (any input rank) and ActNormInvConv2d (images), and the
plain-PyTorch layers a Glow model needs around it.

The public names of the layers' modules, in one place:

- glow_ext.invconv: ActNormInvConv, ActNormInvConv2d, InvConv2dLU (the fused ops), InvConv2d
  (dense baseline), random_rotation_lu, check_permutation
- glow_ext.actnorm: ActNorm2d
- glow_ext.coupling_network: CouplingNN (with its prepacked oneDNN inference path), ZeroConv2d
- glow_ext.flow_layers: Shuffle, Reverse, squeeze2d, unsqueeze2d, Squeeze2d, AffineCoupling,
  AdditiveCoupling, Split, gaussian_log_prob, gaussian_sample, LOG_2PI, FlowStep, COUPLINGS,
  PERMUTATIONS
- glow_ext.cache_invalidation: set_cache_invalidation, clear_caches (when the cached inverse maps
  and prepacked weights are recomputed, and how to take that over from the optimizer hook)

Importing glow_ext.nn registers nothing globally: the optimizer step hook that invalidates the
caches is registered when a cache is first filled (see glow_ext.cache_invalidation).
"""
from .actnorm import ActNorm2d
# Pickled layers name their load_state_dict post-hook by this path.
from .actnorm import _sync_initialized_flag  # noqa: F401
from .cache_invalidation import clear_caches, set_cache_invalidation
from .coupling_network import CouplingNN, ZeroConv2d
from .flow_layers import (COUPLINGS, LOG_2PI, PERMUTATIONS, AdditiveCoupling, AffineCoupling,
                          FlowStep, Reverse, Shuffle, Split, Squeeze2d, gaussian_log_prob,
                          gaussian_sample, squeeze2d, unsqueeze2d)
from .invconv import (ActNormInvConv, ActNormInvConv2d, InvConv2d, InvConv2dLU, check_permutation,
                      random_rotation_lu)

__all__ = [
    "ActNormInvConv", "ActNormInvConv2d", "InvConv2dLU", "InvConv2d", "random_rotation_lu", "check_permutation",
    "ActNorm2d", "CouplingNN", "ZeroConv2d", "Shuffle", "Reverse", "squeeze2d", "unsqueeze2d",
    "Squeeze2d", "AffineCoupling", "AdditiveCoupling", "Split", "gaussian_log_prob",
    "gaussian_sample", "LOG_2PI", "FlowStep", "COUPLINGS", "PERMUTATIONS",
    "set_cache_invalidation", "clear_caches",
]
