"""The anchor models of the benchmarks (rosinality-style and y0ast/Glow-PyTorch-style Glows): their
original-style layers and the glow_ext.compat drop-ins give the same model (same state_dict, same
outputs and gradients)."""
import pytest
import torch

from glow_ext.bench import anchor_rosinality as ros
from glow_ext.bench import anchor_y0ast as y0

from conftest import assert_rel_close


def _initialised_pair(make_model, compat_layers, seed, dtype):
    """An original-layer model, ActNorm-initialised and perturbed, and the same weights in a model
    with the compat layers."""
    torch.manual_seed(seed)
    original = make_model().to(dtype)
    compat = make_model(layers=compat_layers).to(dtype)
    x = torch.rand(4, 3, 8, 8, dtype=dtype) - 0.5
    original(x)  # data-dependent ActNorm init
    with torch.no_grad():  # make the zero-initialised convs non-trivial
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compat.load_state_dict(original.state_dict(), strict=True)
    return original, compat, x


def _pair(seed=0):
    return _initialised_pair(lambda **kw: ros.RosinalityGlow(3, 2, 2, 16, **kw), ros.compat_layers(),
                             seed, torch.float32)


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


# --- the y0ast/Glow-PyTorch-style anchor -----------------------------------------------------------


def _y0ast_pair(seed=0, dtype=torch.float32):
    return _initialised_pair(lambda **kw: y0.Y0astGlow((8, 8, 3), 16, 2, 2, **kw), y0.compat_layers(),
                             seed, dtype)


def test_y0ast_state_dicts_have_the_same_keys_shapes_and_dtypes():
    original, compat, _ = _y0ast_pair()
    a, b = original.state_dict(), compat.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert "flow.layers.1.invconv.lower" in a and "flow.layers.1.block.0.actnorm.logs" in a
    assert original.load_state_dict(compat.state_dict(), strict=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_y0ast_original_and_compat_layers_agree(dtype, tol):
    original, compat, x = _y0ast_pair(dtype=dtype)
    losses = []
    for model in (original, compat):
        _, bpd, _ = model(x)
        loss = y0.y0ast_loss(bpd)
        loss.backward()
        losses.append(loss.detach())
    assert_rel_close(losses[1], losses[0], tol / 10, "loss")
    for (name, p), q in zip(original.named_parameters(), compat.parameters()):
        assert_rel_close(q.grad, p.grad, tol, name)


def test_y0ast_reverse_reconstructs_the_input_and_samples():
    original, compat, x = _y0ast_pair(1)
    with torch.no_grad():
        for model in (original, compat):
            z, _, dropped = model(x)
            assert_rel_close(model.reverse(z, dropped), x, 1e-4, "reconstruction")
        samples = []
        for model in (original, compat):
            torch.manual_seed(3)
            samples.append(model.reverse(temperature=0.7, n=2))
    assert samples[0].shape == (2, 3, 8, 8) and torch.isfinite(samples[0]).all()
    assert_rel_close(samples[1], samples[0], 1e-4, "samples")
