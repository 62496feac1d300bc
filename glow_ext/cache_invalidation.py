"""When the layers' caches of tensors derived from their parameters go stale.

InvConv2dLU caches its folded inverse map, CouplingNN its prepacked oneDNN weights. Each cache is
keyed on the tensors it was derived from: their version counters (bumped by in-place ops,
`load_state_dict`, non-fused optimizers), storages, dtypes and devices, all read on the host, so a
check never synchronises with a GPU.

Fused optimizers (`torch.optim.Adam(fused=True)`, the trainer's default) write the parameters in
place without bumping their version counters. To see their steps too, every key also holds a
count of optimizer steps, kept by a process-wide `torch.optim` step post-hook. The hook is
registered the first time a cache is filled, not at import: a process that never decodes or
samples without autograd never gets it. (Writes through `.data` bump no counter and are no
optimizer step: call `clear_caches(model)` after them.)

`set_cache_invalidation(False)` removes the hook and keeps it away. Version counters, storages,
dtypes and devices still invalidate the caches, but after a fused optimizer step the caches hold
maps of the old parameters until `clear_caches(model)` (or a layer's `clear_cache()`) is called;
decoding or sampling before that is silently wrong.
"""
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_enabled = True
_hook_handle = None
# Part of every cache key: bumped by each optimizer step once the hook is registered, and when
# invalidation is switched back on (steps taken while it was off were not counted).
_generation = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _generation
    _generation += 1


def set_cache_invalidation(enabled: bool) -> bool:
    """Whether optimizer steps invalidate the cached inverse maps and prepacked weights (on by
    default). Off, no optimizer hook is registered, and the caller must call `clear_caches(model)`
    after every optimizer step that precedes a decode or sample without autograd. Returns the
    previous setting, so that a caller can restore it."""
    global _enabled, _hook_handle, _generation
    previous, _enabled = _enabled, bool(enabled)
    if not _enabled and _hook_handle is not None:
        _hook_handle.remove()
        _hook_handle = None
    if _enabled and not previous:
        _generation += 1
    return previous


def cache_key(tensors) -> tuple:
    """Changes whenever one of the tensors is modified in place (an in-place op, load_state_dict),
    an optimizer steps (while invalidation is on) or a tensor is replaced (`.to()`, `.double()`)."""
    return (_generation,) + tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def cache_filled() -> None:
    """Called by a layer that has just stored a cache: from now on optimizer steps must count."""
    global _hook_handle
    if _enabled and _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)


class CachesDerivedTensors:
    """Mixin for a module holding caches in the attributes named by `_cache_attributes` (each None
    or a tuple starting with its `cache_key`). Copies and pickles leave the caches behind: they
    are cheap to rebuild, and some (oneDNN's prepacked weights) are opaque tensors."""

    _cache_attributes = ()

    def clear_cache(self) -> None:
        """Drops the caches; the next call that needs one recomputes it from the parameters."""
        for name in self._cache_attributes:
            setattr(self, name, None)

    def __getstate__(self):
        return dict(super().__getstate__(), **dict.fromkeys(self._cache_attributes))

    def __setstate__(self, state):
        super().__setstate__(state)
        # Whatever the pickle holds: a key naming another process's storages means nothing here.
        self.clear_cache()


def clear_caches(module: torch.nn.Module) -> None:
    """`clear_cache()` on `module` and every submodule that caches derived tensors."""
    for m in module.modules():
        if isinstance(m, CachesDerivedTensors):
            m.clear_cache()
