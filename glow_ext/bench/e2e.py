"""`glow-ext bench --parts e2e`: a whole Glow's training step and sampling, as a user runs them.

Methods, one model per method, timed round-robin in one process (glow_ext.bench.common):
  ours           Glow(permutation="invconv_lu") eagerly, with the trainer's optimizer
                 (glow_ext.training.objective.adam: Adam on the fused implementation)
  ours_compiled  the same model through glow_ext.models.CompiledAfterInit (torch.compile of the
                 whole forward + loss, fullgraph, backward through AOTAutograd); left out of an
                 eager-only run (`glow-ext bench --parts e2e --e2e-compile none`)
  ours_unpacked  sampling only: ours without the coupling networks' prepacked oneDNN path
  naive          Glow(permutation="invconv"): ActNorm2d + dense InvConv2d (slogdet in float64),
                 the same weights and optimizer as ours
  rosinality     the rosinality-style model (glow_ext.bench.anchor_rosinality, its original
                 layers) with its training script's loss and optimizer (plain Adam)
All minimise the same loss, bits/dim of the dequantized batch. Before timing, ours, ours_compiled
and naive must agree on the loss and gradients, and the rosinality-style model, given our weights,
on the loss (see check_rosinality). Each step's roofline fraction is the least time its
convolution and matmul flops (torch.utils.flop_counter, forward + backward) take at this machine's
measured GEMM rate (glow_ext.bench.roofline), divided by the measured time. Sampling: 16 (the
batch) images at T = 0.7, our `sample` against rosinality's `reverse` of scaled noise.
"""
from __future__ import annotations

import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import reversible
from ..models import CompiledAfterInit, Glow
from ..nn import CouplingNN, FlowStep, ZeroConv2d
from ..training.objective import adam
from . import anchor_rosinality as ros
from . import methods as opbench
from .common import BenchError, summarize, synchronizer, time_methods
from .roofline import floor_ms, measure_ceilings

# Glow on 3x32x32 images (CIFAR-10's), affine coupling. The paper's model is K=32, L=3, width 512;
# on a CPU first K=8, width 128, the size `glow-ext bench-dropin` times too.
CONFIGS = {
    "cpu": ({"name": "cifar10 K8 w128 b16", "K": 8, "L": 3, "hidden": 128, "batch": 16},
            {"name": "cifar10 K32 w512 b16", "K": 32, "L": 3, "hidden": 512, "batch": 16}),
    "cuda": ({"name": "cifar10 K32 w512 b64", "K": 32, "L": 3, "hidden": 512, "batch": 64},),
}
# The quick run compiles with AOTAutograd but without Inductor's code generation (minutes on a CPU):
# it checks that the whole step traces and agrees, not how fast compiled code runs.
QUICK_CONFIGS = ({"name": "cifar10 K2 w16 b4", "K": 2, "L": 3, "hidden": 16, "batch": 4,
                  "compile_backend": "aot_eager"},)
# A config's "compile_backend": torch.compile's backend for ours_compiled (default inductor), or None
# to leave ours_compiled out (an eager-only run: no compile time at all).
IMAGE = (3, 32, 32)
TOL = 1e-3
# The loss alone, one number: float32 rounding leaves ~1e-7 of it; the mapping without the
# reordering of the coupling outputs is off by 3.5e-4 on the test's 2-step model.
ROSINALITY_TOL = 1e-5
SAMPLE_TEMPERATURE = 0.7
N_BINS = 256
# The step that moves the zero-initialised convs off zero. At K=32, width 512, 1e-3 throws the
# model out of range (bits/dim 8.25 -> 1.5e7 on the benchmark batch, and an inverse that overflows);
# 1e-4 lowers the loss at both sizes.
LR = 1e-4
METHODS = {
    "ours": "Glow(permutation='invconv_lu'), eager, Adam(fused=True) (the trainer's default)",
    "ours_compiled": "the same through glow_ext.models.CompiledAfterInit: torch.compile(fullgraph=True) "
                     "of forward + loss, backward through AOTAutograd",
    "ours_unpacked": "sampling only: ours with CouplingNN.prepacked_inference = False, the coupling "
                     "networks on their plain modules instead of oneDNN's inference convolutions",
    "naive": "Glow(permutation='invconv'): ActNorm2d + dense InvConv2d (slogdet in float64 per call, "
             "float64 inverse when sampling), same weights and optimizer as ours",
    "rosinality": "the rosinality-style Glow (glow_ext.bench.anchor_rosinality, original layers), "
                  "its loss and plain torch.optim.Adam as its train.py",
}
TRAIN_METHODS = ("ours", "ours_compiled", "naive", "rosinality")
SAMPLE_METHODS = ("ours", "ours_unpacked", "naive", "rosinality")


