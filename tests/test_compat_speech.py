"""The speech drop-ins (glow_ext.compat.waveglow, .glow_tts, .radtts) against the reference modules
of glow_ext.bench.anchor_speech, written from the originals' documented behaviour (plain PyTorch:
conv1d / conv2d with the weight, torch.logdet, torch.inverse, the originals' regroup and masks,
their inverse caching).

Each reference gets perturbed random parameters; its state_dict is loaded (strict) into the
drop-in, and outputs, log-determinants, inverses and gradients are compared in float64. Errors
are max |a − b| / max |b| (conftest.max_rel_error).
"""
import pytest
import torch

from glow_ext.bench.anchor_speech import (RefActNorm, RefCoquiInvConvNear, RefInvConvNear, RefLUS,
                                          RefWaveGlowConv, random_rotation)
from glow_ext.compat import glow_tts, radtts, waveglow

from conftest import DEVICES, assert_rel_close

VALUE_TOL = 1e-10  # float64 outputs, log-determinants, inverses
GRAD_TOL = 1e-8    # float64 gradients


pytestmark = pytest.mark.usefixtures("no_tf32")  # the references' products in true float32


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _load_both_ways(reference, ours):
    """Strict loads both ways; ours then holds the reference's values."""
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    reference.load_state_dict(ours.state_dict(), strict=True)


def _grads(module, inputs, outputs, weights):
    """Gradients of Σ weight·output (outputs that are None or numbers skipped) w.r.t. the inputs
    and the trainable parameters, in parameter-name order."""
    loss = sum((w * o).sum() for w, o in zip(weights, outputs) if isinstance(o, torch.Tensor))
    params = [p for _, p in sorted(module.named_parameters()) if p.requires_grad]
    return torch.autograd.grad(loss, list(inputs) + params)


def _assert_all_close(actual, expected, tol, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, tol, f"{what}[{i}]")


def _random_mask(b, t, device):
    """(B, 1, T) 0/1 mask with random lengths in [1, T], the longest T."""
    lengths = torch.randint(1, t + 1, (b,))
    lengths[0] = t
    return (torch.arange(t).view(1, -1) < lengths.view(-1, 1)).to(torch.float64).unsqueeze(1).to(device)


# ----------------------------------------------------------------------------------------------
# WaveGlow

def _waveglow_pair(c, device):
    reference = RefWaveGlowConv(c)
    _perturb(reference)
    ours = waveglow.Invertible1x1Conv(c)
    _load_both_ways(reference, ours)
    return reference.double().to(device), ours.double().to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_waveglow_state_dict_is_conv_weight(device):
    ours = waveglow.Invertible1x1Conv(6).to(device)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {"conv.weight": (6, 6, 1)}
    weight = ours.conv.weight.detach().squeeze(2).double()
    assert torch.det(weight) > 0
    assert_rel_close(weight @ weight.T, torch.eye(6, dtype=torch.float64, device=device), 1e-6,
                     "rotation init")


@pytest.mark.parametrize("device", DEVICES)
def test_waveglow_matches_reference(device):
    reference, ours = _waveglow_pair(8, device)
    z = torch.randn(3, 8, 37, dtype=torch.float64, device=device)
    y_ref, logdet_ref = reference(z)
    y, logdet = ours(z)
    assert logdet.shape == ()
    assert_rel_close(y, y_ref, VALUE_TOL, "y")
    assert_rel_close(logdet, logdet_ref, VALUE_TOL, "logdet")
    assert_rel_close(ours(y, reverse=True), reference(y, reverse=True), VALUE_TOL, "reverse")
    assert_rel_close(ours.infer(y), z, VALUE_TOL, "infer round trip")
    ours._invert()
    assert_rel_close(ours.W_inverse, reference.W_inverse, VALUE_TOL, "W_inverse")


