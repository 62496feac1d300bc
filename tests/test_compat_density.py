"""The normflows and nflows drop-ins (glow_ext.compat.normflows, glow_ext.compat.nflows) against
the installed originals: strict state_dict exchange both ways, outputs, log-determinants,
inverses and gradients, caches after optimizer steps and load_state_dict, and whole models.

The originals' parameters are perturbed randomly first, so that identity or rotation inits hide
no mapping error (a transposed factor, a misplaced permutation or bias). Errors are
max |a − b| / max |b| (conftest.max_rel_error).
"""
import warnings

import pytest
import torch

nf = pytest.importorskip("normflows")
nflows = pytest.importorskip("nflows")
from nflows import transforms as nflows_transforms  # noqa: E402
from nflows.distributions import StandardNormal  # noqa: E402
from nflows.flows import Flow as NflowsFlow  # noqa: E402
from nflows.nn.nets import ResidualNet  # noqa: E402

from glow_ext.compat import nflows as our_nflows  # noqa: E402
from glow_ext.compat import normflows as our_normflows  # noqa: E402

from conftest import DEVICES, assert_rel_close, make_generator  # noqa: E402

BATCH = 7
HEIGHT, WIDTH = 3, 4
CHANNELS = [2, 5, 16, 64]
VALUE_TOL = 1e-10   # float64 outputs, log-determinants, inverses
GRAD_TOL = 1e-8     # float64 gradients
FLOAT32_TOL = 1e-5  # float32 against float32

# (id, original class, our class, constructor kwargs, 4-D input, the density-direction method)
VARIANTS = [
    ("normflows-Invertible1x1Conv-dense", nf.flows.Invertible1x1Conv,
     our_normflows.Invertible1x1Conv, dict(use_lu=False), True, "inverse"),
    ("normflows-Invertible1x1Conv-lu", nf.flows.Invertible1x1Conv,
     our_normflows.Invertible1x1Conv, dict(use_lu=True), True, "inverse"),
    ("normflows-InvertibleAffine-dense", nf.flows.InvertibleAffine,
     our_normflows.InvertibleAffine, dict(use_lu=False), False, "inverse"),
    ("normflows-InvertibleAffine-lu", nf.flows.InvertibleAffine,
     our_normflows.InvertibleAffine, dict(use_lu=True), False, "inverse"),
    ("nflows-LULinear", nflows_transforms.LULinear, our_nflows.LULinear, {}, False, "forward"),
    ("nflows-OneByOneConvolution", nflows_transforms.OneByOneConvolution,
     our_nflows.OneByOneConvolution, {}, True, "forward"),
]
VARIANT_PARAMS = [pytest.param(v, id=v[0]) for v in VARIANTS]
NFLOWS_VARIANTS = [p for p in VARIANT_PARAMS if p.values[0][0].startswith("nflows")]
DIRECTIONS = ["forward", "inverse"]

# Scale of the random perturbation per parameter name, times 1/sqrt(C) for matrix-like entries.
MATRIX_PERTURBATION = {"W": 0.3, "L": 0.3, "U": 0.3, "lower_entries": 0.3, "upper_entries": 0.3}
VECTOR_PERTURBATION = {"log_S": 0.1, "unconstrained_upper_diag": 0.5, "bias": 1.0}


