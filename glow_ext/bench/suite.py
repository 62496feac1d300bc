"""`glow-ext bench`: what does the LU parametrisation buy? Numbers and plots, on CPU or CUDA.

Run as `glow-ext bench [--quick] [--device cpu|cuda] [--out DIR] [--update-readme]`,
`python -m glow_ext bench ...` or `python benchmarks/run_all.py`. Three parts, each written to its own
JSON under --out as soon as it finishes (so a run cut short keeps the parts it finished):

  logdet   the cost of the log-determinant and of the inverse against the channel count C, C = 8
           ... 2048 (powers of two and Glow's 12·2^k), forward and forward+backward, with the
           exponent of time ∝ C^k fitted on the large-C points -> logdet-<device>.json
  layers   ActNorm + 1x1 conv at the level shapes of Glow models for CIFAR-10, CelebA-64 and
           CelebA-HQ-256: glow_ext.bench.ops's methods (ours, naive, LU layer, folded, copy), modes
           (forward, fwd+bwd, inverse, inverse fwd+bwd) and agreement checks, ours' % of the
           roofline (ceilings measured once per run), geomeans and shapes below 1.0x over all
           level shapes, the training goals (glow_ext.bench.methods.training_targets)
           -> layers-<device>.json
  e2e      one training step (forward + backward + Adam) and sampling of a whole Glow: ours eager,
           compiled, with naive layers, and the rosinality-style model; roofline fractions and
           memory (glow_ext.bench.e2e) -> e2e-<device>.json

Part 1 lives in glow_ext.bench.curves, the timing helpers in glow_ext.bench.common. Then
glow_ext.bench.report draws logdet-<device>.png and layers-<device>.png, writes the tables to
SUMMARY-<device>.md and, with --update-readme, replaces the README's marked benchmark section.
Every part checks that its methods agree before it times them, and aborts on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import build_info, ops
from . import methods as opbench
from . import report as bench_report
from .common import MALLOC_ENV, BenchError, geomean, report_header, synchronizer, time_methods
from .ops import ceilings_of_run, print_ratio_summary, print_targets
from .curves import (CURVE_MODES, CURVES, FIT_MIN_C, LOGDET_CHANNELS, QUICK_FIT_MIN_C,
                     QUICK_LOGDET_CHANNELS, run_curves)
from ..models import Glow
from .e2e import CONFIGS as E2E_CONFIGS, QUICK_CONFIGS as QUICK_E2E_CONFIGS
from .e2e import TOL as E2E_TOL, check_glow_pair, naive_state_from_lu, run_e2e  # noqa: F401

PARTS = ("logdet", "layers", "e2e")
DEFAULT_OUT_DIR = Path("benchmarks/results")

# 2. Layer: the Glow models whose level shapes are timed (3 x image_size² input, L levels).
GLOW_MODELS = {
    "cifar10": {"image_size": 32, "L": 3, "batch": 64},
    "celeba64": {"image_size": 64, "L": 4, "batch": 32},
    "celebahq256": {"image_size": 256, "L": 6, "batch": 4},
}
QUICK_GLOW_MODELS = {"cifar10": {"image_size": 32, "L": 3, "batch": 16}}

# Timing settings per part: (reps, min_time_ms, warmup). Curves and whole models take long per call,
# so fewer repetitions; every call still sits inside a calibrated block of >= min_time.
SETTINGS = {
    "full": {"logdet": (9, 5.0, 2), "layers": (15, 5.0, 5), "e2e": (11, 5.0, 2)},
    "quick": {"logdet": (3, 1.0, 1), "layers": (3, 1.0, 1), "e2e": (3, 1.0, 1)},
}


# --------------------------------------------------------------------------------------------------
# Progress display


class Progress:
    """One line per task: [done/total percent, elapsed, remaining] what.

    The remaining time assumes the tasks still to come cost what the finished ones did on average,
    so it is a rough guide (the curves' largest C dominate).
    """

    def __init__(self, total, stream):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.start_time = time.perf_counter()

    def task(self, what):
        elapsed = time.perf_counter() - self.start_time
        left = ""
        if self.done:
            left = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left"
        pct = 100 * self.done / self.total
        print(f"[{self.done + 1:>3}/{self.total} {pct:3.0f}% {_clock(elapsed)}{left}] {what}",
              file=self.stream, flush=True)
        self.done += 1


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------------
# 2. Layer at Glow's level shapes


def glow_level_shapes(image_size, L, batch, in_channels=3):
    """(N, C, H, W) of the flow steps of each level, read off glow_ext.models.Glow itself: every
    level squeezes (4C at H/2) and all but the last split off half of the channels."""
    model = Glow(in_channels=in_channels, image_size=image_size, K=1, L=L, hidden_channels=1)
    shapes, size = [], image_size
    for level in model.levels:
        size //= 2
        shapes.append((batch, level.channels, size, size))
    return shapes


def run_layers(device, models, settings, seed, progress, stream, quick=False):
    reps, min_time_ms, warmup = settings
    sync = synchronizer(device)
    report = {"methods": opbench.METHOD_DESCRIPTIONS, "models": {}}
    problems = {}
    for name, spec in models.items():
        shapes = glow_level_shapes(spec["image_size"], spec["L"], spec["batch"])
        entry = {"image": [3, spec["image_size"], spec["image_size"]], "L": spec["L"],
                 "batch": spec["batch"], "shapes": [list(s) for s in shapes], "per_shape": {}}
        for level, shape in enumerate(shapes, 1):
            pb = opbench.Problem(shape, device, seed)
            progress.task(f"layers {name} level {level} {pb.label()}: agreement check")
            try:
                errors = opbench.check_problem(pb)
            except opbench.AgreementError as error:
                raise BenchError(str(error)) from None
            entry["per_shape"][pb.label()] = {"level": level, "cond_W": pb.cond, "checks": errors}
            problems[(name, pb.label())] = pb
        report["models"][name] = entry
    progress.task("layers: this machine's GEMM rates and copy bandwidth (the roofline's ceilings)")
    report["ceilings"] = ceilings = ceilings_of_run(device, quick, stream)
    for (name, label), pb in problems.items():
        per_shape = report["models"][name]["per_shape"][label]
        results, ratios = opbench.time_problem(
            pb, sync, reps, min_time_ms / 1e3, warmup, ceilings,
            on_mode=lambda mode: progress.task(f"layers {name} level {per_shape['level']} {label}: {mode}"))
        per_shape.update(results=results, ratios=ratios)
        opbench.print_shape_table(label, results, stream)
    for entry in report["models"].values():
        entry["geomeans"] = _geomeans(entry["per_shape"].values())
    report["geomeans_all"] = _geomeans(s for e in report["models"].values() for s in e["per_shape"].values())
    # Over every level shape of every model (13 in the full run): the training goals.
    all_shapes = {label: s for e in report["models"].values() for label, s in e["per_shape"].items()}
    report["ratio_summary_all"] = opbench.ratio_summary({k: s["ratios"] for k, s in all_shapes.items()})
    report["targets"] = opbench.training_targets({k: s["results"] for k, s in all_shapes.items()},
                                                 {k: s["ratios"] for k, s in all_shapes.items()})
    print_ratio_summary(report["ratio_summary_all"], stream)
    print_targets("training goals over the level shapes (evaluated, never fatal)", report["targets"],
                  stream)
    if device == "cuda":
        report["cuda"] = _cuda_layer_extras(problems.values(), reps, min_time_ms / 1e3, warmup, seed)
    return report


def _geomeans(per_shape):
    per_shape = list(per_shape)
    return {mode: {b: geomean([s["ratios"][mode][b] for s in per_shape]) for b in opbench.BASELINES}
            for mode in opbench.MODES}


def _cuda_layer_extras(problems, reps, min_time_s, warmup, seed):
    """The device copy bandwidth at a large shape and the host-sync check of every op, on one
    folded-path and one factored-path problem (bench-ops' functions)."""
    problems = list(problems)
    small = next((pb for pb in problems if pb.shape[1] <= 192), None)
    large = next((pb for pb in problems
                  if pb.shape[1] > 192 and pb.shape[0] * pb.shape[2] * pb.shape[3] < pb.shape[1]), None)
    sync_checks = {pb.label(): opbench.cuda_sync_check(pb) for pb in (small, large) if pb is not None}
    return {"bandwidth": opbench.cuda_bandwidth(opbench.CUDA_BANDWIDTH_SHAPE, reps, min_time_s, warmup, seed),
            "sync_check": sync_checks,
            "sync_check_passed": all(r["passed"] for s in sync_checks.values() for r in s.values())}


# --------------------------------------------------------------------------------------------------
# Driver


def plan(device, quick):
    """What a run times: the cost-curve channels, Glow models and end-to-end configs."""
    return {
        "channels": QUICK_LOGDET_CHANNELS if quick else LOGDET_CHANNELS,
        "fit_min_c": QUICK_FIT_MIN_C if quick else FIT_MIN_C,
        "models": QUICK_GLOW_MODELS if quick else GLOW_MODELS,
        "e2e": QUICK_E2E_CONFIGS if quick else E2E_CONFIGS[device],
        "settings": SETTINGS["quick" if quick else "full"],
    }


def e2e_configs(configs, size=None, compile_backend=None):
    """The e2e configs of a run: one Glow of size (K, L, width, batch) instead of configs when given;
    compile_backend ("inductor", "aot_eager" or "none": no compiled variant) set on each when given."""
    if size is not None:
        K, L, hidden, batch = size
        configs = ({"name": f"cifar10 K{K} L{L} w{hidden} b{batch}", "K": K, "L": L, "hidden": hidden,
                    "batch": batch},)
    if compile_backend is not None:
        backend = None if compile_backend == "none" else compile_backend
        configs = tuple(dict(c, compile_backend=backend) for c in configs)
    return configs


def parse_e2e_size(text):
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 4 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"an e2e Glow is K,L,WIDTH,BATCH with positive integers, got {text!r}")
    return size


def count_tasks(p, parts):
    total = 0
    if "logdet" in parts:
        total += len(p["channels"]) * (1 + len(CURVES) * len(CURVE_MODES))
    if "layers" in parts:
        levels = sum(spec["L"] for spec in p["models"].values())
        total += levels * (1 + len(opbench.MODES)) + 1  # + the roofline's ceilings
    if "e2e" in parts:
        total += 3 * len(p["e2e"])
    return total


def _header(device, quick, part, settings):
    reps, min_time_ms, warmup = settings
    return {
        "benchmark": f"glow-ext bench ({part})",
        **report_header(device),
        "config": {"quick": quick, "dtype": "float32", "reps": reps, "min_time_ms": min_time_ms,
                   "warmup": warmup,
                   "statistics": "median and interquartile range of reps measurements, each the mean "
                                 "of a calibrated block of calls lasting >= min_time_ms"},
    }


def write_json(path, report):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
    tmp.replace(path)


def part_path(out_dir, part, device):
    return Path(out_dir) / f"{part}-{device}.json"


def _refuse_to_overwrite_full_results(out_dir, parts, device):
    for part in parts:
        path = part_path(out_dir, part, device)
        if path.is_file():
            try:
                quick = json.loads(path.read_text())["config"]["quick"]
            except (ValueError, KeyError):
                continue
            if not quick:
                raise BenchError(f"--quick would overwrite the full results in {path}; "
                                 "pick another --out")


def run(args, stream=sys.stdout):
    """Run the parts named by parsed `args`, write JSON, plots and the summary; returns the reports."""
    device = args.device
    parts = tuple(args.parts or PARTS)
    out_dir = Path(args.out) if args.out else None
    if out_dir is None:
        out_dir = (Path(tempfile.mkdtemp(prefix="glow-ext-bench-quick-")) if args.quick
                   else Path(getattr(args, "_bench_default_out_dir", None) or DEFAULT_OUT_DIR))
    readme = Path(args.readme) if args.readme else bench_report.default_readme()
    if args.update_readme and args.quick:
        raise BenchError("--update-readme takes full results only, not --quick ones")
    custom_e2e = args.e2e_size is not None or args.e2e_compile is not None
    if custom_e2e and args.out is None:
        raise BenchError("--e2e-size and --e2e-compile need an --out of their own, away from the "
                         "committed results")
    if args.render_only:
        reports, files = bench_report.render(out_dir, device, readme if args.update_readme else None)
        print(f"rendered {', '.join(reports)} from {out_dir}: {', '.join(map(str, files))}", file=stream)
        return reports

    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no CUDA device")
    if not ops.kernels_available():
        raise BenchError(f"glow_ext's compiled kernels are not loaded ({ops.LOAD_ERROR}); build them first")
    if device == "cuda" and not build_info().get("cuda_kernels"):
        raise BenchError("glow_ext was built without CUDA kernels")
    if args.quick:
        _refuse_to_overwrite_full_results(out_dir, parts, device)
    if device == "cpu" and not all(os.environ.get(name) for name in MALLOC_ENV):
        print("bench: note: " + " and ".join(MALLOC_ENV) + " are not set; CPU timings may be "
              "bimodal between runs (scripts/main.sh sets them)", file=stream)

    p = plan(device, args.quick)
    p["e2e"] = e2e_configs(p["e2e"], args.e2e_size, args.e2e_compile)
    progress = Progress(count_tasks(p, parts), stream)
    print(f"glow-ext bench: device={device}{' (quick)' if args.quick else ''}, parts {', '.join(parts)}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, output {out_dir}", file=stream)
    reports = {}
    for part in parts:
        settings = p["settings"][part]
        started = time.perf_counter()
        load_before = os.getloadavg()
        if part == "logdet":
            body = run_curves(device, p["channels"], p["fit_min_c"], settings, args.seed, progress)
        elif part == "layers":
            body = run_layers(device, p["models"], settings, args.seed, progress, stream, args.quick)
        else:
            body = run_e2e(device, p["e2e"], settings, args.seed, progress)
        report = _header(device, args.quick, part, settings)
        report["config"]["wall_s"] = time.perf_counter() - started
        # Other work on the machine while timing shows up here (1, 5, 15 minute load averages).
        report["machine"]["load_average"] = {"before": load_before, "after": os.getloadavg()}
        report.update(body)
        write_json(part_path(out_dir, part, device), report)
        reports[part] = report
        print(f"wrote {part_path(out_dir, part, device)} ({report['config']['wall_s']:.0f} s)", file=stream)
        print(bench_report.part_digest(part, report), file=stream)
    files = bench_report.render(out_dir, device, readme if args.update_readme else None)[1]
    print(f"wrote {', '.join(map(str, files))}", file=stream)
    print(f"done in {_clock(time.perf_counter() - progress.start_time)}", file=stream)
    return reports


def add_arguments(parser, default_out_dir=None):
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run (well under 2 minutes): C up to 256, the CIFAR-10 levels at "
                             "batch 16, a K=2 width-16 Glow; writes to a new temporary folder unless "
                             "--out is given, and never over full results")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {default_out_dir or DEFAULT_OUT_DIR})")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                        help="run only these parts (default: all; the summary still shows the "
                             "others from their JSON files in --out)")
    parser.add_argument("--e2e-size", type=parse_e2e_size, default=None, metavar="K,L,WIDTH,BATCH",
                        help="e2e: time this one Glow (3x32x32 images) instead of the device's configs")
    parser.add_argument("--e2e-compile", choices=("inductor", "aot_eager", "none"), default=None,
                        help="e2e: torch.compile backend of the compiled variant, or none to time "
                             "eager methods only (default: inductor, aot_eager with --quick)")
    bench_report.add_readme_arguments(parser, "<device>", "redraw the plots and SUMMARY-<device>.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    parser.add_argument("--seed", type=int, default=0, help="seed of every parameter and input")
    parser.set_defaults(_bench_default_out_dir=default_out_dir)


def run_command(args):
    """run(args) as a command: exit status 0, or 2 with the message of a failed check or bad setup."""
    try:
        run(args)
    except (BenchError, FileNotFoundError, ValueError) as error:
        print(f"glow-ext bench: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None, default_out_dir=None):
    parser = argparse.ArgumentParser(prog="glow-ext bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser, default_out_dir)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
