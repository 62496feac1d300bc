"""The rosinality-style anchor model of the end-to-end benchmarks: its original-style layers and
the glow_ext.compat drop-ins give the same model (same state_dict, same outputs and gradients)."""
import torch

from glow_ext.bench import anchor_rosinality as ros

from conftest import assert_rel_close


def _pair(seed=0):
    torch.manual_seed(seed)
    original = ros.RosinalityGlow(3, 2, 2, 16)
    compat = ros.RosinalityGlow(3, 2, 2, 16, layers=ros.compat_layers())
    x = torch.rand(4, 3, 8, 8) - 0.5
    original(x)  # data-dependent ActNorm init
    with torch.no_grad():  # make the zero-initialised convs non-trivial
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compat.load_state_dict(original.state_dict(), strict=True)
    return original, compat, x


def test_original_and_compat_layers_agree():
    original, compat, x = _pair()
    losses = []
    for model in (original, compat):
        log_p, logdet, _ = model(x)
        loss = ros.rosinality_loss(log_p, logdet, 8, 256)
        loss.backward()
        losses.append(loss)
    assert_rel_close(losses[1], losses[0], 1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (original, compat)]
    assert_rel_close(grads[1], grads[0], 1e-4)


def test_reverse_reconstructs_the_input():
    original, compat, x = _pair(1)
    for model in (original, compat):
        with torch.no_grad():
            _, _, zs = model(x)
            assert_rel_close(model.reverse(zs, reconstruct=True), x, 1e-4)


def test_sampling_runs_the_priors():
    original, compat, _ = _pair(2)
    torch.manual_seed(3)
    eps = [0.7 * torch.randn(2, *shape) for shape in ros.z_shapes(3, 8, 2)]
    with torch.no_grad():
        samples = [model.reverse(eps) for model in (original, compat)]
    assert samples[0].shape == (2, 3, 8, 8) and torch.isfinite(samples[0]).all()
    assert_rel_close(samples[1], samples[0], 1e-4)


def test_z_shapes_match_the_forward():
    model = ros.RosinalityGlow(3, 1, 3, 8)
    _, _, zs = model(torch.rand(2, 3, 16, 16))
    assert [tuple(z.shape[1:]) for z in zs] == ros.z_shapes(3, 16, 3)
