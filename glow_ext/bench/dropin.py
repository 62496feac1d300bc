"""`glow-ext bench-dropin`: does dropping glow_ext.compat layers into someone's Glow make it train faster?

For two anchors, a rosinality/glow-pytorch-style Glow (glow_ext.bench.anchor_rosinality) and a
y0ast/Glow-PyTorch-style Glow (glow_ext.bench.anchor_y0ast), each at K=8, L=3, coupling width 128,
batch 16 of 3x32x32 images, one training step (forward, loss, backward, Adam) is timed with the
model's own layers ("original"), with the glow_ext.compat ActNorm and 1x1-conv drop-ins ("compat"),
and with the coupling drop-ins as well (rosinality's `AffineCoupling`; for y0ast, whose coupling is
written inside `FlowStep`, the whole-step `FlowStep`), all with the SAME weights (the original's
state_dict, loaded strict) and the same batch. Before timing, the loss and every gradient must
agree; a mismatch aborts the run. The methods are timed round-robin in one process
(glow_ext.bench.common.time_methods): medians, interquartile ranges and counts.

The share of a step spent in the replaced layers bounds what a drop-in can gain: if they took no
time at all the step would be 1 / (1 − share) times faster. It is measured by timing those layers
alone (forward + backward on the inputs they see in the model, every layer of the kinds the drop-in
replaces) in the same round-robin as the steps, and likewise the drop-ins' own layers.

Writes dropin-<device>.json under --out. `--quick`: tiny models, for tests (never over full results).
On a machine shared with other work, `--threads 1`: two OpenMP threads competing for busy cores
spin at their barriers and slow every method by an order of magnitude, unevenly.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import anchor_rosinality as ros
from . import anchor_y0ast as y0
from .common import BenchError, report_header, synchronizer, time_methods

DEFAULT_OUT_DIR = Path("benchmarks/results")
TARGET_RATIO = 1.1
FULL = dict(K=8, L=3, hidden=128, batch=16, image=32, reps=15, min_time_ms=300, warmup=2)
QUICK = dict(K=1, L=2, hidden=8, batch=2, image=8, reps=2, min_time_ms=1, warmup=1)
# float32, same weights, different kernels: the loss to float32 round-off; the gradients of a deep
# coupling net carry round-off of up to ~1e-3 of the largest gradient.
LOSS_TOL = 1e-5
GRAD_TOL = 2e-3


def _rosinality(cfg, layers):
    model = ros.RosinalityGlow(3, cfg["K"], cfg["L"], cfg["hidden"], layers=layers)

    def loss(x):
        log_p, logdet, _ = model(x)
        return ros.rosinality_loss(log_p, logdet, cfg["image"], 256)
    return model, loss


def _y0ast(cfg, layers):
    model = y0.Y0astGlow((cfg["image"], cfg["image"], 3), cfg["hidden"], cfg["K"], cfg["L"],
                         layers=layers)

    def loss(x):
        return y0.y0ast_loss(model(x)[1])
    return model, loss


# name -> (builder(cfg, layers) -> (model, loss_fn), {method: (its `layers` namespace, the
# original's layer classes it replaces)}). "compat" swaps what glow_ext.compat offered first (ActNorm
# and the 1x1 conv); the third method also swaps the coupling (rosinality's AffineCoupling module;
# y0ast's coupling lives inside FlowStep, so there the whole step is the drop-in).
ANCHORS = {
    "rosinality": (_rosinality, {
        "original": (lambda: ros.ORIGINAL_LAYERS, ()),
        "compat": (ros.compat_layers, (ros.ActNorm, ros.InvConv2dLU)),
        "compat+coupling": (lambda: ros.compat_layers(coupling=True),
                            (ros.ActNorm, ros.InvConv2dLU, ros.AffineCoupling)),
    }),
    "y0ast": (_y0ast, {
        "original": (lambda: y0.ORIGINAL_LAYERS, ()),
        "compat": (y0.compat_layers, (y0.ActNorm2d, y0.InvertibleConv1x1)),
        "compat FlowStep": (lambda: y0.compat_layers(flow_step=True), (y0.FlowStep,)),
    }),
}


def _rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _build(anchor, cfg, device, seed):
    """{method: (model, loss_fn)} with the original's weights everywhere, and the batch."""
    builder, methods = ANCHORS[anchor]
    models = {}
    for method, (layers, _) in methods.items():
        torch.manual_seed(seed)
        model, loss = builder(cfg, layers())
        models[method] = (model.to(device).train(), loss)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(cfg["batch"], 3, cfg["image"], cfg["image"], generator=gen) - 0.5).to(device)
    original = models["original"][0]
    with torch.no_grad():
        original(x)  # data-dependent ActNorm init
        for p in original.parameters():  # the zero-initialised convs as after some training
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(device))
    for method, (model, _) in models.items():
        if method != "original":
            model.load_state_dict(original.state_dict(), strict=True)
    return models, x


