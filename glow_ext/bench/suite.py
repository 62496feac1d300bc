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
           level shapes, issue 9's targets -> layers-<device>.json
  e2e      one training step (forward + backward + Adam) and sampling of a whole Glow with the fused
           layers against the same model with naive layers, plus memory -> e2e-<device>.json

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

from .. import build_info, ops, reversible
from . import methods as opbench
from . import report as bench_report
from .common import MALLOC_ENV, BenchError, geomean, report_header, synchronizer, time_methods
from .ops import ceilings_of_run, print_ratio_summary, print_targets
from .curves import (CURVE_MODES, CURVES, FIT_MIN_C, LOGDET_CHANNELS, QUICK_FIT_MIN_C,
                     QUICK_LOGDET_CHANNELS, run_curves)
from ..models import Glow
from ..nn import FlowStep

PARTS = ("logdet", "layers", "e2e")
DEFAULT_OUT_DIR = Path("benchmarks/results")

# 2. Layer: the Glow models whose level shapes are timed (3 x image_size² input, L levels).
GLOW_MODELS = {
    "cifar10": {"image_size": 32, "L": 3, "batch": 64},
    "celeba64": {"image_size": 64, "L": 4, "batch": 32},
    "celebahq256": {"image_size": 256, "L": 6, "batch": 4},
}
QUICK_GLOW_MODELS = {"cifar10": {"image_size": 32, "L": 3, "batch": 16}}

# 3. End to end: Glow on 3x32x32 images (CIFAR-10's), affine coupling, Adam. The paper's model is
# K=32, L=3, width 512; on a CPU the width-128 model is the scaled-down main case.
E2E_CONFIGS = {
    "cpu": ({"name": "cifar10 K32 w128 b16", "K": 32, "L": 3, "hidden": 128, "batch": 16},
            {"name": "cifar10 K32 w512 b16", "K": 32, "L": 3, "hidden": 512, "batch": 16}),
    "cuda": ({"name": "cifar10 K32 w512 b64", "K": 32, "L": 3, "hidden": 512, "batch": 64},),
}
QUICK_E2E_CONFIGS = ({"name": "cifar10 K2 w16 b4", "K": 2, "L": 3, "hidden": 16, "batch": 4},)
E2E_IMAGE = (3, 32, 32)
# ours and naive hold the same weights; floor is the same network without a 1x1 conv (ActNorm and a
# channel reversal), the time everything else takes.
E2E_MODELS = (("ours", "invconv_lu"), ("naive", "invconv"), ("floor", "reverse"))
E2E_TOL = 1e-3
SAMPLE_TEMPERATURE = 0.7
N_BINS = 256

