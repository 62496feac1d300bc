"""glow_ext.models.Glow and the layers of glow_ext.nn it is built from.

Invertibility, exact log-determinants (against brute-force Jacobians in float64), the density (against
an independent computation), priors (class-conditional, temperature), checkpoints (ActNorm never
re-initialised), argument errors, bits/dim and torch.compile of a flow step. Sizes are small so the
file runs in well under a minute on two CPU cores; the one deep model is K=32, L=3 on 3x16x16 with
coupling width 16.
"""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

import glow_ext
from glow_ext import coupling_network
from glow_ext import nn as gnn
from glow_ext.models import CompiledAfterInit, Glow, GlowOutput

from conftest import DEVICES, max_rel_error

PERMUTATIONS = ["invconv_lu", "invconv", "shuffle", "reverse"]
COUPLINGS = ["affine", "additive"]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The models here are tiny: one intra-op thread is as fast as two, and a conv never waits at a
    thread barrier for a core that another process is using (which made these tests 10x slower on
    a busy two-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def perturb(module, std=0.05):
    """Move every floating parameter off its initial value (zero-initialised convs included), so
    that no layer is the identity and no prior is standard normal."""
    for p in module.parameters():
        p.add_(std * torch.randn_like(p))


def initialise(model, x, *args):
    """One train-mode forward (ActNorm's data-dependent init), then perturb and switch to eval."""
    model.train()
    with torch.no_grad():
        model(x, *args)
    perturb(model)
    return model.eval()


def rand_image(shape, device="cpu", dtype=torch.float32):
    """Dequantized-looking data in [-0.5, 0.5)."""
    return (torch.rand(shape, dtype=torch.float64) - 0.5).to(device=device, dtype=dtype)


def brute_force_logdet(fn, x_one):
    """log|det ∂fn/∂x| of one sample (1, C, H, W) -> flattened output, in float64."""
    jac = jacobian(lambda v: fn(v.view_as(x_one)).reshape(-1), x_one.reshape(-1))
    assert jac.shape[0] == jac.shape[1]
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabsdet


# ------------------------------------------------------------------------------------------------
# The layers
# ------------------------------------------------------------------------------------------------

LAYERS = {
    "ActNorm2d": lambda c: gnn.ActNorm2d(c, scale=0.8),
    "InvConv2d": lambda c: gnn.InvConv2d(c),
    "InvConv2dLU": lambda c: gnn.InvConv2dLU(c),
    "ActNormInvConv2d": lambda c: gnn.ActNormInvConv2d(c),
    "Shuffle": lambda c: gnn.Shuffle(c),
    "Reverse": lambda c: gnn.Reverse(c),
    "Squeeze2d": lambda c: gnn.Squeeze2d(),
    "AffineCoupling": lambda c: gnn.AffineCoupling(c, 8),
    "AdditiveCoupling": lambda c: gnn.AdditiveCoupling(c, 8),
    **{f"FlowStep-{p}-{cp}": (lambda c, p=p, cp=cp: gnn.FlowStep(c, 8, cp, p))
       for p in PERMUTATIONS for cp in COUPLINGS},
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_round_trip_and_logdet_against_jacobian(name):
    C = 5 if "Coupling" in name else 4  # odd C: the coupling halves are unequal
    layer = LAYERS[name](C).double()
    x = torch.randn(2, C, 4, 4, dtype=torch.float64) * 1.5 + 0.3
    layer.train()
    with torch.no_grad():
        layer(x)  # data-dependent init where there is one
    perturb(layer)
    layer.eval()

    y, logdet = layer(x)
    logdet = logdet.expand(2) if logdet.dim() == 0 else logdet
    assert logdet.shape == (2,)
    x_back = layer.reverse(y)
    assert max_rel_error(x_back, x) <= 1e-12, name
    for i in range(2):
        expected = brute_force_logdet(lambda v: layer(v)[0], x[i:i + 1])
        torch.testing.assert_close(logdet[i], expected, rtol=1e-10, atol=1e-10, msg=name)


def test_actnorm2d_data_dependent_init_and_flag():
    layer = gnn.ActNorm2d(3, scale=2.0)
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.5, 3.0, 10.0]).view(1, 3, 1, 1) + 4.0
    layer.eval()
    layer(x)
    assert not layer._initialized and not bool(layer.initialized)
    layer.train()
    y, _ = layer(x)
    assert layer._initialized and bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), correction=0), torch.full((3,), 2.0), atol=1e-4, rtol=0)
    assert "initialized" in layer.state_dict()


