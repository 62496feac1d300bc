"""Mixed precision: what runs in reduced precision under autocast, and what never does.

The contract (docs/mixed-precision.md): under torch.autocast the coupling and prior networks run in
reduced precision (their convolutions, activations and output scale); the flow's state between
layers, ActNorm and the 1x1 maps, every log-determinant, the coupling's scale and log-sigmoid, the
priors' log-probability, the loss, the gradients of the parameters and the optimizer state stay in
the parameters' dtype. The checks below watch every operator of a whole step and fail on any
reduced-precision tensor made outside a network; a deliberately broken layer shows they can fail.
"""
import json
import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from glow_ext.coupling_network import CouplingNN, ZeroConv2d
from glow_ext.flow_layers import AffineCoupling, FlowStep, Split
from glow_ext.models import CompiledAfterInit, Glow
from glow_ext.training.objective import adam
from glow_ext.__main__ import main

from conftest import assert_rel_close
from test_train import TINY

REDUCED = (torch.bfloat16, torch.float16)
N_BINS = 32


def perturbed_glow(coupling="affine", conditional=True, seed=0, permutation="invconv_lu"):
    """A small Glow whose zero-initialised output layers are moved off zero, ActNorm initialised.
    Its last level runs at 1x1 pixels, where the 1x1 op's passes are GEMMs."""
    torch.manual_seed(seed)
    model = Glow(in_channels=3, image_size=8, K=2, L=3, hidden_channels=16, coupling=coupling,
                 permutation=permutation, n_classes=4 if conditional else None,
                 class_head=conditional)
    x = torch.rand(6, 3, 8, 8) - 0.5
    y = torch.randint(0, 4, (6,)) if conditional else None
    with torch.no_grad():
        model(x, y)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, x, y


def networks_of(model):
    """The modules allowed to compute in reduced precision: coupling and prior networks, and the
    class embedding and head."""
    nets = [m for m in model.modules() if isinstance(m, (CouplingNN, ZeroConv2d))]
    nets += [m for m in (getattr(model, "class_embedding", None), getattr(model, "class_head", None))
             if m is not None]
    return nets


class ReducedPrecisionWatch(TorchDispatchMode):
    """Records every operator that makes a reduced-precision tensor outside the given networks in
    the forward pass (forward hooks say when a network is running)."""

    def __init__(self, networks):
        super().__init__()
        self.depth = 0
        self.outside = []
        self.inside = 0  # reduced-precision tensors the networks made: autocast did act
        self.handles = []
        for net in networks:
            self.handles.append(net.register_forward_pre_hook(self._enter))
            self.handles.append(net.register_forward_hook(self._leave))

    def _enter(self, *args):
        self.depth += 1

    def _leave(self, *args):
        self.depth -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype in REDUCED:
                if self.depth == 0:
                    self.outside.append(str(func))
                else:
                    self.inside += 1
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


@contextmanager
def watched(model):
    watch = ReducedPrecisionWatch(networks_of(model))
    try:
        with watch:
            yield watch
    finally:
        watch.remove()


def flow_gradient_dtypes(model):
    """Backward hooks on every flow step and split: the dtypes of the gradients flowing through the
    flow's state (collected into the returned list)."""
    seen, handles = [], []

    def hook(module, grad_input, grad_output):
        seen.extend((type(module).__name__, g.dtype) for g in (*grad_input, *grad_output)
                    if g is not None)
    for m in model.modules():
        if isinstance(m, (FlowStep, Split)):
            handles.append(m.register_full_backward_hook(hook))
    return seen, handles


def bpd_loss(model, x, y):
    d = x[0].numel()
    out = model(x, y)
    bpd = (-out.log_prob + d * math.log(N_BINS)) / (d * math.log(2.0))
    loss = bpd.mean()
    if out.class_logits is not None:
        loss = loss + nn.functional.cross_entropy(out.class_logits, y)
    return loss, out


@pytest.mark.parametrize("coupling, permutation, dtype", [
    ("affine", "invconv_lu", torch.bfloat16), ("additive", "invconv_lu", torch.bfloat16),
    ("affine", "invconv", torch.bfloat16), ("affine", "invconv_lu", torch.float16)])