# --------------------------------------------------------------------------------------------------
# Agreement checks


def naive_state_from_lu(lu_model, naive_model):
    """A state_dict for the naive model (ActNorm2d + InvConv2d per step) holding the fused model's
    weights: W assembled from each step's LU factors, ActNorm copied, the rest copied by name."""
    source = lu_model.state_dict()
    state = {}
    for name, step in lu_model.named_modules():
        if isinstance(step, FlowStep):
            fused = step.permute
            state[f"{name}.actnorm.bias"] = fused.bias.detach().clone()
            state[f"{name}.actnorm.logs"] = fused.logs.detach().clone()
            state[f"{name}.actnorm.initialized"] = fused.initialized.clone()
            state[f"{name}.permute.weight"] = fused.weight().detach().to(fused.lower.dtype)
    for key in naive_model.state_dict():
        if key not in state:
            state[key] = source[key]
    return state


def _bpd_loss(model, x):
    return model.bits_per_dim(x, N_BINS).mean()


def _rosinality_loss(model, x):
    log_p, logdet, _ = model(x)
    return ros.rosinality_loss(log_p, logdet, x.shape[-1], N_BINS, x.shape[1])


def _sample(model, n, seed):
    torch.manual_seed(seed)
    return model.sample(n, temperature=SAMPLE_TEMPERATURE)


class _Checks:
    def __init__(self, what, tol=TOL):
        self.what, self.tol, self.errors, self.failures = what, tol, {}, []

    def record(self, key, value):
        self.errors[key] = value
        if not value < self.tol:
            self.failures.append(f"{key}: relative error {value:.3g} >= {self.tol:g}")

    def done(self):
        if self.failures:
            raise BenchError(f"end to end: {self.what} disagree:\n  " + "\n  ".join(self.failures))
        return self.errors


def _grads(model, loss_fn, x):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, x)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_glow_pair(lu, naive, x, seed):
    """The two models hold the same weights: bits/dim, gradients of shared parameters and samples
    (same seed) must agree."""
    checks = _Checks("the fused and the naive Glow")
    with torch.no_grad():
        checks.record("bits_per_dim", opbench.rel_err(naive.bits_per_dim(x, N_BINS), lu.bits_per_dim(x, N_BINS)))
    _, lu_grads = _grads(lu, _bpd_loss, x)
    _, naive_grads = _grads(naive, _bpd_loss, x)
    shared = [n for n in lu_grads if n in naive_grads]
    # One error over all shared gradients: in float32 a deep coupling net's tiny gradients carry
    # round-off of a few % of their own size (in float64 every one agrees to 1e-14).
    checks.record("grad_shared_parameters", opbench.rel_err(
        torch.cat([naive_grads[n].flatten() for n in shared]), torch.cat([lu_grads[n].flatten() for n in shared])))
    checks.record("sample", opbench.rel_err(_sample(naive, x.shape[0], seed), _sample(lu, x.shape[0], seed)))
    errors = checks.done()
    errors["shared_parameters"] = len(shared)
    return errors


def check_compiled(model, compiled, x):
    """The compiled forward + loss against eager on the same model: loss and every gradient."""
    checks = _Checks("the compiled and the eager Glow")
    eager_loss, eager_grads = _grads(model, _bpd_loss, x)
    compiled_loss, compiled_grads = _grads(model, lambda m, x: compiled(x), x)
    checks.record("compiled_loss", opbench.rel_err(compiled_loss, eager_loss))
    checks.record("compiled_grads", opbench.rel_err(torch.cat([g.flatten() for g in compiled_grads.values()]),
                                                    torch.cat([g.flatten() for g in eager_grads.values()])))
    return checks.done()