@pytest.fixture(autouse=True)
def _quiet_originals():
    """The originals call deprecated torch functions (torch.lu, torch.triangular_solve)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@torch.no_grad()
def perturb(module, seed):
    """Adds random noise to every parameter of a normflows or nflows layer (well conditioned)."""
    g = make_generator(seed)
    channels = module.num_channels if hasattr(module, "num_channels") else module.features
    for name, param in module.named_parameters():
        if name in MATRIX_PERTURBATION:
            scale = MATRIX_PERTURBATION[name] / channels ** 0.5
        else:
            scale = VECTOR_PERTURBATION[name]
        noise = torch.randn(param.shape, generator=g, dtype=torch.float64)
        param.add_((scale * noise).to(param))


def make_pair(variant, channels, dtype=torch.float64, device="cpu", seed=11):
    """(original, ours) with the original's perturbed state loaded strictly into ours."""
    _, original_class, our_class, kwargs, _, _ = variant
    original = original_class(channels, **kwargs).to(device=device, dtype=dtype)
    perturb(original, seed)
    ours = our_class(channels, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(original.state_dict(), strict=True)
    return original, ours


def make_inputs(variant, channels, dtype=torch.float64, device="cpu", seed=4321):
    shape = (BATCH, channels, HEIGHT, WIDTH) if variant[4] else (BATCH, channels)
    x = torch.randn(shape, generator=make_generator(seed), dtype=torch.float64) + 0.5
    return x.to(device=device, dtype=dtype)


def density(module, variant):
    return getattr(module, variant[5])


def sampling(module, variant):
    return getattr(module, "forward" if variant[5] == "inverse" else "inverse")


# ----------------------------------------------------------------------------------------------
# State dicts

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_state_dicts_load_strictly_both_ways(variant, channels, device):
    original, ours = make_pair(variant, channels, device=device)
    theirs, mine = original.state_dict(), ours.state_dict()
    assert list(theirs) == list(mine)
    for key in theirs:
        assert mine[key].shape == theirs[key].shape and mine[key].dtype == theirs[key].dtype, key
        assert torch.equal(mine[key], theirs[key]), key
    fresh_original = variant[1](channels, **variant[3]).to(device=device, dtype=torch.float64)
    fresh_original.load_state_dict(ours.state_dict(), strict=True)
    x = make_inputs(variant, channels, device=device)
    assert_rel_close(density(ours, variant)(x)[0], density(fresh_original, variant)(x)[0],
                     VALUE_TOL, "output after loading ours into the original")


# ----------------------------------------------------------------------------------------------
# Values and gradients, float64

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autograd", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_outputs_and_log_dets_match(variant, channels, direction, autograd, device):
    original, ours = make_pair(variant, channels, device=device)
    x = make_inputs(variant, channels, device=device)
    expected, expected_log_det = getattr(original, direction)(x)
    with torch.set_grad_enabled(autograd):
        actual, actual_log_det = getattr(ours, direction)(x)
    assert actual_log_det.shape == expected_log_det.shape
    assert actual.dtype == expected.dtype and actual_log_det.dtype == expected_log_det.dtype
    assert_rel_close(actual, expected, VALUE_TOL, f"{direction} output")
    assert_rel_close(actual_log_det, expected_log_det, VALUE_TOL, f"{direction} log_det")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_gradients_match(variant, channels, direction, device):
    original, ours = make_pair(variant, channels, device=device)
    x = make_inputs(variant, channels, device=device)
    output_weights = torch.randn(x.shape, generator=make_generator(99), dtype=torch.float64)
    output_weights = output_weights.to(device)
    grads = []
    for module in (original, ours):
        x_leaf = x.clone().requires_grad_()
        output, log_det = getattr(module, direction)(x_leaf)
        loss = (output * output_weights).sum() + 0.7 * log_det.sum()
        loss.backward()
        grads.append({"input": x_leaf.grad, **{n: p.grad for n, p in module.named_parameters()}})
    expected, actual = grads
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name] is not None, name
        assert_rel_close(actual[name], expected[name], GRAD_TOL, f"{direction} grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autograd", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_round_trip(variant, channels, autograd, device):
    _, ours = make_pair(variant, channels, device=device)
    x = make_inputs(variant, channels, device=device)
    with torch.set_grad_enabled(autograd):
        z, log_det = density(ours, variant)(x)
        x_back, log_det_back = sampling(ours, variant)(z)
    assert_rel_close(x_back, x, VALUE_TOL, "x -> z -> x")
    assert_rel_close(log_det_back, -log_det, VALUE_TOL, "log_det of the sampling direction")


# ----------------------------------------------------------------------------------------------
# Caches

def _take_optimizer_step(module, variant, x, fused):
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05, fused=fused)
    output, log_det = density(module, variant)(x)
    (output.square().sum() - log_det.sum()).backward()
    optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused_adam"])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_inverse_follows_optimizer_steps_and_loads(variant, fused, device):
    """The sampling direction without autograd uses a cached inverse: it must be that of the
    current parameters after an optimizer step (fused ones bump no version counter) and after
    load_state_dict."""
    channels = 5
    _, ours = make_pair(variant, channels, device=device)
    x = make_inputs(variant, channels, device=device)
    ours.eval()
    with torch.no_grad():
        sampling(ours, variant)(x)  # fills the cache
    _take_optimizer_step(ours, variant, x, fused)
    reference = variant[1](channels, **variant[3]).to(device=device, dtype=torch.float64)
    reference.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert_rel_close(sampling(ours, variant)(x)[0], sampling(reference, variant)(x)[0],
                         VALUE_TOL, "sampling direction after an optimizer step")
    perturb(reference, seed=77)
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        assert_rel_close(sampling(ours, variant)(x)[0], sampling(reference, variant)(x)[0],
                         VALUE_TOL, "sampling direction after load_state_dict")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", NFLOWS_VARIANTS)