def test_a_whole_step_keeps_reduced_precision_inside_the_networks(coupling, permutation, dtype):
    model, x, y = perturbed_glow(coupling, permutation=permutation)
    optimizer = adam(model.parameters(), lr=1e-3)
    grads_seen, handles = flow_gradient_dtypes(model)
    x = x.requires_grad_()  # so that the first step's backward hook fires too
    try:
        with watched(model) as watch, torch.autocast("cpu", dtype=dtype):
            loss, out = bpd_loss(model, x, y)
        assert watch.inside > 0
        assert watch.outside == [], f"reduced precision outside the networks: {sorted(set(watch.outside))}"
        assert loss.dtype == out.log_prob.dtype == out.logdet.dtype == out.class_logits.dtype == torch.float32
        assert all(z.dtype == torch.float32 for z in out.zs)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert grads_seen and all(dtype == torch.float32 for _, dtype in grads_seen), set(grads_seen)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert state and all(t.dtype == torch.float32 for t in state)


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 1, 1), (4, 12, 7), (2, 12, 3, 5)])
def test_ops_give_the_same_bits_under_autocast(shape):
    """Autocast does not reach inside the ops: with one position per sample their passes are GEMMs,
    which autocast would otherwise run in bfloat16."""
    from glow_ext.invconv import ActNormInvConv

    torch.manual_seed(0)
    layer = ActNormInvConv(shape[1])
    x = torch.randn(shape)
    with torch.no_grad():
        layer(x)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    results = []
    for enabled in (False, True):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            y, logdet = layer(xg)
            x_back = layer.reverse(y.detach())
        (y.square().sum() + logdet.sum()).backward()
        results.append([y, logdet, x_back, xg.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    for plain, autocast in zip(*results):
        assert autocast.dtype == plain.dtype == torch.float32
        assert torch.equal(autocast, plain)


def test_the_watch_catches_a_reduced_precision_log_determinant(monkeypatch):
    """The check above can fail: a coupling that leaves its log-determinant in bfloat16 is caught."""
    model, x, y = perturbed_glow()

    def careless_transform(self, x_b, h):
        scale = torch.sigmoid(h[:, 1::2] + 2.0)  # h stays bfloat16
        return (x_b + h[:, 0::2]) * scale, scale.log().flatten(1).sum(1)
    monkeypatch.setattr(AffineCoupling, "_transform", careless_transform)
    with watched(model) as watch, torch.autocast("cpu", dtype=torch.bfloat16):
        bpd_loss(model, x, y)
    assert watch.outside and any("log" in op for op in watch.outside), watch.outside


def test_autocast_log_prob_and_round_trip_stay_close_to_float32():
    """bfloat16 networks change the density only by their rounding, and x -> z -> x under autocast
    returns x far closer than bfloat16's own rounding of x (2^-9 relative, ~1e-3 here): the flow
    stays float32, and only where the inverse's float32 round-off flips a network input's bfloat16
    rounding does the reconstruction move (by ~1e-4 at most in this model)."""
    model, x, y = perturbed_glow(conditional=False)
    model.eval()
    with torch.no_grad():
        exact = model.log_prob(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.log_prob(x)
            zs = model.encode(x)
            x_back = model.decode(zs)
    assert mixed.dtype == torch.float32
    assert_rel_close(mixed, exact, 2e-2, "log_prob under autocast")
    assert (mixed - exact).abs().max() > 0  # the networks did run in bfloat16
    assert (x_back - x).abs().max() < 5e-4, (x_back - x).abs().max()


@pytest.mark.compile
def test_compiled_step_under_autocast_matches_eager():
    model, x, y = perturbed_glow(conditional=False)

    class Loss(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return bpd_loss(self.model, x, None)[0]
    compiled = CompiledAfterInit(Loss(model), backend="aot_eager")
    assert compiled.compiled
    results = []
    for fn in (lambda: bpd_loss(model, x, None)[0], lambda: compiled(x)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert results[1][0].dtype == torch.float32
    assert_rel_close(results[1][0], results[0][0], 1e-5, "compiled loss under autocast")
    assert_rel_close(results[1][1], results[0][1], 1e-3, "compiled gradients under autocast")


# --------------------------------------------------------------------------------------------------
# The trainer

TRAIN = ["train", *TINY]


def records(run, split):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def all_finite(record):
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_trainer_bf16_on_the_cpu(tmp_path, capsys):
    run = tmp_path / "bf16"
    assert main([*TRAIN, "--amp", "bf16", "--steps", "6", "--eval-every", "3", "--sample-every", "6",
                 "--out", str(run)]) == 0
    train, test = records(run, "train"), records(run, "test")
    assert [r["step"] for r in train] == list(range(1, 7)) and [r["step"] for r in test] == [3, 6]
    assert all(all_finite(r) for r in train + test)
    assert all(r["grad_norm"] is not None for r in train)
    assert json.loads((run / "summary.json").read_text())["amp"] == "bf16"
    assert (run / "samples" / "step_0000006.png").is_file()
    # evaluate: the float32 bpd first (the trainer's), and the bpd under autocast when asked.
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--amp", "bf16"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = json.loads((run / "summary.json").read_text())["best_test_bpd"]
    assert result["bpd"] == pytest.approx(best, rel=1e-6)
    assert result["amp"] == "bf16" and result["bpd_amp"] == pytest.approx(result["bpd"], rel=1e-2)
    assert main(["sample", "--checkpoint", str(run / "best.pt"), "--n", "4",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


@pytest.mark.compile
def test_trainer_compiled_and_reversible_steps_under_bf16_give_the_eager_losses(tmp_path):
    """--amp bf16 with --compile (Inductor, under the same autocast) and with --reversible (which
    replays the autocast state when it recomputes): the eager bf16 run's losses, up to the
    bfloat16 rounding that fused kernels and recomputation may order differently."""
    common = [*TRAIN, "--amp", "bf16", "--dropout", "0", "--steps", "3", "--eval-every", "3"]
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"]), ("reversible", ["--reversible"])):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        losses[name] = {r["step"]: r["loss"] for r in records(tmp_path / name, "train")}
    for name in ("compiled", "reversible"):
        assert sorted(losses[name]) == [1, 2, 3]
        for step, loss in losses["eager"].items():
            assert abs(losses[name][step] - loss) <= 2e-3 * abs(loss), (name, step)


def test_trainer_refuses_fp16_on_the_cpu(tmp_path, capsys):
    assert main([*TRAIN, "--amp", "fp16", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--amp fp16 needs --device cuda" in err and "bf16" in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_loss_scaler_skips_overflowing_steps_and_resumes(tmp_path, monkeypatch):
    """The --amp fp16 path (float16 autocast and the loss scaler), run on the CPU for the test: an
    initial scale so large that float16 activation gradients overflow makes the trainer skip those
    updates (not stop as diverged), lower the scale, go on, and keep the scaler's state across
    --resume."""
    from glow_ext.training import distributed, loop

    def scaler_that_overflows(amp, device):
        return torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8,
                                    growth_interval=1000)
    monkeypatch.setattr(loop, "grad_scaler", scaler_that_overflows)
    for module in (distributed, loop):
        monkeypatch.setattr(module, "check_amp", lambda amp, device: None)
    run = tmp_path / "scaled"
    args = [*TRAIN, "--amp", "fp16", "--eval-every", "8", "--out", str(run)]
    assert main([*args, "--steps", "8"]) == 0
    train = records(run, "train")
    summary = json.loads((run / "summary.json").read_text())
    skipped = summary["skipped_steps"]
    assert 1 <= skipped < 8 and summary["step"] == 8
    assert train[0]["grad_norm"] is None  # an overflow is logged as no norm, never as inf
    assert all(r["grad_norm"] is not None for r in train[skipped:])
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss_scale"] < 2.0**40 and train[-1]["skipped_steps"] == skipped
    assert main([*args, "--steps", "10", "--resume"]) == 0
    resumed = records(run, "train")
    assert resumed[-1]["step"] == 10 and resumed[-1]["loss_scale"] == train[-1]["loss_scale"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_mixed_precision_on_cuda(tmp_path, amp):
    run = tmp_path / amp
    args = [a if a != "cpu" else "cuda" for a in TRAIN]
    assert main([*args, "--amp", amp, "--steps", "6", "--eval-every", "6", "--out", str(run)]) == 0
    train = records(run, "train")
    assert all(math.isfinite(r["loss"]) for r in train)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["amp"] == amp and math.isfinite(summary["best_test_bpd"])
    assert ("loss_scale" in train[-1]) == (amp == "fp16")