def test_squeeze_layout_and_inverse():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = gnn.squeeze2d(x)
    assert y.shape == (2, 12, 2, 3)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(y[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2], rtol=0, atol=0)
    torch.testing.assert_close(gnn.unsqueeze2d(y), x, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 2, 5, 4), (1, 2, 4, 7)])
def test_squeeze_rejects_odd_sizes(shape):
    with pytest.raises(ValueError, match="divisible by 2"):
        gnn.squeeze2d(torch.zeros(shape))
    with pytest.raises(ValueError, match="divisible by 2"):
        gnn.Squeeze2d()(torch.zeros(shape))


def test_zero_conv_and_couplings_start_as_documented():
    x = torch.randn(3, 6, 4, 4)
    assert torch.count_nonzero(gnn.ZeroConv2d(6, 5)(x)) == 0
    y, logdet = gnn.AdditiveCoupling(6, 8)(x)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    y, logdet = gnn.AffineCoupling(6, 8)(x)  # h = 0: scale = sigmoid(2) on the active half
    scale = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(y[:, 3:], x[:, 3:] * scale)
    torch.testing.assert_close(logdet, torch.full((3,), 3 * 16 * math.log(scale.item())))


def test_split_prior_and_reverse():
    split = gnn.Split(6)
    perturb(split)
    x = torch.randn(4, 6, 3, 3)
    kept, z, log_p = split(x)
    h = F.conv2d(kept, split.prior.conv.weight, split.prior.conv.bias, padding=1)
    h = h * torch.exp(3 * split.prior.logs).view(1, -1, 1, 1)
    normal = torch.distributions.Normal(h[:, :3], h[:, 3:].exp())
    torch.testing.assert_close(log_p, normal.log_prob(z).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(split.reverse(kept, z), x, rtol=0, atol=0)
    torch.testing.assert_close(split.reverse(kept, temperature=0.0)[:, 3:], h[:, :3])


# torch.save of whole layers, written when every layer was defined in glow_ext/nn.py itself: the
# pickle names each class as glow_ext.nn.<Class>. ActNormInvConv2d, InvConv2dLU, ActNorm2d,
# InvConv2d, Shuffle, Reverse, Squeeze2d, AffineCoupling(4, 8), AdditiveCoupling(4, 8),
# FlowStep(4, 8) and FlowStep(4, 8, "additive", "shuffle") after their init on x (2x4x4x4) and a
# perturbation, in eval mode, with their outputs and inverses on x; and a Split(4) with its log_p.
OLD_PICKLED_LAYERS = Path(__file__).parent / "fixtures" / "glow-nn-layers-v1.pt"


def test_layers_pickled_under_the_old_module_paths_load_and_agree():
    saved = torch.load(OLD_PICKLED_LAYERS, weights_only=False)
    x = saved["x"]
    with torch.no_grad():
        for layer, output, inverse in zip(saved["layers"], saved["outputs"], saved["inverses"]):
            assert max_rel_error(layer(x)[0], output) <= 1e-6, type(layer).__name__
            assert max_rel_error(layer.reverse(output), inverse) <= 1e-6, type(layer).__name__
            assert max_rel_error(layer.reverse(output), x) <= 1e-4, type(layer).__name__
    assert max_rel_error(saved["split"](x)[2], saved["split_log_p"]) <= 1e-6


def test_glow_ext_nn_exports_every_layer_name_from_one_place():
    """Code and users import these as glow_ext.nn.<name>, whichever module defines them."""
    names = ["random_rotation_lu", "check_permutation", "InvConv2dLU", "ActNormInvConv", "ActNormInvConv2d",
             "COUPLINGS", "PERMUTATIONS", "ActNorm2d", "InvConv2d", "Shuffle", "Reverse",
             "squeeze2d", "unsqueeze2d", "Squeeze2d", "ZeroConv2d", "CouplingNN", "AffineCoupling",
             "AdditiveCoupling", "LOG_2PI", "gaussian_log_prob", "gaussian_sample", "Split",
             "FlowStep", "set_cache_invalidation", "clear_caches"]
    assert sorted(gnn.__all__) == sorted(names)
    assert all(getattr(gnn, name) is not None for name in names)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

def small_glow(device="cpu", **kwargs):
    config = dict(in_channels=3, image_size=8, K=2, L=2, hidden_channels=8)
    config.update(kwargs)
    return Glow(**config).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_deep_model_after_training(device):
    """K=32, L=3 (96 flow steps) on 3x16x16, coupling width 16, fp32, after 3 Adam steps."""
    model = Glow(3, 16, K=32, L=3, hidden_channels=16).to(device)
    x = rand_image((4, 3, 16, 16), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model.bits_per_dim(x, 256).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(layer._initialized for layer in model.actnorm_layers())
    model.eval()
    with torch.no_grad():
        zs = model.encode(x)
        assert [tuple(z.shape) for z in zs] == [(4, 6, 8, 8), (4, 12, 4, 4), (4, 48, 2, 2)]
        x_back = model.decode(zs)
    assert max_rel_error(x_back, x) <= 1e-4


def _count_calls(monkeypatch, name):
    calls = []
    original = getattr(glow_ext.ops, name)
    monkeypatch.setattr(glow_ext.ops, name, lambda *args: calls.append(1) or original(*args))
    return calls


@pytest.mark.parametrize("fused_adam", [False, True])  # fused: parameters change, versions don't
def test_sampling_uses_cached_inverse_maps_until_parameters_change(monkeypatch, fused_adam):
    """decode/sample under no_grad: one cached-map kernel call per fused step, no per-call inverse;
    with autograd: the differentiable inverse op. An optimizer step invalidates every cached map."""
    model = initialise(small_glow(K=3, L=2), rand_image((4, 3, 8, 8)))
    inverse_calls = _count_calls(monkeypatch, "actnorm_invconv_lu_inverse")
    map_calls = _count_calls(monkeypatch, "channel_map")
    zs = model.encode(rand_image((2, 3, 8, 8)))
    with torch.no_grad():
        model.decode(zs)
        model.sample(2, temperature=0.5)
    assert (len(inverse_calls), len(map_calls)) == (0, 2 * 3 * 2)
    caches = [m._inverse_cache for m in model.modules() if isinstance(m, gnn.ActNormInvConv2d)]
    with torch.no_grad():
        model.sample(2, temperature=0.5)
    assert caches == [m._inverse_cache for m in model.modules() if isinstance(m, gnn.ActNormInvConv2d)]

    x = rand_image((4, 3, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused_adam)
    optimizer.zero_grad()
    model.bits_per_dim(x, 256).mean().backward()
    optimizer.step()
    zs = [z.detach() for z in model.encode(x)]
    with_autograd = model.decode(zs)
    assert len(inverse_calls) == 3 * 2 and with_autograd.requires_grad
    with torch.no_grad():
        cached = model.decode(zs)
    assert max_rel_error(cached, with_autograd.detach()) <= 1e-5
    assert max_rel_error(cached, x) <= 1e-4


@pytest.mark.skipif(not coupling_network._ONEDNN_INFERENCE, reason="this torch has no oneDNN inference convolutions")
def test_coupling_network_without_autograd_runs_prepacked_weights_until_they_change():
    """No grad, float32, CPU: oneDNN's fused inference convolutions on weights reordered once per
    parameter version and input shape, with the plain path's output; hooks, autograd and float64
    keep the plain path."""
    net = gnn.CouplingNN(6, 24, 32)
    perturb(net)
    x = torch.randn(3, 6, 8, 8)

    def plain_and_prepacked(x):
        net._prepacked = None
        plain = net(x)
        with torch.no_grad():
            prepacked = net(x)
        return plain, prepacked

    plain, prepacked = plain_and_prepacked(x)
    assert net._prepacked is not None and max_rel_error(prepacked, plain) <= 1e-6
    weights = net._prepacked[1]
    with torch.no_grad():
        net(torch.randn(3, 6, 8, 8))
    assert net._prepacked[1] is weights
    copied = copy.deepcopy(net)  # the opaque oneDNN weights are rebuilt, not copied
    assert copied._prepacked is None
    with torch.no_grad():
        assert max_rel_error(copied(x), prepacked) <= 1e-6

    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)  # no version bump
    net(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after_step = net(x)
    assert net._prepacked[1] is not weights
    assert max_rel_error(after_step, net(x)) <= 1e-6 and max_rel_error(after_step, prepacked) > 1e-3
    plain, prepacked = plain_and_prepacked(torch.randn(5, 6, 4, 12))
    assert max_rel_error(prepacked, plain) <= 1e-6

    handle = net.net[1].register_forward_hook(lambda m, inputs, output: output * 2)
    net._prepacked = None
    with torch.no_grad():
        hooked = net(x)
    assert net._prepacked is None and max_rel_error(hooked, net(x)) <= 1e-6
    handle.remove()
    net.net[3] = torch.nn.SiLU()  # a swapped layer runs as it is
    net._prepacked = None
    with torch.no_grad():
        swapped = net(x)
    assert net._prepacked is None and max_rel_error(swapped, net(x)) <= 1e-6
    net.double()
    with torch.no_grad():
        net(x.double())
    assert net._prepacked is None


def test_sampling_and_evaluation_agree_with_and_without_the_prepacked_path(monkeypatch):
    model = initialise(small_glow(K=3, L=2, hidden_channels=16), rand_image((4, 3, 8, 8)))
    x = rand_image((4, 3, 8, 8))
    results = []
    for prepacked in (True, False):
        monkeypatch.setattr(gnn.CouplingNN, "prepacked_inference", prepacked)
        torch.manual_seed(0)
        with torch.no_grad():
            results.append((model.sample(4, temperature=0.7), model.bits_per_dim(x, 256)))
    for fast, plain in zip(*results):
        assert max_rel_error(fast, plain) <= 1e-5


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_total_logdet_matches_jacobian(permutation, coupling):
    """2x4x4 input, K=2, L=2, float64: logdet of the flow x -> (z_1, z_top) by brute force."""
    model = Glow(2, 4, K=2, L=2, hidden_channels=8, coupling=coupling, permutation=permutation).double()
    x = rand_image((2, 2, 4, 4), dtype=torch.float64)
    initialise(model, x)
    out = model(x)
    assert out.logdet.shape == (2,)
    for i in range(2):
        expected = brute_force_logdet(lambda v: torch.cat([z.reshape(-1) for z in model.encode(v)]),
                                      x[i:i + 1])
        torch.testing.assert_close(out.logdet[i], expected, rtol=1e-10, atol=1e-9)
    if coupling == "affine":  # per-sample logdets really differ
        assert (out.logdet - out.logdet[0]).abs().max() > 1e-6


def test_log_prob_matches_independent_computation():
    """Tiny class-conditional model: Σ log N(z_i; prior_i) + log|det J| with the priors recomputed
    from the modules' weights by hand and the log-determinant from the Jacobian."""
    model = Glow(1, 4, K=2, L=2, hidden_channels=8, n_classes=3).double()
    x = rand_image((3, 1, 4, 4), dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    initialise(model, x, y)
    log_prob = model.log_prob(x, y)
    zs = model.encode(x)
    assert [tuple(z.shape) for z in zs] == [(3, 2, 2, 2), (3, 8, 1, 1)]

    # The split prior: ZeroConv2d of the kept half (the first 2 of the 4 channels after level 1).
    kept = gnn.squeeze2d(x)
    for step in model.levels[0].steps:
        kept, _ = step(kept)
    kept = kept[:, :2]
    prior = model.levels[0].split.prior
    h = F.conv2d(kept, prior.conv.weight, prior.conv.bias, padding=1) * torch.exp(3 * prior.logs).view(1, -1, 1, 1)
    split_term = torch.distributions.Normal(h[:, :2], h[:, 2:].exp()).log_prob(zs[0]).sum(dim=(1, 2, 3))
    # The top prior: a conv of zeros is its bias (times exp(3·logs)), plus the class embedding.
    top = model.top_prior
    h_top = (top.conv.bias * torch.exp(3 * top.logs)).view(1, 16) \
        + F.one_hot(y, 3).double() @ model.class_embedding.weight.T + model.class_embedding.bias
    top_term = torch.distributions.Normal(h_top[:, :8], h_top[:, 8:].exp()).log_prob(zs[1].flatten(1)).sum(1)
    for i in range(3):
        logdet = brute_force_logdet(lambda v: torch.cat([z.reshape(-1) for z in model.encode(v)]), x[i:i + 1])
        torch.testing.assert_close(log_prob[i], split_term[i] + top_term[i] + logdet, rtol=1e-10, atol=1e-9)


def test_bits_per_dim_formula():
    model = initialise(small_glow(), rand_image((4, 3, 8, 8)))
    x = rand_image((5, 3, 8, 8))
    D = 3 * 8 * 8
    for n_bins in (256, 32):
        expected = (-model.log_prob(x) + D * math.log(n_bins)) / (D * math.log(2))
        torch.testing.assert_close(model.bits_per_dim(x, n_bins), expected)
    # Uniform sanity: a density of 1 on [-0.5, 0.5)^D (log p = 0) costs exactly log2(n_bins) bits/dim.
    uniform = small_glow()
    uniform.log_prob = lambda x, y=None: torch.zeros(x.shape[0])
    torch.testing.assert_close(uniform.bits_per_dim(x, 256), torch.full((5,), 8.0))
    torch.testing.assert_close(uniform.bits_per_dim(x, 17), torch.full((5,), math.log2(17)))


def test_forward_output_fields():
    model = small_glow()
    x = rand_image((4, 3, 8, 8))
    out = model(x)
    assert isinstance(out, GlowOutput)
    assert out.log_prob.shape == (4,) and out.logdet.shape == (4,)
    assert out.class_logits is None
    assert len(out.zs) == 2 and tuple(out.zs[-1].shape) == (4, 24, 2, 2)
    torch.testing.assert_close(model.log_prob(x), out.log_prob)
    assert torch.isfinite(out.log_prob).all()
    assert all(layer._initialized for layer in model.actnorm_layers())  # fresh model in train mode


def test_top_prior_options():
    plain = small_glow(learn_top=False)
    assert plain.top_prior is None
    mean, log_std = plain.top_prior_params(2)
    assert mean.shape == (2, 24, 2, 2) and torch.count_nonzero(mean) == 0 and torch.count_nonzero(log_std) == 0
    learned = small_glow()
    perturb(learned)
    mean, log_std = learned.top_prior_params(3)
    assert mean.shape == (3, 24, 2, 2)
    assert torch.count_nonzero(mean[0] - mean[2]) == 0 and mean.abs().max() > 1e-3
    # A conv of zeros is its (scaled) bias: one learned mean and log-std per channel.
    expected = (learned.top_prior.conv.bias * torch.exp(3 * learned.top_prior.logs)).view(1, -1, 1, 1)
    torch.testing.assert_close(torch.cat([mean, log_std], 1), expected.expand(3, -1, 2, 2))


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_actnorm_not_reinitialised_after_load_state_dict(permutation):
    a = initialise(small_glow(permutation=permutation), rand_image((4, 3, 8, 8)))
    state = a.state_dict()
    b = small_glow(permutation=permutation)
    b.load_state_dict(state)
    layers = b.actnorm_layers()
    assert len(layers) == 4 and all(layer._initialized for layer in layers)
    b.train()
    skewed = rand_image((4, 3, 8, 8)) * 7 + 3
    with torch.no_grad():
        b(skewed)
    for key, value in state.items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)
    a.eval()
    b.eval()
    torch.testing.assert_close(b.log_prob(skewed), a.log_prob(skewed), rtol=0, atol=0)


def test_class_conditional_prior_sampling_and_head():
    model = small_glow(n_classes=3, class_head=True)
    x = rand_image((3, 3, 8, 8))
    y = torch.tensor([0, 1, 2])
    initialise(model, x, y)
    out = model(x, y)
    assert out.class_logits.shape == (3, 3)
    mean, log_std = model.top_prior_params(3, y)
    for i in range(3):
        for j in range(i):
            assert (mean[i] - mean[j]).abs().max() > 1e-3 and (log_std[i] - log_std[j]).abs().max() > 1e-3
    # Different labels give different densities and different T=0 samples ...
    assert (model.log_prob(x, torch.tensor([1, 1, 1])) - model.log_prob(x, y)).abs().max() > 1e-3
    samples = model.sample(3, temperature=0.0, y=y)
    assert (samples[0] - samples[1]).abs().max() > 1e-3
    # ... and the top latent of a T=0 sample is its own class's prior mean.
    with torch.no_grad():
        top = model.encode(samples, y)[-1]
    torch.testing.assert_close(top, mean, rtol=1e-4, atol=1e-5)
    same = model.sample(2, temperature=0.0, y=torch.tensor([2, 2]))
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    torch.testing.assert_close(same[0], samples[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_temperature(device):
    model = initialise(small_glow(device), rand_image((4, 3, 8, 8), device))
    a = model.sample(3, temperature=0.0)
    b = model.sample(3, temperature=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[2], rtol=0, atol=0)  # no noise at all: one image
    with torch.no_grad():
        zs = model.encode(a)
        kept = gnn.squeeze2d(a)
        for step in model.levels[0].steps:
            kept, _ = step(kept)
        split_mean, _ = model.levels[0].split.prior_params(kept[:, :6])
    top_mean, _ = model.top_prior_params(3)
    torch.testing.assert_close(zs[0], split_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zs[-1], top_mean, rtol=1e-4, atol=1e-5)
    warm = model.sample(3, temperature=0.7)
    assert warm.shape == (3, 3, 8, 8) and torch.isfinite(warm).all()
    assert (warm[0] - warm[1]).abs().max() > 1e-4
    assert not warm.requires_grad  # sample runs without autograd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_every_configuration_builds_runs_and_round_trips(permutation, coupling, device):
    model = small_glow(device, coupling=coupling, permutation=permutation)
    x = rand_image((4, 3, 8, 8), device)
    initialise(model, x)
    out = model(x)
    assert torch.isfinite(out.log_prob).all()
    out.log_prob.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        assert max_rel_error(model.decode(model.encode(x)), x) <= 1e-5
        assert model.sample(2).shape == (2, 3, 8, 8)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"image_size=12 is not divisible by 2\*\*L = 8"):
        Glow(image_size=12, K=1, L=3, hidden_channels=4)
    with pytest.raises(ValueError, match="unknown coupling 'volume'"):
        Glow(image_size=8, K=1, L=2, hidden_channels=4, coupling="volume")
    with pytest.raises(ValueError, match="unknown permutation 'random'"):
        Glow(image_size=8, K=1, L=2, hidden_channels=4, permutation="random")
    with pytest.raises(ValueError, match="class_head=True needs n_classes"):
        Glow(image_size=8, K=1, L=2, hidden_channels=4, class_head=True)
    with pytest.raises(ValueError, match="K must be a positive int"):
        Glow(image_size=8, K=0, L=2)
    with pytest.raises(ValueError, match="unknown coupling"):
        gnn.FlowStep(4, 8, coupling="volume")

    model = small_glow()
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\).*got \(2, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\).*got \(2, 3, 16, 16\)"):
        model.log_prob(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\)"):
        model.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="not class-conditional"):
        model(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"zs\[1\] must have shape \(N, 24, 2, 2\)"):
        model.decode([torch.zeros(2, 6, 4, 4), torch.zeros(2, 12, 2, 2)])
    with pytest.raises(ValueError, match="list of 2 latents"):
        model.decode([torch.zeros(2, 24, 2, 2)])

    conditional = small_glow(n_classes=4)
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pass labels y"):
        conditional(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values in \[0, 4\]"):
        conditional(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        conditional.sample(2, y=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        conditional(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        conditional(x, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.compile
def test_flow_step_compiles_fullgraph(device):
    """torch.compile(fullgraph=True) of one FlowStep (fused ActNorm+LU conv, affine coupling): no graph
    break, and forward, logdet and every gradient equal eager. ActNorm is initialised eagerly first."""
    torch._dynamo.reset()
    step = gnn.FlowStep(8, 16, "affine", "invconv_lu").to(device)
    x = rand_image((4, 8, 6, 6), device) * 3 + 1
    with torch.no_grad():
        step(x)  # the data-dependent init, eager
    perturb(step)
    compiled = torch.compile(step, fullgraph=True)

    def run(module):
        module.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, logdet = module(xi)
        weights = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
        ((y * weights).sum() + logdet.sum()).backward()
        return [y, logdet, xi.grad] + [p.grad.clone() for p in module.parameters()]

    eager = run(step)
    traced = run(compiled)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("coupling", [gnn.AffineCoupling, gnn.AdditiveCoupling])
def test_couplings_accept_images_with_no_pixels(coupling):
    """Found by tests/test_fuzz.py: conv2d used to refuse a 0-pixel-high or -wide input."""
    layer = coupling(5, 8)
    for shape in [(2, 5, 0, 3), (2, 5, 4, 0)]:
        x = torch.randn(shape)
        y, logdet = layer(x)
        assert y.shape == x.shape and torch.equal(logdet.expand(2), torch.zeros(2))
        assert layer.reverse(y).shape == x.shape


@pytest.mark.compile
def test_whole_glow_compiled_agrees_with_eager():
    """CompiledAfterInit: the first call initialises ActNorm eagerly, the later ones run the whole
    Glow forward + loss under torch.compile(fullgraph=True) (a graph break would raise) with the
    backward through AOTAutograd. Loss and every gradient equal eager's up to float32 rounding: the
    compiled graph fuses and reorders the sums of the priors and logdets, each a few ulp, which the
    backward through ~10 layers carries to the gradients (2e-7 seen here; tolerance 1e-4)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Glow(in_channels=3, image_size=8, K=1, L=2, hidden_channels=8)
    x = torch.rand(4, 3, 8, 8) - 0.5
    flow = CompiledAfterInit(model)
    assert not flow.compiled
    flow(x)  # eager: the data-dependent init
    assert flow.compiled and all(layer._initialized for layer in model.actnorm_layers())
    perturb(model)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = -fn(x).log_prob.mean()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(flow)
    assert max_rel_error(compiled_loss, eager_loss) < 1e-5
    assert max_rel_error(compiled_grads, eager_grads) < 1e-4
    assert eager_grads.abs().max() > 0
    assert flow.state_dict().keys() == {f"module.{k}" for k in model.state_dict()}


def test_compiled_after_init_refuses_the_reversible_mode():
    with pytest.raises(ValueError, match="reversible backprop runs eagerly"):
        CompiledAfterInit(Glow(in_channels=3, image_size=8, K=1, L=2, hidden_channels=8,
                               reversible=True))