def check_unpacked_sampling(ours, unpacked, n, seed):
    """The same samples (same seed) with and without the coupling networks' prepacked path."""
    checks = _Checks("sampling with and without prepacked coupling convolutions")
    checks.record("sample_unpacked", opbench.rel_err(_sample(unpacked, n, seed), _sample(ours, n, seed)))
    return checks.done()


@torch.no_grad()
def rosinality_state_from_ours(ours, rosinality):
    """Our weights in the rosinality-style model: ActNorm (loc = bias, scale = exp(logs)), the LU
    factors (w_p the permutation matrix), the coupling networks (the output convs' channels
    reordered: we emit (shift, logit), it emits (log_s, t)) and the split priors. Its top prior takes
    C instead of 2C zero channels and is left as built (zero, as ours starts)."""
    state = rosinality.state_dict()
    for i, level in enumerate(ours.levels):
        for k, step in enumerate(level.steps):
            fused, ros_prefix = step.permute, f"blocks.{i}.flows.{k}."
            shape = state[ros_prefix + "actnorm.loc"].shape
            state[ros_prefix + "actnorm.loc"] = fused.bias.view(shape).clone()
            state[ros_prefix + "actnorm.scale"] = fused.logs.exp().view(shape)
            state[ros_prefix + "actnorm.initialized"].fill_(1)
            c = fused.num_channels
            state[ros_prefix + "invconv.w_p"] = torch.eye(c, dtype=fused.lower.dtype)[fused.perm]
            state[ros_prefix + "invconv.w_l"] = fused.lower.clone()
            state[ros_prefix + "invconv.w_u"] = fused.upper.clone()
            state[ros_prefix + "invconv.w_s"] = fused.log_s.clone()
            state[ros_prefix + "invconv.s_sign"] = fused.sign_s.clone()
            net = step.coupling.nn.net
            for j in (0, 2):
                state[ros_prefix + f"coupling.net.{j}.weight"] = net[j].weight.clone()
                state[ros_prefix + f"coupling.net.{j}.bias"] = net[j].bias.clone()
            half = net[4].conv.out_channels // 2
            swap = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
            state[ros_prefix + "coupling.net.4.conv.weight"] = net[4].conv.weight[swap].clone()
            state[ros_prefix + "coupling.net.4.conv.bias"] = net[4].conv.bias[swap].clone()
            state[ros_prefix + "coupling.net.4.scale"] = net[4].logs[swap].view(1, -1, 1, 1).clone()
        prior = level.split.prior if level.split is not None else ours.top_prior
        if level.split is not None:
            state[f"blocks.{i}.prior.conv.weight"] = prior.conv.weight.clone()
        state[f"blocks.{i}.prior.conv.bias"] = prior.conv.bias.clone()
        state[f"blocks.{i}.prior.scale"] = prior.logs.view(1, -1, 1, 1).clone()
    return state


def check_rosinality(ours, rosinality, x, seed):
    """Same loss: a copy of ours with every weight moved off its initial value, except the
    zero-initialised output convs' weights (the two models pad those convs differently, with 0
    and with 1), copied into the rosinality-style model; their bits/dim must agree. The output
    convs' biases and scales are moved, so the coupling shifts and scales, the priors and the
    non-orthogonal 1x1 convs all count."""
    moved = copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p))
        for module in moved.modules():
            if isinstance(module, ZeroConv2d):
                module.conv.weight.zero_()
    saved = copy.deepcopy(rosinality.state_dict())
    rosinality.load_state_dict(rosinality_state_from_ours(moved, rosinality))
    checks = _Checks("the rosinality-style Glow and ours", ROSINALITY_TOL)
    with torch.no_grad():
        checks.record("rosinality_bits_per_dim", opbench.rel_err(_rosinality_loss(rosinality, x), _bpd_loss(moved, x)))
    rosinality.load_state_dict(saved)
    return checks.done()


# --------------------------------------------------------------------------------------------------
# Timing


def _train_step(model, optimizer, loss_fn, x):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()
        optimizer.step()
    return step