def check_agreement(models, x):
    """Loss and gradients of every method against the original's; raises BenchError on a mismatch."""
    results = {}
    for method, (model, loss_fn) in models.items():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        results[method] = (loss.detach(), [p.grad.detach().clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = results["original"]
    checks = {}
    for method, (loss, grads) in results.items():
        if method == "original":
            continue
        checks[method] = {"loss": _rel_err(loss, ref_loss),
                          "grads": _rel_err(torch.cat([g.flatten() for g in grads]),
                                            torch.cat([g.flatten() for g in ref_grads]))}
        if not (checks[method]["loss"] <= LOSS_TOL and checks[method]["grads"] <= GRAD_TOL):
            raise BenchError(f"bench-dropin: {method} disagrees with the original: {checks[method]}")
    return checks


def _train_step(model, loss_fn, x):
    # A tiny learning rate keeps the weights (and so the work) the same through the timed steps.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        optimizer.step()
    return step


def _outermost(model, classes):
    """The modules of `classes` in `model` that are not inside another one of them."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, classes) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def _layers_pass(model, loss_fn, x, classes):
    """A function running forward + backward of the layers of `classes` in `model` (the outermost
    ones) on the inputs they see in the model (captured once), every parameter and input requiring
    grad; and how many layers that is."""
    captured = []

    def capture(module, args, kwargs, output):
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        captured.append((module, args, kwargs))

    hooks = [m.register_forward_hook(capture, with_kwargs=True) for m in _outermost(model, classes)]
    with torch.no_grad():
        loss_fn(x)
    for hook in hooks:
        hook.remove()
    if not captured:
        raise BenchError("bench-dropin: no replaced layer found in the model")
    for _, args, _ in captured:
        args[0].requires_grad_()
    seeds = [None] * len(captured)

    def run():
        outputs, grads = [], []
        for i, (module, args, kwargs) in enumerate(captured):
            out = module(*args, **kwargs)
            out = [t for t in (out if isinstance(out, tuple) else (out,))
                   if torch.is_tensor(t) and t.requires_grad]
            if seeds[i] is None:
                seeds[i] = [torch.randn_like(t) for t in out]
            outputs += out
            grads += seeds[i]
        torch.autograd.backward(outputs, grads)
        model.zero_grad(set_to_none=True)
    return run, len(captured)


def run_anchor(anchor, cfg, device, seed):
    models, x = _build(anchor, cfg, device, seed)
    checks = check_agreement(models, x)
    callables = {m: _train_step(model, loss, x) for m, (model, loss) in models.items()}
    methods = ANCHORS[anchor][1]
    original_classes = set(vars(methods["original"][0]()).values())
    layer_counts = {}
    for method, (layers, replaced) in methods.items():
        if method == "original":
            continue
        own = tuple(c for c in vars(layers()).values() if c not in original_classes)
        for label, owner, classes in ((f"original layers {method} replaces", "original", replaced),
                                      (f"{method} layers", method, own)):
            callables[label], layer_counts[label] = _layers_pass(*models[owner], x, classes)
    timing = time_methods(callables, synchronizer(device), cfg["reps"], cfg["min_time_ms"] / 1e3,
                          cfg["warmup"], grad_mode=True)
    return {"anchor": anchor, "methods": list(methods), "checks": checks, "timing": timing,
            "layer_calls": layer_counts, **summarize(timing, list(methods))}


def ratio_band(base, other):
    """(low, high) of base/other with each median moved by half its IQR the unfavourable way."""
    low = (base["median_ms"] - base["iqr_ms"] / 2) / (other["median_ms"] + other["iqr_ms"] / 2)
    high = (base["median_ms"] + base["iqr_ms"] / 2) / max(other["median_ms"] - other["iqr_ms"] / 2, 1e-9)
    return [low, high]


def summarize(timing, methods):
    step = {m: timing[m]["median_ms"] for m in methods}
    others = [m for m in methods if m != "original"]
    speedup = {m: step["original"] / step[m] for m in others}
    band = {m: ratio_band(timing["original"], timing[m]) for m in others}
    share = {m: timing[f"original layers {m} replaces"]["median_ms"] / step["original"] for m in others}
    own_share = {m: timing[f"{m} layers"]["median_ms"] / step[m] for m in others}
    # If the replaced layers of the original took no time at all (None: noise put the share >= 1).
    bound = {m: 1 / (1 - share[m]) if share[m] < 1 else None for m in others}
    return {"speedup": speedup, "speedup_iqr_band": band, "replaced_layers_share": share,
            "dropin_layers_share": own_share, "speedup_bound_if_layers_free": bound,
            "target_met": {m: s >= TARGET_RATIO for m, s in speedup.items()}}


def start_run(args, name, cfg, stream):
    """The device and output path of a drop-in benchmark run writing <name>-<device>.json, after
    its --reps and --threads; refuses a --quick run over full results. Prints the run's header."""
    if args.reps:
        cfg["reps"] = args.reps
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no CUDA device")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix=f"glow-ext-{name}-")) if args.quick
                           else DEFAULT_OUT_DIR)
    path = Path(out_dir) / f"{name}-{device}.json"
    if args.quick and path.is_file() and not json.loads(path.read_text())["config"]["quick"]:
        raise BenchError(f"--quick would overwrite the full results in {path}; pick another --out")
    print(f"glow-ext bench-{name}: device={device}{' (quick)' if args.quick else ''}, "
          f"{torch.get_num_threads()} threads, {cfg}", file=stream, flush=True)
    return device, path


def write_report(report, path, load_before, stream):
    """Writes a benchmark report as JSON to path, with the load average before and after the run
    (report["machine"]) and its wall time (report["config"]["wall_s"]) said on stream."""
    report["machine"]["load_average"] = {"before": load_before, "after": os.getloadavg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path} ({report['config']['wall_s']:.0f} s)", file=stream)


def run(args, stream=None):
    stream = stream or sys.stdout
    cfg = dict(QUICK if args.quick else FULL)
    device, path = start_run(args, "dropin", cfg, stream)
    started, load_before = time.perf_counter(), os.getloadavg()
    anchors = []
    for anchor in ANCHORS:
        result = run_anchor(anchor, cfg, device, args.seed)
        anchors.append(result)
        print(f"  {anchor}:\n    " + digest(result), file=stream, flush=True)
    report = {"benchmark": "glow-ext bench-dropin", **report_header(device),
              "config": dict(cfg, quick=args.quick, dtype="float32",
                             image_shape=[3, cfg["image"], cfg["image"]],
                             optimizer="Adam", wall_s=time.perf_counter() - started),
              "anchors": anchors, "target_ratio": TARGET_RATIO, "notes": NOTES}
    write_report(report, path, load_before, stream)
    return report


def digest(result):
    t = result["timing"]
    lines = [f"{m}: step {t[m]['median_ms']:.1f} ms (IQR {t[m]['iqr_ms']:.1f}, n={t[m]['n']})"
             for m in result["methods"]]
    for m, s in result["speedup"].items():
        band = result["speedup_iqr_band"][m]
        lines.append(f"{m}: speed-up {s:.3f}x [{band[0]:.2f}, {band[1]:.2f}]; the layers it replaces "
                     f"take {result['replaced_layers_share'][m]:.1%} of the original's step (bound "
                     f"{result['speedup_bound_if_layers_free'][m] or float('inf'):.3f}x), its own "
                     f"{result['dropin_layers_share'][m]:.1%} of its step")
    return "\n    ".join(lines)


NOTES = {
    "speedup": "original median step time / method median step time (>1: the drop-ins are faster)",
    "speedup_iqr_band": "the same ratio with each median moved by half its IQR the unfavourable and "
                        "the favourable way",
    "replaced_layers_share": "median time of the original's layers that the method replaces, alone "
                             "(forward + backward on the inputs they see in the model) / the "
                             "original's median step time",
    "dropin_layers_share": "the same for the method's own drop-in layers / its own step time",
    "speedup_bound_if_layers_free": "1 / (1 - replaced_layers_share): the step speed-up if the "
                                    "replaced layers took no time",
}


def add_arguments(parser, full=FULL, quick_help=f"tiny models for tests ({QUICK})"):
    """The options of a drop-in benchmark (bench-dropin, bench-dropin-flows)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick_help}; writes to a new temporary folder unless --out is given, "
                             "never over full results")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--reps", type=int, default=None, help=f"timed rounds (default {full['reps']})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    parser.add_argument("--seed", type=int, default=0)


def run_command(args, run_benchmark=None, name="bench-dropin"):
    """Runs a drop-in benchmark; a BenchError becomes one line on stderr and exit status 2."""
    try:
        (run_benchmark or run)(args)
    except BenchError as error:
        print(f"glow-ext {name}: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="glow-ext bench-dropin", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
