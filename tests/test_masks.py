"""Length masks in glow_ext.nn.ActNormInvConv: padded batches of sequences (N, C, T) with an
(N, 1, T) x_mask, as Glow-TTS and RADTTS feed them; also masked images for ActNormInvConv2d."""
import pytest
import torch

from glow_ext import nn as glow_nn
from glow_ext import ops

from conftest import DEVICES, assert_rel_close, make_generator, make_input

DTYPES = [torch.float32, torch.float64]
# Tolerances of float32 against the float64 expectations; float64 is held to far less.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def length_mask(lengths, T, device="cpu", dtype=torch.float32):
    """(N, 1, T) mask, 1 on the first lengths[n] steps of sample n."""
    lengths = torch.as_tensor(lengths)
    mask = torch.arange(T).view(1, -1) < lengths.view(-1, 1)
    return mask.unsqueeze(1).to(device=device, dtype=dtype)


def random_mask(shape, device="cpu", dtype=torch.float32, seed=5):
    """A 0/1 mask of `shape` (N, 1, *spatial): random positions valid, at least one per sample,
    and sample 0 entirely valid."""
    valid = torch.rand(shape, generator=make_generator(seed)) < 0.6
    valid.view(shape[0], -1)[:, 0] = True
    valid[0] = True
    return valid.to(device=device, dtype=dtype)


def fresh_layer(C, device="cpu", dtype=torch.float32, **kwargs):
    """An ActNormInvConv in train mode, not yet initialised; the same W for every call."""
    layer = glow_nn.ActNormInvConv(C, generator=make_generator(0), **kwargs)
    return layer.to(device, dtype).train()


def trained_layer(C, device, dtype, seed=0):
    """An ActNormInvConv in eval mode with random (non-zero) bias and logs, as after training."""
    layer = glow_nn.ActNormInvConv(C, generator=make_generator(seed)).to(device, dtype).eval()
    g = make_generator(seed + 100)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        layer.logs.copy_(0.2 * torch.randn(C, generator=g, dtype=torch.float64))
        layer.log_s.add_(0.1 * torch.randn(C, generator=g, dtype=torch.float64))
    return layer


def padded_input(shape, mask, device, dtype, padding=1e30):
    """Random input whose padded positions hold `padding`: a mask that leaks shows at once."""
    x = make_input(shape, dtype=torch.float64).to(device)
    return torch.where(mask.to(device) != 0, x, padding).to(dtype)