def step_flops(model, loss_fn, x):
    """Floating-point operations of one forward + backward, counted by torch's flop counter
    (convolutions and matmuls; elementwise work and our custom ops are not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# The convolution kernels' own time (oneDNN on the CPU): forward, backward (data, weight and bias in
# one call) and the prepacked inference path.
CONVOLUTION_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward",
                       "mkldnn::_convolution_pointwise")


def convolution_time(fn, reps, grad_mode):
    """Median and spread over reps profiled calls of the self CPU time fn spends in convolution
    kernels: what fn would still take if everything around its convolutions cost nothing."""
    per_call_s = []
    with torch.set_grad_enabled(grad_mode):
        fn()
        for _ in range(reps):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            per_call_s.append(sum(e.self_cpu_time_total for e in prof.key_averages()
                                  if e.key in CONVOLUTION_KERNELS) / 1e6)
    return summarize(per_call_s, 1)


def _rosinality_sampler(model, config, like):
    shapes = ros.z_shapes(IMAGE[0], IMAGE[1], config["L"])

    def sample():
        eps = [SAMPLE_TEMPERATURE * torch.randn(config["batch"], *s, device=like.device) for s in shapes]
        with torch.no_grad():
            return model.reverse(eps)
    return sample


def _cuda_peak_bytes(step):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _host_sync_free(fn):
    """(True, None) if fn runs without a host synchronisation, else (False, the first one's message)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True, None
    except RuntimeError as error:
        return False, str(error).strip().splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


def build_models(config, device, seed, x):
    """ours (ActNorm initialised on x, then one Adam step so that no conv is zero), naive with its
    weights, and the rosinality-style model checked against ours before that step."""
    models = {}
    for method, permutation in (("ours", "invconv_lu"), ("naive", "invconv")):
        torch.manual_seed(seed)
        models[method] = Glow(in_channels=IMAGE[0], image_size=IMAGE[1], K=config["K"], L=config["L"],
                              hidden_channels=config["hidden"], coupling="affine",
                              permutation=permutation).to(device)
        models[method].train()
    torch.manual_seed(seed)
    models["rosinality"] = ros.RosinalityGlow(IMAGE[0], config["K"], config["L"], config["hidden"]).to(device)
    ours = models["ours"]
    with torch.no_grad():
        ours(x)  # data-dependent ActNorm init
    checks = check_rosinality(ours, models["rosinality"], x, seed)
    optimizer = adam(ours.parameters(), lr=LR)
    with torch.no_grad():
        before = _bpd_loss(ours, x).item()
    _train_step(ours, optimizer, _bpd_loss, x)()
    with torch.no_grad():
        after = _bpd_loss(ours, x).item()
    if not after < before:  # a benchmark of a diverged model times overflowing values
        raise BenchError(f"{config['name']}: the first Adam step (lr {LR:g}) raised the loss from "
                         f"{before:.4g} to {after:.4g} bits/dim")
    models["naive"].load_state_dict(naive_state_from_lu(ours, models["naive"]))
    return models, checks


def run_config(config, device, settings, seed, progress, ceilings):
    reps, min_time_ms, warmup = settings
    sync = synchronizer(device)
    label = config["name"]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand((config["batch"],) + IMAGE, generator=gen) - 0.5).to(device)

    backend = config.get("compile_backend", "inductor")
    train_methods = tuple(m for m in TRAIN_METHODS if backend is not None or m != "ours_compiled")
    progress.task(f"e2e {label}: build, ActNorm init, agreement checks{', compile' if backend else ''}")
    models, checks = build_models(config, device, seed, x)
    ours = models["ours"]
    checks.update(check_glow_pair(ours, models["naive"], x, seed))
    loss_fns = {"ours": _bpd_loss, "naive": _bpd_loss, "rosinality": _rosinality_loss}
    compile_s = None
    if backend is not None:
        compiled = CompiledAfterInit(_Loss(ours), backend=backend)
        started = time.perf_counter()
        checks.update(check_compiled(ours, compiled, x))  # the first compiled call compiles
        compile_s = time.perf_counter() - started
        loss_fns["ours_compiled"] = lambda m, x: compiled(x)

    model_of = {"ours": ours, "ours_compiled": ours, "naive": models["naive"], "rosinality": models["rosinality"]}
    # A small learning rate keeps the weights (and so the work) about the same through the timed steps;
    # ours and ours_compiled each have their own optimizer on the one model.
    optimizers = {m: (torch.optim.Adam(model_of[m].parameters(), lr=1e-6) if m == "rosinality"
                      else adam(model_of[m].parameters(), lr=1e-6)) for m in train_methods}
    steps = {m: _train_step(model_of[m], optimizers[m], loss_fns[m], x) for m in train_methods}
    flops = {m: step_flops(model_of[m], loss_fns[m] if m != "ours_compiled" else _bpd_loss, x)
             for m in train_methods}
    memory = {"saved_for_backward_bytes": {
        m: reversible.saved_tensor_bytes(loss_fns[m], model_of[m], x)[1] for m in ("ours", "naive", "rosinality")}}
    if device == "cuda":
        for step in steps.values():
            step()  # optimizer state allocated before the peak is measured
        memory["cuda_peak_step_bytes"] = {m: _cuda_peak_bytes(steps[m]) for m in train_methods}

    progress.task(f"e2e {label}: training step (forward + backward + Adam), {', '.join(train_methods)}")
    train = time_methods(steps, sync, reps, min_time_ms / 1e3, warmup, grad_mode=True)
    progress.task(f"e2e {label}: sampling {config['batch']} images at T={SAMPLE_TEMPERATURE}")
    unpacked = copy.deepcopy(ours)
    for net in unpacked.modules():
        if isinstance(net, CouplingNN):
            net.prepacked_inference = False
    checks.update(check_unpacked_sampling(ours, unpacked, config["batch"], seed))
    samplers = {"ours": lambda: ours.sample(config["batch"], SAMPLE_TEMPERATURE),
                "ours_unpacked": lambda: unpacked.sample(config["batch"], SAMPLE_TEMPERATURE),
                "naive": lambda: models["naive"].sample(config["batch"], SAMPLE_TEMPERATURE),
                "rosinality": _rosinality_sampler(models["rosinality"], config, x)}
    sample = time_methods(samplers, sync, reps, min_time_ms / 1e3, warmup, grad_mode=False)

    convolutions = None
    if device == "cpu":
        progress.task(f"e2e {label}: convolution kernels' time inside ours' step and sampling (profiled)")
        convolutions = {"train": convolution_time(steps["ours"], reps, grad_mode=True),
                        "sample": convolution_time(samplers["ours"], reps, grad_mode=False)}
        for kind, timing in (("train", train), ("sample", sample)):
            convolutions[kind]["bound_vs_rosinality"] = (
                timing["rosinality"]["median_ms"] / convolutions[kind]["median_ms"])

    ips = {"train": {m: config["batch"] / (train[m]["median_ms"] / 1e3) for m in train_methods},
           "sample": {m: config["batch"] / (sample[m]["median_ms"] / 1e3) for m in SAMPLE_METHODS}}
    speedup = {"train": {m: ips["train"][m] / ips["train"]["rosinality"] for m in train_methods},
               "sample": {m: ips["sample"][m] / ips["sample"]["rosinality"] for m in SAMPLE_METHODS}}
    roofline = {m: {"gflop": flops[m] / 1e9, "floor_ms": floor_ms(flops[m], 0, ceilings),
                    "fraction": floor_ms(flops[m], 0, ceilings) / train[m]["median_ms"]}
                for m in train_methods}
    entry = dict(config, image=list(IMAGE), coupling="affine", loss="bits/dim", compile_s=compile_s,
                 parameters={m: sum(p.numel() for p in models[m].parameters()) for m in models},
                 checks=checks, train_step=train, sample=sample, images_per_s=ips,
                 speedup_vs_rosinality=speedup, roofline=roofline, memory=memory)
    if convolutions is not None:
        entry["convolutions_alone"] = convolutions
    if device == "cuda":
        entry["host_sync_free"] = {}
        for m in ("ours", "naive"):
            free, message = _host_sync_free(steps[m])
            entry["host_sync_free"][m] = {"train_step": free, "first_sync": message}
    return entry