@pytest.mark.parametrize("device", DEVICES)
def test_waveglow_gradients_match_reference(device):
    reference, ours = _waveglow_pair(8, device)
    z = torch.randn(2, 8, 23, dtype=torch.float64, device=device, requires_grad=True)
    weights = (torch.randn(2, 8, 23, dtype=torch.float64, device=device), 0.7)
    expected = _grads(reference, [z], reference(z), weights)
    _assert_all_close(_grads(ours, [z], ours(z), weights), expected, GRAD_TOL, "forward grads")
    # Reverse: the reference's first reverse call still differentiates through its inverse.
    weight = weights[0]
    expected = _grads(reference, [z], [reference(z, reverse=True)], [weight])
    _assert_all_close(_grads(ours, [z], [ours(z, reverse=True)], [weight]), expected, GRAD_TOL,
                      "reverse grads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam_fused"])
def test_waveglow_inverse_follows_training_where_reference_goes_stale(device, optimizer):
    reference, ours = _waveglow_pair(8, device)
    z = torch.randn(2, 8, 19, dtype=torch.float64, device=device)
    with torch.no_grad():
        reference(z, reverse=True)
        ours(z, reverse=True)  # fills the caches
    for module in (reference, ours):
        opt = (torch.optim.SGD(module.parameters(), lr=0.1) if optimizer == "sgd"
               else torch.optim.Adam(module.parameters(), lr=0.1, fused=True))
        y, logdet = module(z)
        ((y * y).sum() - logdet).backward()
        opt.step()
    assert_rel_close(ours.conv.weight, reference.conv.weight, GRAD_TOL, "stepped weight")
    with torch.no_grad():
        y, _ = ours(z)
        assert_rel_close(ours(y, reverse=True), z, VALUE_TOL, "ours after a step")
        stale = (reference(reference(z)[0], reverse=True) - z).abs().max().item()
    assert stale > 1e-3, "the reference was expected to keep its first inverse"


@pytest.mark.parametrize("device", DEVICES)
def test_waveglow_logdet_is_log_abs_det_where_logdet_is_nan(device):
    reference, ours = _waveglow_pair(4, device)
    with torch.no_grad():
        flipped = random_rotation(4, det_sign=-1.0).to(device).unsqueeze(2)
        reference.conv.weight.copy_(flipped)
        ours.conv.weight.copy_(flipped)
    z = torch.randn(2, 4, 5, dtype=torch.float64, device=device)
    assert torch.isnan(reference(z)[1])
    assert abs(ours(z)[1].item()) < 1e-10  # |det| = 1
    assert_rel_close(ours(ours(z)[0], reverse=True), z, VALUE_TOL, "round trip")


# ----------------------------------------------------------------------------------------------
# Glow-TTS

def _glow_tts_pair(make_reference, make_ours, device):
    reference = make_reference()
    _perturb(reference)
    ours = make_ours()
    _load_both_ways(reference, ours)
    return reference.double().to(device), ours.double().to(device)


def _actnorm_pair(c, device):
    return _glow_tts_pair(lambda: RefActNorm(c), lambda: glow_tts.ActNorm(c), device)


def _invconv_pairs(c, device):
    """jaywalnut310's InvConvNear (n_split 4) and coqui's (num_splits 6): c divisible by 12."""
    return [
        _glow_tts_pair(lambda: RefInvConvNear(c, 4), lambda: glow_tts.InvConvNear(c, 4), device),
        _glow_tts_pair(lambda: RefCoquiInvConvNear(c, 6),
                       lambda: glow_tts.CoquiInvConvNear(c, num_splits=6), device),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [True, False])