SHAPES = [(4, 6, 13), (3, 5, 4, 7), (5, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_forward_is_the_op_output_times_the_mask(shape, dtype, device):
    layer = trained_layer(shape[1], device, dtype)
    mask = random_mask((shape[0], 1, *shape[2:]), device, dtype)
    x = make_input(shape, dtype=dtype, device=device)
    y, logdet = layer(x, mask)
    y_unmasked, _ = ops.actnorm_invconv_lu(x, *layer._params())
    assert torch.equal(y, y_unmasked * mask)
    assert bool((y.transpose(0, 1)[:, mask.squeeze(1) == 0] == 0).all()), "padding must be zero"
    assert bool((y.transpose(0, 1)[:, mask.squeeze(1) != 0] != 0).all())
    assert logdet.shape == (shape[0],)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_logdet_and_its_gradient(dtype, device):
    lengths = [11, 4, 1, 7]
    layer = trained_layer(6, device, dtype)
    mask = length_mask(lengths, 11, device, dtype)
    x = make_input((4, 6, 11), dtype=dtype, device=device)
    _, logdet = layer(x, mask)

    logs = layer.logs.detach().clone().requires_grad_()
    log_s = layer.log_s.detach().clone().requires_grad_()
    valid_counts = torch.tensor(lengths, device=device, dtype=dtype)
    explicit = valid_counts * (logs.sum() + log_s.sum())
    assert_rel_close(logdet, explicit, TOL[dtype], "logdet_n = length_n·(Σ logs + Σ log_s)")

    # A weighting per sample, so that a wrong count in any sample changes the gradient.
    weights = torch.randn(4, device=device, dtype=dtype)
    logdet_grads = torch.autograd.grad((logdet * weights).sum(), (layer.logs, layer.log_s))
    explicit_grads = torch.autograd.grad((explicit * weights).sum(), (logs, log_s))
    for name, actual, expected in zip(("logs", "log_s"), logdet_grads, explicit_grads):
        assert_rel_close(actual, expected, TOL[dtype], f"d logdet / d {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_autograd", [False, True], ids=["cached_inverse", "inverse_op"])
def test_round_trip_on_valid_positions(with_autograd, dtype, device):
    layer = trained_layer(8, device, dtype)
    mask = length_mask([9, 3, 6], 9, device, dtype)
    x = make_input((3, 8, 9), dtype=dtype, device=device)
    with torch.no_grad():
        y, _ = layer(x, mask)
    if with_autograd:
        y.requires_grad_()
    x_back = layer.reverse(y, mask)
    assert_rel_close(x_back, x * mask, 10 * TOL[dtype], "reverse(forward(x)) on valid positions")
    assert bool((x_back.detach()[mask.expand_as(x) == 0] == 0).all()), "padding must be zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 5, 12), (3, 4, 6, 5)])
def test_init_with_a_mask_uses_the_valid_positions_only(shape, dtype, device):
    mask = random_mask((shape[0], 1, *shape[2:]), device, dtype)
    C = shape[1]
    channel_mean = torch.linspace(-3.0, 4.0, C, dtype=torch.float64)
    channel_mean = channel_mean.view(1, C, *[1] * (len(shape) - 2))
    x = padded_input(shape, mask, device, dtype) * 1.5 + channel_mean.to(device, dtype)
    layer = fresh_layer(C, device, dtype, scale=0.7)
    y, _ = layer(x, mask)

    valid_values = x.detach().to(torch.float64).transpose(0, 1)[:, mask.squeeze(1) != 0]  # (C, K)
    mean = valid_values.mean(dim=1)
    std = valid_values.std(dim=1, correction=0)
    assert_rel_close(layer.bias, -mean, TOL[dtype], "bias = −masked mean")
    assert_rel_close(layer.logs, torch.log(0.7 / (std + 1e-6)), TOL[dtype], "logs from masked std")
    assert bool(torch.isfinite(y).all())
    assert bool((y.transpose(0, 1)[:, mask.squeeze(1) == 0] == 0).all()), "padding must be zero"


@pytest.mark.parametrize("device", DEVICES)
def test_init_with_a_mask_ignores_non_finite_padding(device):
    mask = length_mask([7, 2, 5], 7, device)
    x = padded_input((3, 4, 7), mask, device, torch.float32, padding=float("inf"))
    layer = fresh_layer(4, device)
    layer(x, mask)
    expected = fresh_layer(4, device)
    # The valid steps as one unmasked batch of sequences of length 1.
    expected(x.transpose(1, 2)[mask.squeeze(1) != 0].unsqueeze(2))
    assert_rel_close(layer.bias, expected.bias, 1e-5, "bias")
    assert_rel_close(layer.logs, expected.logs, 1e-5, "logs")


@pytest.mark.parametrize("device", DEVICES)
def test_init_with_a_mask_of_nothing_valid_raises(device):
    layer = fresh_layer(3, device)
    x = make_input((2, 3, 5), device=device)
    with pytest.raises(ValueError, match=r"non-empty batch of finite values.*no valid position"):
        layer(x, torch.zeros(2, 1, 5, device=device))
    assert not layer._initialized


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_mask_of_ones_matches_no_mask_but_for_the_logdet_shape(shape, dtype, device):
    unmasked, masked = fresh_layer(shape[1], device, dtype), fresh_layer(shape[1], device, dtype)
    x = make_input(shape, dtype=dtype, device=device, scale=2.0, shift=1.5)
    ones = torch.ones(shape[0], 1, *shape[2:], device=device, dtype=dtype)
    y, logdet = unmasked(x)
    y_masked, logdet_masked = masked(x, ones)
    assert logdet.shape == () and logdet_masked.shape == (shape[0],)
    assert_rel_close(masked.bias, unmasked.bias, TOL[dtype], "init bias")
    assert_rel_close(masked.logs, unmasked.logs, TOL[dtype], "init logs")
    assert_rel_close(y_masked, y, TOL[dtype], "y")
    assert_rel_close(logdet_masked, logdet.expand(shape[0]), TOL[dtype], "logdet")
    unmasked.eval(), masked.eval()
    with torch.no_grad():
        assert_rel_close(masked.reverse(y, ones), unmasked.reverse(y), TOL[dtype], "reverse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_and_float_masks_agree(dtype, device):
    float_mask = length_mask([10, 6, 2], 10, device, dtype)
    bool_mask = float_mask.bool()
    x = padded_input((3, 5, 10), float_mask, device, dtype, padding=1e3)
    with_float, with_bool = fresh_layer(5, device, dtype), fresh_layer(5, device, dtype)
    y, logdet = with_float(x, float_mask)
    y_bool, logdet_bool = with_bool(x, bool_mask)
    assert torch.equal(with_bool.bias, with_float.bias)
    assert torch.equal(with_bool.logs, with_float.logs)
    assert torch.equal(y_bool, y)
    assert logdet_bool.dtype == dtype and torch.equal(logdet_bool, logdet)
    with torch.no_grad():
        x_back = with_float.eval().reverse(y, float_mask)
        assert torch.equal(with_bool.eval().reverse(y, bool_mask), x_back)


@pytest.mark.parametrize("bad_mask_shape",
                         [(3, 5, 10), (3, 10), (3, 1, 11), (2, 1, 10), (3, 1, 10, 1)])
def test_bad_mask_shapes_raise_a_clear_error(bad_mask_shape):
    layer = trained_layer(5, "cpu", torch.float32)
    x = make_input((3, 5, 10))
    bad_mask = torch.ones(bad_mask_shape)
    message = (r"x_mask must be a float \(0/1\) or bool tensor of shape \(N, 1, \*spatial\) = "
               r"\(3, 1, 10\)")
    with pytest.raises(ValueError, match=message):
        layer(x, bad_mask)
    with pytest.raises(ValueError, match=message):
        layer.reverse(x, bad_mask)


def test_an_integer_mask_is_refused():
    layer = trained_layer(5, "cpu", torch.float32)
    message = r"x_mask must be a float \(0/1\) or bool tensor.*torch.int64"
    with pytest.raises(ValueError, match=message):
        layer(make_input((3, 5, 10)), torch.ones(3, 1, 10, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_actnorm_invconv2d_takes_an_image_mask(device):
    layer = glow_nn.ActNormInvConv2d(4, generator=make_generator(0)).to(device).train()
    mask = random_mask((2, 1, 5, 6), device)
    x = make_input((2, 4, 5, 6), device=device)
    y, logdet = layer(x, mask)
    assert logdet.shape == (2,)
    assert_rel_close(logdet, mask.sum(dim=(1, 2, 3)) * (layer.logs.sum() + layer.log_s.sum()), 1e-5,
                     "per-sample logdet")
    with torch.no_grad():
        assert_rel_close(layer.eval().reverse(y, mask), x * mask, 1e-5, "round trip")
    with pytest.raises(ValueError, match="ActNormInvConv2d takes 4-D input"):
        layer(x[:, :, 0], mask[:, :, 0])


# torch.distributed: two gloo ranks with different batches, lengths and numbers of steps.

def _masked_init_on_rank(rank, init_file, shards, masks, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=len(shards))
    try:
        layer = fresh_layer(shards[rank].shape[1], dtype=torch.float64)
        layer(shards[rank], masks[rank])
        results[rank] = (layer.bias.detach().clone(), layer.logs.detach().clone())
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_masked_init_equals_the_init_over_the_union(tmp_path):
    """Each rank's statistics come from sums and counts added over ranks: rank 1 holds far fewer
    valid steps, and an average of per-rank statistics would weigh them as much as rank 0's."""
    import torch.multiprocessing as mp

    C = 5
    channel_mean = torch.linspace(-2.0, 3.0, C, dtype=torch.float64).view(1, C, 1)
    f64 = torch.float64
    masks = [length_mask([12, 9], 12, dtype=f64), length_mask([3, 1], 7, dtype=f64)]
    shards = [padded_input((2, C, 12), masks[0], "cpu", f64, padding=1e6) + channel_mean,
              padded_input((2, C, 7), masks[1], "cpu", f64, padding=-1e6) * 3 - channel_mean]
    results = mp.Manager().dict()
    mp.spawn(_masked_init_on_rank, args=(str(tmp_path / "init"), shards, masks, results), nprocs=2)

    union = fresh_layer(C, dtype=f64)
    # Concatenating along time keeps every sample's valid steps and its padding masked.
    union(torch.cat(shards, 2), torch.cat(masks, 2))
    per_rank = [fresh_layer(C, dtype=f64) for _ in shards]
    for layer, shard, mask in zip(per_rank, shards, masks):
        layer(shard, mask)
    averaged_bias = (per_rank[0].bias + per_rank[1].bias) / 2
    assert (averaged_bias - union.bias).abs().max() > 0.1, "the ranks must disagree, or it is moot"
    for rank in range(2):
        bias, logs = results[rank]
        assert_rel_close(bias, union.bias, 1e-12, f"rank {rank} bias")
        assert_rel_close(logs, union.logs, 1e-12, f"rank {rank} logs")