class _Loss(torch.nn.Module):
    """The bits/dim loss of a Glow as a module, so that CompiledAfterInit compiles model and loss
    as one graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _bpd_loss(self.model, x)


def run_e2e(device, configs, settings, seed, progress):
    ceilings = measure_ceilings(device, dtypes=(torch.float32,))
    return {"configs": [run_config(c, device, settings, seed, progress, ceilings) for c in configs],
            "methods": METHODS, "ceilings": ceilings,
            "roofline_note": "fraction = (flops of forward + backward, torch.utils.flop_counter: "
                             "convolutions and matmuls) / measured float32 GEMM rate / measured "
                             "step time; the optimizer and elementwise work count as time only",
            "speedup_note": "images/s of the method / images/s of the rosinality-style model, "
                            "medians of the same interleaved run",
            "convolutions_note": "convolutions_alone: self CPU time of the convolution kernels "
                                 f"({', '.join(CONVOLUTION_KERNELS)}) inside ours' eager training step "
                                 "and sampling call, torch.profiler, median of reps calls; "
                                 "bound_vs_rosinality = the rosinality-style model's median time over it, "
                                 "the speed-up ours would have if nothing but its convolutions took time",
            "memory_note": "saved_for_backward_bytes: distinct storages autograd keeps for the backward "
                           "of one loss (glow_ext.reversible.saved_tensor_bytes, parameters included). "
                           "cuda_peak_step_bytes: torch.cuda.max_memory_allocated over one training "
                           "step, above what was allocated before it."}


# --------------------------------------------------------------------------------------------------
# Report: markdown, console digest, plot (read from the JSON alone, for --render-only)

METHOD_LABELS = {"ours": "ours (eager)", "ours_compiled": "ours, compiled",
                 "ours_unpacked": "ours, plain coupling convs", "naive": "ours, naive layers",
                 "rosinality": "rosinality-style"}


def _config_label(c):
    return f"K={c['K']} L={c['L']} width {c['hidden']} batch {c['batch']}"


def _fmt_ms(ms):
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _spread(t):
    return f"{_fmt_ms(t['median_ms'])} (IQR {_fmt_ms(t['iqr_ms'])}, n={t['n']})"


def markdown(report, prefix, machine, when):
    cuda = report["device"] == "cuda"
    lines = [
        f"**One Glow training step and sampling** ({machine}, {when}; `{prefix}e2e-{report['device']}.json`). "
        "3x32x32 images, affine coupling, the same loss (bits/dim) for every method; one training step = "
        "forward + backward + Adam. ours = `Glow` eagerly with the trainer's fused Adam; compiled = the "
        "same through `CompiledAfterInit` (torch.compile of forward + loss); naive layers = ActNorm2d + "
        "dense InvConv2d; rosinality-style = `glow_ext.bench.anchor_rosinality` with its own layers, "
        "loss and plain Adam; plain coupling convs = ours sampling without the coupling networks' "
        "prepacked oneDNN path (`CouplingNN.prepacked_inference = False`). Times are medians "
        "(interquartile range, number of interleaved measurements); vs rosinality = images/s over the rosinality-style model's, same run. "
        "Roofline = the step's convolution + matmul flops at the measured float32 GEMM rate "
        f"({report['ceilings']['gemm_gflops']['float32']:.0f} GFLOP/s) over the step time. Sampling: "
        "the batch size in images at T = 0.7 (ours `sample`, rosinality's `reverse`).",
        "",
        "| config | method | train ms/step | train img/s | vs rosinality | roofline | sampling ms | "
        "sampling img/s | vs rosinality | saved for backward MB |" + (" peak step MB |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for c in report["configs"]:
        for m in METHODS:
            train = c["train_step"].get(m)
            sample = c["sample"].get(m)
            saved = c["memory"]["saved_for_backward_bytes"].get(m)
            cells = [_config_label(c), METHOD_LABELS[m]]
            cells += ([_spread(train), f"{c['images_per_s']['train'][m]:.1f}",
                       f"{c['speedup_vs_rosinality']['train'][m]:.2f}x",
                       f"{100 * c['roofline'][m]['fraction']:.0f}%"] if train else ["—"] * 4)
            cells += [_spread(sample) if sample else "—",
                     f"{c['images_per_s']['sample'][m]:.1f}" if sample else "—",
                     f"{c['speedup_vs_rosinality']['sample'][m]:.2f}x" if sample else "—",
                     f"{saved / 2**20:.1f}" if saved else "—"]
            if cuda:
                peak = c["memory"].get("cuda_peak_step_bytes", {}).get(m)
                cells.append(f"{peak / 2**20:.0f}" if peak else "—")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    bounds = [_convolution_bound(c) for c in report["configs"] if "convolutions_alone" in c]
    if bounds:
        lines += ["Convolutions alone (self time of the convolution kernels inside ours' eager step and "
                  "sampling call, profiled, medians): " + "; ".join(bounds) + ".", ""]
    compiled = [c for c in report["configs"] if c["compile_s"] is not None]
    if compiled:
        lines.append("Compile time of the whole step (first compiled call): " + "; ".join(
            f"{_config_label(c)} {c['compile_s']:.0f} s" for c in compiled) + ".")
    if cuda:
        for c in report["configs"]:
            sync = c["host_sync_free"]
            lines.append(f"Host synchronisation in a training step ({c['name']}; torch.cuda.set_sync_debug_mode"
                         "('error')): " + "; ".join(
                             f"{m} " + ("none" if r["train_step"] else f"yes, first: {r['first_sync']}")
                             for m, r in sync.items()) + ".")
    return lines


def _convolution_bound(c):
    conv = c["convolutions_alone"]
    return (f"{_config_label(c)}: {_fmt_ms(conv['train']['median_ms'])} of "
            f"{_fmt_ms(c['train_step']['ours']['median_ms'])} ms a step, "
            f"{_fmt_ms(conv['sample']['median_ms'])} of {_fmt_ms(c['sample']['ours']['median_ms'])} ms a "
            f"sampling call, so at most {conv['train']['bound_vs_rosinality']:.2f}x and "
            f"{conv['sample']['bound_vs_rosinality']:.2f}x the rosinality-style model's speed if "
            "everything else took no time")


def digest(report):
    return [f"{c['name']}: train img/s " + ", ".join(
                f"{m} {c['images_per_s']['train'][m]:.1f} ({c['speedup_vs_rosinality']['train'][m]:.2f}x, "
                f"roofline {100 * c['roofline'][m]['fraction']:.0f}%)" for m in TRAIN_METHODS
                if m in c["train_step"])
            + "; sampling vs rosinality " + ", ".join(
                f"{m} {c['speedup_vs_rosinality']['sample'][m]:.2f}x" for m in SAMPLE_METHODS)
            for c in report["configs"]]


def plot(report, path, pyplot):
    """Training and sampling images/s per method and config, interquartile range as error bars."""
    plt = pyplot()
    configs = report["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for ax, kind, timing, all_methods in ((axes[0], "train", "train_step", TRAIN_METHODS),
                                          (axes[1], "sample", "sample", SAMPLE_METHODS)):
        methods = [m for m in all_methods if all(m in c[timing] for c in configs)]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(configs))]
            ips = [c["images_per_s"][kind][m] for c in configs]
            # img/s at the quartiles of the step time: q3 time is the low end, q1 time the high end.
            low, high = [], []
            for c, v in zip(configs, ips):
                t = c[timing][m]
                low.append(v - c["batch"] / ((t["median_ms"] + t["iqr_ms"] / 2) / 1e3))
                high.append(c["batch"] / (max(t["median_ms"] - t["iqr_ms"] / 2, 1e-9) / 1e3) - v)
            ax.bar(xs, ips, width, yerr=[low, high], capsize=3, label=METHOD_LABELS[m])
            for xpos, v, c in zip(xs, ips, configs):
                ax.annotate(f"{c['speedup_vs_rosinality'][kind][m]:.2f}x", (xpos, v), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([_config_label(c) for c in configs], fontsize=8)
        ax.set_ylabel("images/s")
        ax.set_title("training step (forward + backward + Adam)" if kind == "train"
                     else f"sampling at T = {SAMPLE_TEMPERATURE}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Glow end to end on 3x32x32, {report['device']} (labels: x rosinality-style)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