def test_glow_tts_matches_reference(device, masked):
    c, t = 24, 17
    x = torch.randn(4, c, t, dtype=torch.float64, device=device) + 0.3
    x_mask = _random_mask(4, t, device) if masked else None
    for reference, ours in [_actnorm_pair(c, device)] + _invconv_pairs(c, device):
        name = type(ours).__name__
        z_ref, logdet_ref = reference(x, x_mask, g=None)
        z, logdet = ours(x, x_mask, g=None)
        assert logdet.shape == (4,)
        assert_rel_close(z, z_ref, VALUE_TOL, f"{name} z")
        assert_rel_close(logdet, logdet_ref, VALUE_TOL, f"{name} logdet")
        x_back, none = ours(z, x_mask, reverse=True)
        assert none is None
        assert_rel_close(x_back, reference(z, x_mask, reverse=True)[0], VALUE_TOL, f"{name} reverse")
        assert_rel_close(x_back, x if x_mask is None else x * x_mask, VALUE_TOL, f"{name} round trip")
        if masked:
            assert torch.all(z * (1 - x_mask) == 0), f"{name}: padded positions not zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_glow_tts_gradients_match_reference(device, reverse):
    c, t = 12, 13
    x_mask = _random_mask(3, t, device)
    for reference, ours in [_actnorm_pair(c, device)] + _invconv_pairs(c, device):
        x = torch.randn(3, c, t, dtype=torch.float64, device=device, requires_grad=True)
        weights = (torch.randn(3, c, t, dtype=torch.float64, device=device),
                   torch.randn(3, dtype=torch.float64, device=device))
        expected = _grads(reference, [x], reference(x, x_mask, reverse=reverse), weights)
        actual = _grads(ours, [x], ours(x, x_mask, reverse=reverse), weights)
        _assert_all_close(actual, expected, GRAD_TOL, f"{type(ours).__name__} grads")


@pytest.mark.parametrize("device", DEVICES)
def test_invconv_near_gives_a_differentiable_mask_its_gradient(device):
    reference, ours = _invconv_pairs(12, device)[0]
    x = torch.randn(2, 12, 9, dtype=torch.float64, device=device)
    x_mask = (_random_mask(2, 9, device) * (1 + torch.rand(2, 1, 9, dtype=torch.float64,
                                                             device=device))).requires_grad_()
    weights = (torch.randn(2, 12, 9, dtype=torch.float64, device=device),
               torch.randn(2, dtype=torch.float64, device=device))
    expected = _grads(reference, [x_mask], reference(x, x_mask), weights)
    _assert_all_close(_grads(ours, [x_mask], ours(x, x_mask), weights), expected, GRAD_TOL,
                      "mask grads")


@pytest.mark.parametrize("device", DEVICES)
def test_glow_tts_actnorm_data_dependent_init_matches_reference(device):
    c, t = 12, 21
    x = (torch.randn(3, c, t, dtype=torch.float64) * 2 + 1).to(device)
    x_mask = _random_mask(3, t, device)
    reference, ours = RefActNorm(c, ddi=True).double().to(device), glow_tts.ActNorm(c, ddi=True)
    ours = ours.double().to(device)
    z_ref, logdet_ref = reference(x, x_mask)
    z, logdet = ours(x, x_mask)
    assert ours.initialized
    assert_rel_close(ours.logs, reference.logs, VALUE_TOL, "logs")
    assert_rel_close(ours.bias, reference.bias, VALUE_TOL, "bias")
    assert_rel_close(z, z_ref, VALUE_TOL, "z")
    valid = z.transpose(0, 1)[x_mask.transpose(0, 1).expand(c, -1, -1) > 0].view(c, -1)
    assert torch.allclose(valid.mean(1), torch.zeros_like(valid[:, 0]), atol=1e-8)
    assert torch.allclose(valid.var(1, unbiased=False), torch.ones_like(valid[:, 0]), atol=1e-8)


def test_glow_tts_actnorm_loaded_checkpoint_is_not_reinitialised():
    source = RefActNorm(6)
    _perturb(source)
    ours = glow_tts.ActNorm(6, ddi=True)
    ours.load_state_dict(source.state_dict(), strict=True)
    assert ours.initialized
    x = torch.randn(2, 6, 5)
    assert_rel_close(ours(x)[0], source(x)[0], 1e-6, "loaded ActNorm")
    ours.set_ddi(True)
    assert not ours.initialized


@pytest.mark.parametrize("device", DEVICES)
def test_invconv_near_no_jacobian_and_store_inverse(device):
    reference, ours = _invconv_pairs(12, device)[0]
    ours.no_jacobian = reference.no_jacobian = True
    x = torch.randn(2, 12, 5, dtype=torch.float64, device=device)
    assert ours(x)[1] == 0 and reference(x)[1] == 0
    ours.store_inverse()
    assert "weight_inv" not in ours.state_dict()


