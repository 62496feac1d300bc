"""`glow-ext bench-amp`: what mixed precision buys a whole Glow, and what it costs in exactness.

For each configuration (3x32x32 images, affine coupling; on the CPU K=8/width 128 and K=32/width 512,
batch 16) one interleaved run times, with the same weights:
  training step (forward, bits/dim loss, backward, optimizer step)
    ours               eager, float32, the trainer's fused Adam
    ours_amp           eager under the trainer's autocast (glow_ext.training.distributed.autocast_context)
    ours_compiled      CompiledAfterInit (torch.compile of forward + loss), float32
    ours_compiled_amp  the same under autocast
    rosinality         the rosinality-style Glow (glow_ext.bench.anchor_rosinality), its loss and
                       plain Adam, float32
    rosinality_amp     the same under the same autocast
  sampling (the batch size in images at T = 0.7): ours, ours_amp, rosinality, rosinality_amp.
Before timing, the autocast loss must stay within AMP_LOSS_TOL of float32's and the compiled
autocast loss within COMPILED_TOL of the eager one. Exactness: the round trip x -> z -> x through
every level's flow steps (at each level shape) and through the whole model, under autocast and in
float32, as max |x_back - x| / max |x|.

The GEMM rate is measured in float32 and in the autocast dtype in the same run; each step's
roofline fraction is its convolution flops (torch.utils.flop_counter) at the rate of the dtype its
convolutions run in, over its measured time. Writes amp-<device>.json under --out; --update-readme
fills the amp-<device> section of docs/mixed-precision.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..models import CompiledAfterInit
from ..training.distributed import AUTOCAST_DTYPES, autocast_context
from . import dropin, e2e
from . import report as bench_report
from .common import BenchError, report_header, synchronizer, time_methods
from .roofline import dtype_name, measure_ceilings

CONFIGS = {
    "cpu": ({"name": "cifar10 K8 w128 b16", "K": 8, "L": 3, "hidden": 128, "batch": 16},
            {"name": "cifar10 K32 w512 b16", "K": 32, "L": 3, "hidden": 512, "batch": 16}),
    "cuda": ({"name": "cifar10 K32 w512 b64", "K": 32, "L": 3, "hidden": 512, "batch": 64},),
}
QUICK_CONFIGS = ({"name": "cifar10 K2 w16 b4", "K": 2, "L": 3, "hidden": 16, "batch": 4},)
FULL = dict(reps=15, min_time_ms=300, warmup=2, compile_backend="inductor")
QUICK = dict(reps=2, min_time_ms=1, warmup=1, compile_backend="aot_eager")
AMP = {"cpu": "bf16", "cuda": "bf16"}
# The networks' bfloat16 rounding moves a bits/dim loss by ~1e-3 of itself.
AMP_LOSS_TOL = 1e-2
COMPILED_TOL = 5e-3
# Goals: the autocast step over the float32 step, and over the rosinality-style model under the
# same autocast.
GOALS = {"amp_vs_float32": {"cifar10 K8 w128 b16": 1.4, "cifar10 K32 w512 b16": 1.7},
         "amp_vs_rosinality_amp": 1.3}
TRAIN_METHODS = ("ours", "ours_amp", "ours_compiled", "ours_compiled_amp", "rosinality", "rosinality_amp")
SAMPLE_METHODS = ("ours", "ours_amp", "rosinality", "rosinality_amp")


def _under(amp, device, fn):
    def call():
        with autocast_context(amp, device):
            return fn()
    return call


@torch.no_grad()
def round_trip_errors(model, x, amp, device):
    """max |x_back - x| / max |x| through each level's flow steps (at its input shape) and through
    the whole model, under the autocast mode amp."""
    from ..flow_layers import squeeze2d

    errors = {}
    with autocast_context(amp, device):
        h = x
        for i, level in enumerate(model.levels):
            h = squeeze2d(h)
            out = h
            for step in level.steps:
                out, _ = step(out)
            back = out
            for step in reversed(level.steps):
                back = step.reverse(back)
            key = "level {} {}".format(i, "x".join(map(str, h.shape[1:])))
            errors[key] = ((back - h).abs().max() / h.abs().max()).item()
            h = level.split(out)[0] if level.split is not None else out
        back = model.decode(model.encode(x))
    errors["whole model"] = ((back - x).abs().max() / x.abs().max()).item()
    return errors


def run_config(config, device, settings, amp, seed, progress, ceilings):
    sync = synchronizer(device)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand((config["batch"],) + e2e.IMAGE, generator=gen) - 0.5).to(device)
    progress(f"{config['name']}: build, ActNorm init, agreement checks")
    models, checks = e2e.build_models(config, device, seed, x)
    ours, rosinality = models["ours"], models["rosinality"]
    compiled = CompiledAfterInit(e2e._Loss(ours), backend=settings["compile_backend"])
    compiled_amp = CompiledAfterInit(e2e._Loss(ours), backend=settings["compile_backend"])
    losses = {}
    with torch.no_grad():
        losses["float32"] = e2e._bpd_loss(ours, x).item()
        losses["amp"] = _under(amp, device, lambda: e2e._bpd_loss(ours, x))().item()
        losses["rosinality_amp"] = _under(amp, device, lambda: e2e._rosinality_loss(rosinality, x))().item()
    started = time.perf_counter()
    losses["compiled_amp"] = _under(amp, device, lambda: compiled_amp(x))().item()  # compiles
    compile_s = time.perf_counter() - started
    checks["amp_loss_vs_float32"] = abs(losses["amp"] - losses["float32"]) / abs(losses["float32"])
    checks["compiled_amp_loss_vs_eager_amp"] = abs(losses["compiled_amp"] - losses["amp"]) / abs(losses["amp"])
    for key, tol in (("amp_loss_vs_float32", AMP_LOSS_TOL), ("compiled_amp_loss_vs_eager_amp", COMPILED_TOL)):
        if not checks[key] < tol:
            raise BenchError(f"{config['name']}: {key} relative difference {checks[key]:.3g} >= {tol:g}")
    progress(f"{config['name']}: round trips x -> z -> x, float32 and {amp}")
    round_trip = {"float32": round_trip_errors(ours, x, "none", device),
                  amp: round_trip_errors(ours, x, amp, device)}
    if not all(math.isfinite(e) for errors in round_trip.values() for e in errors.values()):
        raise BenchError(f"{config['name']}: a round trip x -> z -> x is not finite: {round_trip}")

    loss_fns = {"ours": e2e._bpd_loss, "ours_compiled": lambda m, x: compiled(x),
                "rosinality": e2e._rosinality_loss}
    loss_fns["ours_compiled_amp"] = lambda m, x: compiled_amp(x)
    model_of = {m: rosinality if m.startswith("rosinality") else ours for m in TRAIN_METHODS}
    steps = {}
    for m in TRAIN_METHODS:
        base = m.removesuffix("_amp")
        loss_fn = loss_fns.get(m, loss_fns[base])
        # A small learning rate keeps the weights (and so the work) about the same through the run.
        optimizer = (torch.optim.Adam(model_of[m].parameters(), lr=1e-6) if base == "rosinality"
                     else e2e.adam(model_of[m].parameters(), lr=1e-6))
        step = e2e._train_step(model_of[m], optimizer, loss_fn, x)
        steps[m] = _under(amp, device, step) if m.endswith("_amp") else step
    flops = {m: e2e.step_flops(model_of[m], e2e._rosinality_loss if m.startswith("rosinality")
                               else e2e._bpd_loss, x) for m in ("ours", "rosinality")}
    progress(f"{config['name']}: training steps, {', '.join(TRAIN_METHODS)}")
    train = time_methods(steps, sync, settings["reps"], settings["min_time_ms"] / 1e3,
                         settings["warmup"], grad_mode=True)
    progress(f"{config['name']}: sampling {config['batch']} images")
    sample_ours = lambda: ours.sample(config["batch"], e2e.SAMPLE_TEMPERATURE)  # noqa: E731
    sample_ros = e2e._rosinality_sampler(rosinality, config, x)
    samplers = {"ours": sample_ours, "ours_amp": _under(amp, device, sample_ours),
                "rosinality": sample_ros, "rosinality_amp": _under(amp, device, sample_ros)}
    sample = time_methods(samplers, sync, settings["reps"], settings["min_time_ms"] / 1e3,
                          settings["warmup"], grad_mode=False)

    gemm = ceilings["gemm_gflops"]
    reduced = dtype_name(AUTOCAST_DTYPES[amp])
    roofline = {m: flops["rosinality" if m.startswith("rosinality") else "ours"] / 1e9
                / gemm[reduced if m.endswith("_amp") else "float32"] / (train[m]["median_ms"] / 1e3)
                for m in TRAIN_METHODS}

    def ratio(timing, base, other):
        return {"ratio": timing[base]["median_ms"] / timing[other]["median_ms"],
                "iqr_band": dropin.ratio_band(timing[base], timing[other])}
    speedups = {
        "train": {"amp_vs_float32": ratio(train, "ours", "ours_amp"),
                  "compiled_amp_vs_compiled_float32": ratio(train, "ours_compiled", "ours_compiled_amp"),
                  "amp_vs_rosinality_amp": ratio(train, "rosinality_amp", "ours_amp"),
                  "compiled_amp_vs_rosinality_amp": ratio(train, "rosinality_amp", "ours_compiled_amp"),
                  "float32_vs_rosinality": ratio(train, "rosinality", "ours"),
                  "rosinality_amp_vs_rosinality": ratio(train, "rosinality", "rosinality_amp")},
        "sample": {"amp_vs_float32": ratio(sample, "ours", "ours_amp"),
                   "amp_vs_rosinality_amp": ratio(sample, "rosinality_amp", "ours_amp"),
                   "float32_vs_rosinality": ratio(sample, "rosinality", "ours")}}
    goal_vs_float32 = GOALS["amp_vs_float32"].get(config["name"])
    train_speedups = speedups["train"]
    goals = {"amp_vs_float32": goal_vs_float32, "amp_vs_rosinality_amp": GOALS["amp_vs_rosinality_amp"],
             "met": {key: train_speedups[key]["ratio"] >= goal for key, goal in (
                 ("amp_vs_float32", goal_vs_float32), ("compiled_amp_vs_compiled_float32", goal_vs_float32),
                 ("amp_vs_rosinality_amp", GOALS["amp_vs_rosinality_amp"]),
                 ("compiled_amp_vs_rosinality_amp", GOALS["amp_vs_rosinality_amp"])) if goal}}
    return dict(config, image=list(e2e.IMAGE), amp=amp, losses=losses, checks=checks,
                compile_s=compile_s, round_trip=round_trip, train_step=train, sample=sample,
                speedups=speedups, goals=goals, gflop_per_step=flops, roofline=roofline)


def run(args, stream=None):
    stream = stream or sys.stdout
    settings = dict(QUICK if args.quick else FULL)
    if args.compile_backend:
        settings["compile_backend"] = args.compile_backend
    device, path = dropin.start_run(args, "amp", settings, stream)
    device = torch.device(device)
    amp = AMP[device.type]
    started, load_before = time.perf_counter(), os.getloadavg()
    ceilings = measure_ceilings(device, dtypes=(torch.float32, AUTOCAST_DTYPES[amp]))
    configs = []
    for config in (QUICK_CONFIGS if args.quick else CONFIGS[device.type]):
        entry = run_config(config, device, settings, amp, args.seed,
                           lambda msg: print(f"  {msg}", file=stream, flush=True), ceilings)
        configs.append(entry)
        print("  " + "\n  ".join(digest(entry)), file=stream, flush=True)
    report = {"benchmark": "glow-ext bench-amp", **report_header(device),
              "config": dict(settings, quick=args.quick, amp=amp, wall_s=time.perf_counter() - started),
              "ceilings": ceilings, "configs": configs, "notes": NOTES}
    dropin.write_report(report, path, load_before, stream)
    if args.update_readme:
        if args.quick:
            raise BenchError("--update-readme takes full results only, not --quick ones")
        update_docs(report, path, args.readme)
    return report


def update_docs(report, path, readme=None):
    readme = Path(readme or bench_report.default_readme().with_name("mixed-precision.md"))
    link = os.path.relpath(path, readme.parent)
    bench_report.update_readme(readme, f"amp-{report['device']}", "\n".join(markdown(report, link)))


def digest(c):
    s = c["speedups"]
    return [f"{c['name']}: train {c['amp']} vs float32 {s['train']['amp_vs_float32']['ratio']:.2f}x eager, "
            f"{s['train']['compiled_amp_vs_compiled_float32']['ratio']:.2f}x compiled; vs rosinality under "
            f"the same autocast {s['train']['amp_vs_rosinality_amp']['ratio']:.2f}x eager, "
            f"{s['train']['compiled_amp_vs_rosinality_amp']['ratio']:.2f}x compiled; sampling "
            f"{s['sample']['amp_vs_float32']['ratio']:.2f}x vs float32, "
            f"{s['sample']['amp_vs_rosinality_amp']['ratio']:.2f}x vs rosinality {c['amp']}",
            f"round trip max error: " + ", ".join(
                f"{k} {v:.1e}" for k, v in c["round_trip"][c["amp"]].items())]


LABELS = {"ours": "ours, float32", "ours_amp": "ours, autocast", "ours_compiled": "ours compiled, float32",
          "ours_compiled_amp": "ours compiled, autocast", "rosinality": "rosinality-style, float32",
          "rosinality_amp": "rosinality-style, autocast"}


def _ms(t):
    return f"{t['median_ms']:.1f} (IQR {t['iqr_ms']:.1f}, n={t['n']})"


def _ratio(r, goal=None):
    text = f"{r['ratio']:.2f}x [{r['iqr_band'][0]:.2f}, {r['iqr_band'][1]:.2f}]"
    if goal is not None:
        text += f" (goal {goal}x: {'met' if r['ratio'] >= goal else '**missed**'})"
    return text


def _machine(report):
    m = report["machine"]
    if report["device"] == "cuda":
        return m["gpu_name"]
    return f"{m['cpu_model']}, {m['torch_num_threads']} threads"


def markdown(report, link):
    configs = report["configs"]
    amp = report["config"]["amp"]
    g = report["ceilings"]["gemm_gflops"]
    lines = [f"<!-- generated by `glow-ext bench-amp --update-readme` from {link}; do not edit by hand -->",
             f"`glow-ext bench-amp` ([`{Path(link).name}`]({link}); {_machine(report)}, torch "
             f"{report['torch_version']}, {report['date'][:10]}): "
             f"a Glow on 3x32x32 images trained and sampled in float32 and under `--amp {amp}` "
             "(autocast: the coupling and prior networks in reduced precision, the flow in float32), "
             "same weights, every method interleaved in one run. Times are medians (IQR, count); "
             "ratios carry the band from moving each median by half its IQR. Roofline = the step's "
             f"convolution flops at the GEMM rate measured in the same run (float32 {g['float32']:.0f}, "
             f"{dtype_name(AUTOCAST_DTYPES[amp])} {g[dtype_name(AUTOCAST_DTYPES[amp])]:.0f} GFLOP/s).", "",
             "| config | method | train ms/step | roofline | sampling ms |", "|---|---|---|---|---|"]
    for c in configs:
        for m in TRAIN_METHODS:
            sample = _ms(c["sample"][m]) if m in c["sample"] else "—"
            lines.append(f"| {c['name']} | {LABELS[m]} | {_ms(c['train_step'][m])} | "
                         f"{100 * c['roofline'][m]:.0f}% | {sample} |")
    lines += ["", f"| config | training: {amp} vs float32, eager | compiled | vs rosinality-style under the "
                  f"same autocast, eager | compiled | sampling: {amp} vs float32 | vs rosinality-style {amp} | "
                  "autocast loss vs float32 |", "|---|---|---|---|---|---|---|---|"]
    for c in configs:
        s, goals = c["speedups"], c["goals"]
        lines.append(
            f"| {c['name']} | {_ratio(s['train']['amp_vs_float32'], goals['amp_vs_float32'])} | "
            f"{_ratio(s['train']['compiled_amp_vs_compiled_float32'], goals['amp_vs_float32'])} | "
            f"{_ratio(s['train']['amp_vs_rosinality_amp'], goals['amp_vs_rosinality_amp'])} | "
            f"{_ratio(s['train']['compiled_amp_vs_rosinality_amp'], goals['amp_vs_rosinality_amp'])} | "
            f"{_ratio(s['sample']['amp_vs_float32'])} | {_ratio(s['sample']['amp_vs_rosinality_amp'])} | "
            f"{c['checks']['amp_loss_vs_float32']:.1e} |")
    lines += ["", "Round trip x → z → x, max |x_back − x| / max |x|, through each level's flow steps "
                  "and through the whole model:", "",
              "| config | precision | " + " | ".join(configs[0]["round_trip"]["float32"]) + " |",
              "|---|---|" + "---|" * len(configs[0]["round_trip"]["float32"])]
    for c in configs:
        for precision, errors in c["round_trip"].items():
            lines.append(f"| {c['name']} | {precision} | " + " | ".join(f"{v:.1e}" for v in errors.values()) + " |")
    return lines


NOTES = {
    "speedups": "ratio = median time of the first method / median time of the second (>1: the second "
                "is faster); iqr_band = the ratio with each median moved by half its IQR",
    "roofline": "flops of forward + backward (torch.utils.flop_counter: convolutions and matmuls) / "
                "the GEMM rate of the dtype the convolutions run in / the median step time",
    "round_trip": "max |x_back - x| / max |x| through each level's flow steps at its input shape, and "
                  "through encode/decode of the whole model",
    "losses": "bits/dim of the batch before timing (rosinality_amp: its own loss function)",
}


def add_arguments(parser):
    dropin.add_arguments(parser, FULL, "a tiny model for tests")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager"), default=None,
                        help="torch.compile backend of the compiled methods (default inductor; "
                             "aot_eager with --quick)")
    parser.add_argument("--update-readme", action="store_true",
                        help="replace the <!-- bench:amp-<device>:begin/end --> section of "
                             "docs/mixed-precision.md (full results only)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="page to update (default: the checkout's docs/mixed-precision.md)")


def run_command(args):
    return dropin.run_command(args, run, "bench-amp")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="glow-ext bench-amp", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