def test_nflows_cache_goes_stale_after_load_state_dict_ours_does_not(variant, device):
    """nflows' cache (eval mode, using_cache=True) keeps W and W⁻¹ across load_state_dict; ours
    follows the loaded parameters in both directions. In float32: nflows builds its cached W⁻¹
    from a float32 identity on the CPU, which fails for float64 parameters, so only its forward
    cache is exercised on other devices."""
    channels = 5
    original, ours = make_pair(variant, channels, dtype=torch.float32, device=device)
    x = make_inputs(variant, channels, dtype=torch.float32, device=device)
    truth = variant[1](channels).to(device=device)
    perturb(truth, seed=78)
    truth.eval()
    directions = DIRECTIONS if device == "cpu" else ["forward"]
    for module in (original, ours):
        module.use_cache(True)
        module.eval()
        with torch.no_grad():
            for direction in directions:
                getattr(module, direction)(x)  # fills the caches
        module.load_state_dict(truth.state_dict(), strict=True)
    with torch.no_grad():
        for direction in directions:
            expected = getattr(truth, direction)(x)[0]
            stale = getattr(original, direction)(x)[0]
            assert not torch.allclose(stale, expected), f"nflows' {direction} cache was refreshed"
            assert_rel_close(getattr(ours, direction)(x)[0], expected, FLOAT32_TOL,
                             f"ours, {direction} after load_state_dict")


# ----------------------------------------------------------------------------------------------
# float32, special cases, whole models

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_float32_matches(variant, channels, direction, device):
    """Outputs against the float32 original; log-determinants against the float64 original of
    the same (float32) parameters: normflows' dense slogdet runs in W's dtype (seen: 3e-5 relative
    error on a small log|det W|), ours in float64."""
    original, ours = make_pair(variant, channels, dtype=torch.float32, device=device)
    x = make_inputs(variant, channels, dtype=torch.float32, device=device)
    expected = getattr(original, direction)(x)[0]
    expected_log_det = getattr(original.double(), direction)(x.double())[1]
    actual, actual_log_det = getattr(ours, direction)(x)
    assert actual.dtype == torch.float32
    assert_rel_close(actual, expected, FLOAT32_TOL, f"{direction} output")
    assert_rel_close(actual_log_det, expected_log_det, FLOAT32_TOL, f"{direction} log_det")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [p for p in VARIANT_PARAMS if p.values[0][0].endswith("dense")])
def test_dense_weight_with_negative_determinant(variant, device):
    """log|det W| is finite for det W < 0, in normflows (slogdet) and here."""
    original, ours = make_pair(variant, 5, device=device)
    with torch.no_grad():
        if torch.linalg.det(original.W) > 0:
            original.W[0].neg_()
    ours.load_state_dict(original.state_dict(), strict=True)
    x = make_inputs(variant, 5, device=device)
    for direction in DIRECTIONS:
        expected, expected_log_det = getattr(original, direction)(x)
        actual, actual_log_det = getattr(ours, direction)(x)
        assert torch.isfinite(actual_log_det).all()
        assert_rel_close(actual, expected, VALUE_TOL, f"{direction} output")
        assert_rel_close(actual_log_det, expected_log_det, VALUE_TOL, f"{direction} log_det")


@pytest.mark.parametrize("variant", [p for p in VARIANT_PARAMS if p.values[0][0].endswith("-lu")])
def test_normflows_lu_rejects_a_non_permutation_p(variant):
    _, ours = make_pair(variant, 5)
    with torch.no_grad():
        ours.P[0, 0] += 0.5
    x = make_inputs(variant, 5)
    with pytest.raises(ValueError, match="permutation matrix"):
        ours.inverse(x)