@pytest.mark.parametrize("device", DEVICES)
def test_coqui_weight_inv_state_dict_loads_both_ways(device):
    reference = RefCoquiInvConvNear(8, num_splits=4)
    _perturb(reference)
    ours = glow_tts.CoquiInvConvNear(8, num_splits=4)
    assert ours.weight_inv is None and ours.num_splits == 4
    _load_both_ways(reference, ours)  # before store_inverse: only `weight`
    reference.store_inverse()
    _load_both_ways(reference, ours)  # after: `weight`, `weight_inv`
    assert list(ours.state_dict()) == ["weight", "weight_inv"]
    assert_rel_close(ours.weight_inv, reference.weight_inv, 1e-6, "weight_inv")
    fresh = glow_tts.CoquiInvConvNear(8, num_splits=4)
    fresh.store_inverse()
    with pytest.raises(RuntimeError):  # as coqui's: weight_inv is unexpected before store_inverse()
        RefCoquiInvConvNear(8, num_splits=4).load_state_dict(fresh.state_dict(), strict=True)


@pytest.mark.parametrize("device", DEVICES)
def test_coqui_inverse_follows_training_where_reference_goes_stale(device):
    reference, ours = _invconv_pairs(12, device)[1]
    reference.store_inverse()
    ours.store_inverse()
    x = torch.randn(2, 12, 11, dtype=torch.float64, device=device)
    for module in (reference, ours):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        z, logdet = module(x)
        ((z * z).sum() - logdet.sum()).backward()
        opt.step()
    with torch.no_grad():
        assert_rel_close(ours(ours(x)[0], reverse=True)[0], x, VALUE_TOL, "ours after a step")
        stale = (reference(reference(x)[0], reverse=True)[0] - x).abs().max().item()
        assert_rel_close(ours.state_dict()["weight_inv"], torch.inverse(ours.weight), VALUE_TOL,
                         "saved weight_inv is current")
    assert stale > 1e-3, "the reference was expected to keep its stored inverse"


# ----------------------------------------------------------------------------------------------
# RADTTS

def _radtts_pair(c, device, cache_inverse=False):
    reference = RefLUS(c, cache_inverse)
    _perturb(reference)
    ours = radtts.Invertible1x1ConvLUS(c, cache_inverse)
    _load_both_ways(reference, ours)
    return reference.double().to(device), ours.double().to(device)