# Timing settings per part: (reps, min_time_ms, warmup). Curves and whole models take long per call,
# so fewer repetitions; every call still sits inside a calibrated block of >= min_time.
SETTINGS = {
    "full": {"logdet": (9, 5.0, 2), "layers": (15, 5.0, 5), "e2e": (7, 5.0, 2)},
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
    # Over every level shape of every model (13 in the full run): issue 9's targets.
    all_shapes = {label: s for e in report["models"].values() for label, s in e["per_shape"].items()}
    report["ratio_summary_all"] = opbench.ratio_summary({k: s["ratios"] for k, s in all_shapes.items()})
    report["targets"] = opbench.training_targets({k: s["results"] for k, s in all_shapes.items()},
                                                 {k: s["ratios"] for k, s in all_shapes.items()})
    print_ratio_summary(report["ratio_summary_all"], stream)
    print_targets("issue 9's targets over the level shapes (evaluated, never fatal)", report["targets"],
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
# 3. End to end


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


def _sample(model, n, seed):
    torch.manual_seed(seed)
    return model.sample(n, temperature=SAMPLE_TEMPERATURE)


def check_glow_pair(lu, naive, x, seed):
    """The two models hold the same weights: bits/dim, gradients of shared parameters and samples
    (same seed) must agree."""
    errors, failures = {}, []

    def record(key, value):
        errors[key] = value
        if not value < E2E_TOL:
            failures.append(f"{key}: relative error {value:.3g} >= {E2E_TOL:g}")

    with torch.no_grad():
        record("bits_per_dim", opbench.rel_err(naive.bits_per_dim(x, N_BINS), lu.bits_per_dim(x, N_BINS)))
    for model in (lu, naive):
        model.zero_grad(set_to_none=True)
        _bpd_loss(model, x).backward()
    naive_params = dict(naive.named_parameters())
    shared = [(n, p) for n, p in lu.named_parameters() if n in naive_params]
    # One error over all shared gradients: in float32 a deep coupling net's tiny gradients carry
    # round-off of a few % of their own size (in float64 every one agrees to 1e-14).
    record("grad_shared_parameters", opbench.rel_err(
        torch.cat([naive_params[n].grad.flatten() for n, _ in shared]),
        torch.cat([p.grad.flatten() for _, p in shared])))
    for model in (lu, naive):
        model.zero_grad(set_to_none=True)
    record("sample", opbench.rel_err(_sample(naive, x.shape[0], seed), _sample(lu, x.shape[0], seed)))
    if failures:
        raise BenchError("end to end: the fused and the naive Glow disagree:\n  " + "\n  ".join(failures))
    errors["shared_parameters"] = len(shared)
    return errors


def _train_step(model, optimizer, x):
    def step():
        optimizer.zero_grad(set_to_none=True)
        _bpd_loss(model, x).backward()
        optimizer.step()
    return step


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


def run_e2e_config(config, device, settings, seed, progress):
    reps, min_time_ms, warmup = settings
    sync = synchronizer(device)
    label = config["name"]
    models = {}
    for method, permutation in E2E_MODELS:
        torch.manual_seed(seed)
        models[method] = Glow(in_channels=E2E_IMAGE[0], image_size=E2E_IMAGE[1], K=config["K"],
                              L=config["L"], hidden_channels=config["hidden"], coupling="affine",
                              permutation=permutation).to(device)
    lu, naive = models["ours"], models["naive"]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand((config["batch"],) + E2E_IMAGE, generator=gen) - 0.5).to(device)

    progress.task(f"e2e {label}: ActNorm init, one Adam step, agreement check")
    for model in models.values():
        model.train()
    with torch.no_grad():
        lu(x)  # data-dependent ActNorm init
        models["floor"](x)
    # One step so that the zero-initialised convs are not zero and the check has something to check.
    optimizer = torch.optim.Adam(lu.parameters(), lr=1e-3)
    _train_step(lu, optimizer, x)()
    naive.load_state_dict(naive_state_from_lu(lu, naive))
    checks = check_glow_pair(lu, naive, x, seed)

    # A tiny learning rate keeps the weights (and so the work) the same through the timed steps.
    optimizers = {m: torch.optim.Adam(models[m].parameters(), lr=1e-6) for m in models}
    steps = {m: _train_step(models[m], optimizers[m], x) for m in models}
    memory = {"saved_for_backward_bytes": {
        m: reversible.saved_tensor_bytes(_bpd_loss, models[m], x)[1] for m in models}}
    if device == "cuda":
        for step in steps.values():
            step()  # optimizer state allocated before the peak is measured
        memory["cuda_peak_step_bytes"] = {m: _cuda_peak_bytes(steps[m]) for m in models}

    progress.task(f"e2e {label}: training step (forward + backward + Adam), ours, naive, floor")
    train = time_methods(steps, sync, reps, min_time_ms / 1e3, warmup, grad_mode=True)
    progress.task(f"e2e {label}: sampling {config['batch']} images at T={SAMPLE_TEMPERATURE}")
    sample = time_methods({m: (lambda m=m: models[m].sample(config["batch"], SAMPLE_TEMPERATURE))
                           for m in models}, sync, reps, min_time_ms / 1e3, warmup, grad_mode=False)
    ips, conv_share = {}, {}
    for kind, res in (("train", train), ("sample", sample)):
        ips[kind] = {m: config["batch"] / (res[m]["median_ms"] / 1e3) for m in models}
        ips[kind]["ratio"] = ips[kind]["ours"] / ips[kind]["naive"]
        # The part of the time that the 1x1 conv adds over the floor model (which keeps ActNorm).
        conv_share[kind] = {m: 1 - res["floor"]["median_ms"] / res[m]["median_ms"] for m in ("ours", "naive")}
    entry = dict(config, image=list(E2E_IMAGE), coupling="affine", optimizer="Adam",
                 parameters={m: sum(p.numel() for p in models[m].parameters()) for m in models},
                 checks=checks, train_step=train, sample=sample, images_per_s=ips,
                 invconv_share=conv_share, memory=memory)
    if device == "cuda":
        entry["host_sync_free"] = {}
        for m in models:
            free, message = _host_sync_free(steps[m])
            entry["host_sync_free"][m] = {"train_step": free, "first_sync": message}
    return entry


def run_e2e(device, configs, settings, seed, progress):
    return {"configs": [run_e2e_config(c, device, settings, seed, progress) for c in configs],
            "methods": {"ours": "Glow(permutation='invconv_lu'): the fused ActNormInvConv2d per step",
                        "naive": "Glow(permutation='invconv'): ActNorm2d + InvConv2d (dense W, slogdet "
                                 "in float64 per call, float64 inverse when sampling)",
                        "floor": "Glow(permutation='reverse'): ActNorm2d + channel reversal, no 1x1 conv "
                                 "(not checked against the others: a different model, timed as the floor)"},
            "invconv_share_note": "1 - floor time / model time: the share of a step that the 1x1 "
                                  "conv adds over the floor model (which keeps ActNorm)",
            "memory_note": "saved_for_backward_bytes: distinct storages autograd keeps for the backward "
                           "of one loss (glow_ext.reversible.saved_tensor_bytes, parameters included); "
                           "deterministic, and the CPU measure (process RSS is not per model). "
                           "cuda_peak_step_bytes: torch.cuda.max_memory_allocated over one training "
                           "step, above what was allocated before it."}


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
    parser.add_argument("--update-readme", action="store_true",
                        help="replace the README's section between <!-- bench:<device>:begin --> and "
                             "<!-- bench:<device>:end --> with the summary (full results only)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README to update (default: the checkout's README.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="time nothing: redraw plots, SUMMARY-<device>.md (and the README section) "
                             "from the JSON files in --out")
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