def _swap_invertible_1x1_convs(model, use_lu):
    for block in model.flows:
        block.flows[1] = our_normflows.Invertible1x1Conv(block.flows[1].num_channels, use_lu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_lu", [False, True], ids=["dense", "lu"])
def test_normflows_glow_model_log_prob(use_lu, device):
    """A normflows Glow (two GlowBlocks) with its Invertible1x1Convs replaced by ours gives the
    same log_prob, gradients and samples' inverse."""
    channels = 6
    shape = (channels, HEIGHT, WIDTH)

    def build():
        blocks = [nf.flows.GlowBlock(channels, 8, init_zeros=False, use_lu=use_lu)
                  for _ in range(2)]
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(shape), blocks).to(
            device=device, dtype=torch.float64)

    original = build()
    for block in original.flows:
        perturb(block.flows[1], seed=5)
    x = make_inputs(VARIANTS[0], channels, device=device)
    with torch.no_grad():
        original.log_prob(x)  # ActNorm's data-dependent init
    ours = build()
    _swap_invertible_1x1_convs(ours, use_lu)
    ours.to(device=device, dtype=torch.float64)
    ours.load_state_dict(original.state_dict(), strict=True)
    losses = []
    for model in (original, ours):
        loss = -model.log_prob(x)
        loss.sum().backward()
        losses.append(loss.detach())
    assert_rel_close(losses[1], losses[0], VALUE_TOL, "log_prob")
    for (name, p_ours), (_, p_original) in zip(ours.named_parameters(),
                                              original.named_parameters()):
        assert_rel_close(p_ours.grad, p_original.grad, GRAD_TOL, f"grad of {name}")
    with torch.no_grad():
        z = torch.randn((BATCH,) + shape, generator=make_generator(3), dtype=torch.float64)
        z = z.to(device)
        assert_rel_close(ours.forward(z), original.forward(z), VALUE_TOL, "sampling")


@pytest.mark.parametrize("device", DEVICES)
def test_nflows_flow_log_prob(device):
    """An nflows Flow (LULinear, coupling, LULinear) with the LULinears replaced by ours gives the
    same log_prob."""
    features = 6

    def build(lu_linear):
        mask = torch.arange(features) % 2
        coupling = nflows_transforms.AffineCouplingTransform(
            mask, lambda c_in, c_out: ResidualNet(c_in, c_out, hidden_features=16, num_blocks=1))
        transform = nflows_transforms.CompositeTransform(
            [lu_linear(features), coupling, lu_linear(features)])
        return NflowsFlow(transform, StandardNormal([features])).to(device=device,
                                                                    dtype=torch.float64)

    original = build(nflows_transforms.LULinear)
    for layer in (original._transform._transforms[0], original._transform._transforms[2]):
        perturb(layer, seed=6)
    ours = build(our_nflows.LULinear)
    ours.load_state_dict(original.state_dict(), strict=True)
    x = make_inputs(VARIANTS[4], features, device=device)
    assert_rel_close(ours.log_prob(x), original.log_prob(x), VALUE_TOL, "log_prob")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", NFLOWS_VARIANTS)
def test_nflows_weight_and_logabsdet_match(variant, device):
    original, ours = make_pair(variant, 5, device=device)
    assert_rel_close(ours.weight(), original.weight(), VALUE_TOL, "weight()")
    assert_rel_close(ours.logabsdet(), original.logabsdet(), VALUE_TOL, "logabsdet()")
    assert_rel_close(ours.upper_diag, original.upper_diag, VALUE_TOL, "upper_diag")


@pytest.mark.parametrize("transposed", [False, True], ids=["x-WT", "x-W"])
@pytest.mark.parametrize("permuted", [False, True], ids=["identity", "perm"])
def test_lu_sample_map_gradcheck(permuted, transposed):
    from glow_ext.compat._lu_samples import lu_sample_map

    g = make_generator(21)
    C = 5
    x, lower, upper = (torch.randn(shape, generator=g, dtype=torch.float64)
                       for shape in ((BATCH, C), (C, C), (C, C)))
    log_s, bias = (0.3 * torch.randn(C, generator=g, dtype=torch.float64) for _ in range(2))
    sign_s = torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0).double()
    perm = torch.randperm(C, generator=g) if permuted else None
    inverse_perm = None if perm is None else torch.argsort(perm)
    inputs = [t.requires_grad_() for t in (x, lower, upper, log_s, bias)]

    def fn(x, lower, upper, log_s, bias):
        return lu_sample_map(x, lower, upper, log_s, sign_s, perm, inverse_perm, bias, transposed)

    assert torch.autograd.gradcheck(fn, inputs)
    perm_matrix = torch.eye(C, dtype=torch.float64)[perm] if permuted else torch.eye(C, dtype=torch.float64)
    weight = (perm_matrix @ (torch.tril(lower, -1) + torch.eye(C, dtype=torch.float64))
              @ (torch.triu(upper, 1) + torch.diag(sign_s * torch.exp(log_s))))
    y, logdet = fn(*inputs)
    assert_rel_close(y, x @ (weight if transposed else weight.T) + bias, VALUE_TOL)
    assert_rel_close(logdet, log_s.sum(), VALUE_TOL)