def _set_lower_diag(modules, kind):
    """lower_diag of every module: ones (as built), or random values of either sign."""
    if kind == "random":
        values = torch.rand(8, dtype=torch.float64) + 0.5
        values[::3] *= -1
        for module in modules:
            module.lower_diag.copy_(values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lower_diag", ["ones", "random"])
def test_radtts_matches_reference(device, lower_diag):
    reference, ours = _radtts_pair(8, device)
    _set_lower_diag((reference, ours), lower_diag)
    z = torch.randn(3, 8, 29, dtype=torch.float64, device=device)
    y_ref, logdet_ref = reference(z)
    y, logdet = ours(z)
    assert logdet.shape == ()
    assert_rel_close(y, y_ref, VALUE_TOL, "y")
    assert_rel_close(logdet, logdet_ref, VALUE_TOL, "logdet")
    with torch.no_grad():
        assert_rel_close(ours(y, inverse=True), reference(y, inverse=True), VALUE_TOL, "inverse")
    assert_rel_close(ours(y, inverse=True), z, VALUE_TOL, "round trip (autograd path)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("lower_diag", ["ones", "random"])
def test_radtts_gradients_match_reference(device, inverse, lower_diag):
    reference, ours = _radtts_pair(8, device)
    _set_lower_diag((reference, ours), lower_diag)
    z = torch.randn(2, 8, 15, dtype=torch.float64, device=device, requires_grad=True)
    weights = (torch.randn(2, 8, 15, dtype=torch.float64, device=device), 0.6)

    def outputs(module):
        result = module(z, inverse=inverse)
        return [result] if inverse else result
    expected = _grads(reference, [z], outputs(reference), weights)
    _assert_all_close(_grads(ours, [z], outputs(ours), weights), expected, GRAD_TOL, "grads")


@pytest.mark.parametrize("device", DEVICES)
def test_radtts_cached_inverse_follows_training_where_reference_goes_stale(device):
    reference, ours = _radtts_pair(8, device, cache_inverse=True)
    z = torch.randn(2, 8, 11, dtype=torch.float64, device=device)
    with torch.no_grad():
        reference(z, inverse=True)
        ours(z, inverse=True)
    for module in (reference, ours):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        y, logdet = module(z)
        ((y * y).sum() - logdet).backward()
        opt.step()
    with torch.no_grad():
        assert_rel_close(ours(ours(z)[0], inverse=True), z, VALUE_TOL, "ours after a step")
        stale = (reference(reference(z)[0], inverse=True) - z).abs().max().item()
    assert stale > 1e-3, "the reference was expected to keep its cached inverse"


def test_radtts_rejects_a_non_permutation_p():
    ours = radtts.Invertible1x1ConvLUS(4)
    ours.p.mul_(0.5)
    with pytest.raises(ValueError, match="permutation"):
        ours(torch.randn(1, 4, 3))


# ----------------------------------------------------------------------------------------------
# The peers' real sizes, float32.

@pytest.mark.parametrize("device", DEVICES)
def test_real_sizes_smoke(device):
    reference, ours = RefWaveGlowConv(8).to(device), waveglow.Invertible1x1Conv(8).to(device)
    ours.load_state_dict(reference.state_dict())
    z = torch.randn(12, 8, 2000, device=device)
    y, logdet = ours(z)
    assert y.shape == (12, 8, 2000) and logdet.shape == ()
    assert_rel_close(y, reference(z)[0], 1e-5, "WaveGlow y")
    assert_rel_close(ours(y, reverse=True), z, 1e-5, "WaveGlow round trip")

    x_mask = _random_mask(4, 50, device).float()
    x = torch.randn(4, 160, 50, device=device)
    for reference, ours in ((RefActNorm(160), glow_tts.ActNorm(160)),
                            (RefInvConvNear(160, 4), glow_tts.InvConvNear(160, 4))):
        _perturb(reference)
        ours.load_state_dict(reference.state_dict())
        reference, ours = reference.to(device), ours.to(device)
        z, logdet = ours(x, x_mask)
        assert z.shape == (4, 160, 50) and logdet.shape == (4,)
        assert_rel_close(z, reference(x, x_mask)[0], 1e-5, f"{type(ours).__name__} z")
        assert_rel_close(ours(z, x_mask, reverse=True)[0], x * x_mask, 1e-5, "round trip")


def _init_on_rank(rank, init_file, shards, masks, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=len(shards))
    try:
        layer = glow_tts.ActNorm(shards[rank].shape[1], ddi=True).double()
        layer(shards[rank], masks[rank])
        results[rank] = (layer.logs.detach().clone(), layer.bias.detach().clone())
    finally:
        torch.distributed.destroy_process_group()


def test_glow_tts_actnorm_init_under_distributed_sees_every_rank(tmp_path):
    """Two ranks with different batches and valid lengths initialise from the union's masked
    statistics (sums over ranks, not an average of per-rank means)."""
    import torch.multiprocessing as mp

    shards = [torch.randn(2, 5, 9, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    masks = [_random_mask(2, 9, "cpu"), _random_mask(2, 9, "cpu")]
    masks[1][:, :, 3:] = 0  # rank 1 holds far fewer valid steps
    results = mp.Manager().dict()
    mp.spawn(_init_on_rank, args=(str(tmp_path / "init"), shards, masks, results), nprocs=2)
    reference = RefActNorm(5, ddi=True).double()
    # The union as one batch: time-concatenation keeps each sample's masked steps.
    reference(torch.cat(shards, 2), torch.cat(masks, 2))
    for rank in range(2):
        logs, bias = results[rank]
        assert_rel_close(logs, reference.logs, VALUE_TOL, f"rank {rank} logs")
        assert_rel_close(bias, reference.bias, VALUE_TOL, f"rank {rank} bias")
