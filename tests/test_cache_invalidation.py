"""glow_ext.cache_invalidation: no global optimizer hook until a layer fills a cache, the opt-out,
and clearing caches by hand.

The hook lives in torch.optim's process-wide registry, so the tests that look at the registry run
in a fresh interpreter each; the opt-out test runs here and restores the setting.
"""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glow_ext import cache_invalidation, coupling_network
from glow_ext import nn as gnn
from glow_ext.models import Glow

from conftest import max_rel_error

ROOT = Path(__file__).resolve().parents[1]

# Prints the number of glow_ext's hooks among torch.optim's global step post-hooks.
_COUNT_HOOKS = """
def glow_hooks():
    from torch.optim.optimizer import _global_optimizer_post_hooks
    return sum(getattr(hook, "__module__", "").startswith("glow_ext")
               for hook in _global_optimizer_post_hooks.values())
"""


def run_python(script: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COUNT_HOOKS + textwrap.dedent(script)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.split()


def test_importing_glow_ext_and_training_register_no_optimizer_hook():
    """Import every glow_ext module, then train with fused Adam: no cache is ever filled (autograd
    is on throughout), so the process never gets the hook."""
    out = run_python("""
        import torch
        import glow_ext, glow_ext.compat, glow_ext.models, glow_ext.nn, glow_ext.reversible
        import glow_ext.training
        print(glow_hooks())
        model = glow_ext.models.Glow(3, 8, K=2, L=2, hidden_channels=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        for _ in range(2):
            optimizer.zero_grad()
            model.bits_per_dim(torch.rand(4, 3, 8, 8) - 0.5, 256).mean().backward()
            optimizer.step()
        print(glow_hooks())
    """)
    assert out == ["0", "0"]


def test_the_hook_is_registered_once_when_a_cache_is_first_filled_and_opting_out_removes_it():
    out = run_python("""
        import torch
        from glow_ext import nn as gnn
        layer, net = gnn.ActNormInvConv2d(4), gnn.CouplingNN(2, 4, 8)
        y = torch.randn(2, 4, 3, 3)
        print(glow_hooks())
        layer.reverse(y)  # autograd on: the differentiable inverse, no cache
        print(glow_hooks())
        with torch.no_grad():
            layer.reverse(y)
            print(glow_hooks())
            gnn.InvConv2dLU(4).reverse(y)
            net(y[:, :2])
            print(glow_hooks())
            print(gnn.set_cache_invalidation(False), glow_hooks())
            gnn.clear_caches(layer)
            layer.reverse(y)
            print(glow_hooks())
            print(gnn.set_cache_invalidation(True), glow_hooks())
            layer.reverse(y)
            print(glow_hooks())
    """)
    assert out == ["0", "0", "1", "1", "True", "0", "0", "False", "0", "1"]


@pytest.fixture
def invalidation_off():
    previous = gnn.set_cache_invalidation(False)
    yield
    gnn.set_cache_invalidation(previous)


def _optimizer_step(model, x, fused):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    optimizer.zero_grad()
    model.bits_per_dim(x, 256).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("fused_adam", [False, True])
def test_with_invalidation_off_a_fused_step_leaves_the_caches_until_they_are_cleared(
        invalidation_off, fused_adam):
    """Off: non-fused Adam still bumps the version counters, fused Adam does not, so the caches
    (inverse maps and prepacked weights) keep the old parameters until clear_caches. Switching
    invalidation back on drops whatever was cached while it was off."""
    torch.manual_seed(0)
    model = Glow(3, 8, K=2, L=2, hidden_channels=8)
    x = torch.rand(4, 3, 8, 8) - 0.5
    model.train()
    model(x)
    model.eval()
    zs = [z.detach() for z in model.encode(x)]
    with torch.no_grad():
        before = model.decode(zs)
    layers = [m for m in model.modules() if isinstance(m, gnn.ActNormInvConv2d)]
    maps_before = [m._inverse_cache for m in layers]
    _optimizer_step(model, x, fused_adam)

    def decode_with_and_without_autograd():
        fresh = model.decode(zs).detach()  # the differentiable inverse, never cached
        with torch.no_grad():
            return fresh, model.decode(zs)

    fresh, cached = decode_with_and_without_autograd()
    assert max_rel_error(fresh, before) > 1e-3, "the step must change the inverse"
    kept = [m._inverse_cache is cache for m, cache in zip(layers, maps_before)]
    if fused_adam:
        assert all(kept), "with invalidation off, a fused step must go unseen"
        assert max_rel_error(cached, fresh) > 1e-4
    else:
        assert not any(kept) and max_rel_error(cached, fresh) <= 1e-5
    gnn.clear_caches(model)
    fresh, cached = decode_with_and_without_autograd()
    assert max_rel_error(cached, fresh) <= 1e-5

    _optimizer_step(model, x, fused_adam)
    gnn.set_cache_invalidation(True)
    fresh, cached = decode_with_and_without_autograd()
    assert max_rel_error(cached, fresh) <= 1e-5


def test_clear_caches_reaches_every_caching_layer():
    model = Glow(3, 8, K=2, L=2, hidden_channels=8).eval()
    with torch.no_grad():
        model.sample(2)
    caching = [m for m in model.modules() if isinstance(m, cache_invalidation.CachesDerivedTensors)]
    assert {type(m) for m in caching} == {gnn.ActNormInvConv2d, gnn.CouplingNN}
    filled = {type(m) for m in caching if any(getattr(m, a) is not None for a in m._cache_attributes)}
    assert filled == ({gnn.ActNormInvConv2d, gnn.CouplingNN} if coupling_network._ONEDNN_INFERENCE
                      else {gnn.ActNormInvConv2d})
    gnn.clear_caches(model)
    assert all(getattr(m, a) is None for m in caching for a in m._cache_attributes)


def test_copies_and_pickles_leave_the_caches_behind():
    layer = gnn.ActNormInvConv2d(4)
    y = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected = layer.reverse(y)
    assert layer._inverse_cache is not None
    copied = copy.deepcopy(layer)
    assert copied._inverse_cache is None and layer._inverse_cache is not None
    with torch.no_grad():
        assert torch.equal(copied.reverse(y), expected)
    # This pickle holds a filled inverse map of another process's tensors.
    old = torch.load(ROOT / "tests" / "fixtures" / "glow-nn-layers-v1.pt", weights_only=False)
    assert old["layers"][1]._inverse_cache is None
