"""Op benchmark: the fused ActNorm + LU 1x1 convolution against pure-PyTorch formulations.

Run as `python -m glow_ext bench-ops [options]` (or `glow-ext bench-ops`, or
`python benchmarks/bench_ops.py`). Every method starts from the same LU parameters:

  ours      glow_ext.ops.actnorm_invconv_lu / actnorm_invconv_lu_inverse
  naive     (a) ActNorm, then F.conv2d with a plain (C, C, 1, 1) weight (a layer parameter, built
            once outside the timed region); logdet through torch.linalg.slogdet(W); the inverse
            computes torch.inverse(W) on every call
  lu_layer  (b) the usual LU layer: W = P @ (lower*l_mask + I) @ (upper*u_mask + diag(sign_s*exp(log_s)))
            assembled with two C x C matmuls on every call (P a dense matrix buffer), ActNorm as a
            separate op, F.conv2d; the inverse runs torch.inverse on the assembled W
  folded    (c) plain float32 PyTorch, as a user would write it: masks built once,
            W = P @ (lower*lmask + I) @ (upper*umask + diag(sign_s*exp(log_s))), a = exp(logs),
            y = baddbmm((W @ (a*bias)).view(1,C,1), (W*a).expand(N,C,C), x.view(N,C,H*W)), autograd
            for the rest; the inverse takes W^-1 from two triangular solves and folds it likewise
  folded_perm (c') the same fold with W = (L @ U')[perm]: the rows permuted by indexing, one C x C
            matmul fewer than (c), so the stronger plain-PyTorch baseline at large C
  clone     (d) x.clone(): the memory floor

Modes: forward (y and logdet, under no_grad), fwd+bwd (loss = (y*g).sum() + logdet, backward
through autograd into x and the parameters), inverse (under no_grad) and inverse fwd+bwd (loss =
(x*g).sum() through the inverse, backward into y and the parameters). Before anything is timed
the methods are checked against ours (outputs, logdet, inverse round trip, gradients of both
training modes); a mismatch aborts the run. The run also measures this machine's GEMM rates and
copy bandwidth (glow_ext.bench.roofline) and reports ours' time in every mode as a percentage of
its roofline, and the forward op's backward alone (timed on a graph built once) as a row of its own.
Speed goals (e.g. the forward at least 5x naive on average) are evaluated and printed, but a
missed goal never changes the exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import report as bench_report
from .common import MALLOC_ENV, geomean, geomean_str, report_header, synchronizer
from .methods import (BASELINES, CUDA_BANDWIDTH_SHAPE, GRAD_TOL, METHOD_DESCRIPTIONS, MODES,
                      OUTPUT_TOL, PERTURBATION, ROUND_TRIP_TOL, AgreementError, Problem,
                      check_problem, cuda_bandwidth, cuda_sync_check, make_target,
                      print_shape_table, ratio_summary, time_problem, training_targets)
from .roofline import measure_ceilings

SHAPES = (
    (64, 12, 16, 16),
    (64, 24, 8, 8),
    (64, 48, 4, 4),
    (16, 12, 32, 32),
    (64, 96, 8, 8),
    (4, 12, 128, 128),
    (16, 512, 4, 4),
    (16, 1024, 4, 4),
)
# One small-C shape (the per-pixel regime) and one large-C shape (the O(C^3) assembly regime).
QUICK_SHAPES = ((64, 12, 16, 16), (16, 512, 4, 4))

# --------------------------------------------------------------------------------------------------
# Reporting


def evaluate_targets(results, ratios, shapes):
    """The op's speed goals, then the training goals: make_target entries."""
    targets = []

    def target(*args):
        targets.append(make_target(*args))

    def gm(mode, baseline):
        return geomean([ratios[s][mode][baseline] for s in ratios])

    target("forward geomean speedup vs (a) naive", gm("forward", "naive"), ">=", 5.0)
    target("forward geomean speedup vs (b) lu_layer", gm("forward", "lu_layer"), ">=", 5.0)
    target("forward geomean speedup vs (c) folded", gm("forward", "folded"), ">=", 1.2)
    worst = min(((ratios[s]["forward"][b], s, b) for s in ratios for b in BASELINES))
    target("forward: no shape below 1.0x vs any baseline", worst[0], ">=", 1.0,
           f"worst: {worst[2]} at {worst[1]}")
    target("fwd+bwd geomean speedup vs (a) naive", gm("fwd+bwd", "naive"), ">=", 3.0)
    target("fwd+bwd geomean speedup vs (c) folded", gm("fwd+bwd", "folded"), ">=", 1.2)
    target("inverse geomean speedup vs (a) naive", gm("inverse", "naive"), ">=", 5.0)
    small = [s for s in shapes if s[1] <= 24]
    if small:
        per_shape = {"x".join(map(str, s)):
                     results["x".join(map(str, s))]["forward"]["ours"]["median_ms"]
                     / results["x".join(map(str, s))]["forward"]["clone"]["median_ms"]
                     for s in small}
        worst_label = max(per_shape, key=per_shape.get)
        target("C <= 24: ours forward time / clone time", per_shape[worst_label], "<=", 2.5,
               f"worst at {worst_label}; per shape "
               + ", ".join(f"{k} {v:.2f}" for k, v in per_shape.items()))
    return targets + training_targets(results, ratios)


# --------------------------------------------------------------------------------------------------
# Entry points


def parse_shape(text):
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"a shape is N,C,H,W with positive integers, got {text!r}")
    return shape


def add_arguments(parser, default_out_dir=None):
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device to benchmark on (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shapes {' '.join('x'.join(map(str, s)) for s in QUICK_SHAPES)}, "
                             "few repetitions (well under a minute)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="N,C,H,W",
                        help="shapes to run instead of the default set")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: "
                             f"{Path(default_out_dir or 'benchmarks/results') / 'ops-<device>.json'}, "
                             "ops-<device>-quick.json with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's default)")
    parser.add_argument("--reps", type=int, default=None,
                        help="measurements per method (default: 15, 5 with --quick)")
    parser.add_argument("--min-time-ms", type=float, default=None,
                        help="minimum duration of one measurement (default: 5, 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and inputs")
    bench_report.add_readme_arguments(parser, "ops-<device>", "print the tables")
    parser.set_defaults(_bench_default_out_dir=default_out_dir)


def run(args, stream=sys.stdout):
    """Run the benchmark described by parsed `args`; returns the result dict (also written as JSON)."""
    device = args.device
    out_dir = Path(getattr(args, "_bench_default_out_dir", None) or "benchmarks/results")
    # A quick run never overwrites the full results.
    out_path = Path(args.out) if args.out else out_dir / f"ops-{device}{'-quick' if args.quick else ''}.json"
    if args.update_readme and args.quick:
        raise SystemExit("bench-ops: --update-readme takes full results only, not --quick ones")
    if args.render_only:
        report = json.loads(out_path.read_text())
        try:
            bench_report.require_roofline(report, out_path, "glow-ext bench-ops")
        except ValueError as error:
            raise SystemExit(f"bench-ops: {error}") from None
        print(_render(report, out_path, args), file=stream)
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    info = _check_build(device, stream)
    shapes = list(args.shapes or (QUICK_SHAPES if args.quick else SHAPES))
    reps = args.reps or (5 if args.quick else 15)
    min_time_s = (args.min_time_ms or (2.0 if args.quick else 5.0)) / 1e3
    warmup = 2 if args.quick else 5

    print(f"glow_ext bench-ops: device={device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {reps} measurements of >= {min_time_s * 1e3:g} ms each",
          file=stream)
    print(f"build_info: {json.dumps(info, sort_keys=True)}", file=stream)
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}", file=stream)

    problems, checks = _check_agreement(shapes, device, args.seed, stream)
    wall = time.perf_counter()
    ceilings = ceilings_of_run(device, args.quick, stream)
    results, ratios = _time_problems(problems, synchronizer(device), reps, min_time_s, warmup,
                                     ceilings, stream)
    elapsed = time.perf_counter() - wall
    geomeans = {mode: {b: geomean([ratios[s][mode][b] for s in ratios]) for b in BASELINES}
                for mode in MODES}
    summary = ratio_summary(ratios)
    targets = evaluate_targets(results, ratios, shapes)
    cuda_extra = (_cuda_extras(problems, reps, min_time_s, warmup, args.seed)
                  if device == "cuda" else None)
    _print_summary(device, summary, results, targets, cuda_extra, stream)

    report = {
        "benchmark": "glow_ext bench-ops",
        **report_header(device),
        "config": {"quick": bool(args.quick), "shapes": [list(s) for s in shapes], "reps": reps,
                   "min_time_ms": min_time_s * 1e3, "warmup": warmup, "seed": args.seed,
                   "dtype": "float32", "perturbation": PERTURBATION,
                   "tolerances": {"output": OUTPUT_TOL, "round_trip": ROUND_TRIP_TOL, "grad": GRAD_TOL},
                   "timing_wall_s": elapsed},
        "methods": METHOD_DESCRIPTIONS,
        "checks": checks,
        "results": results,
        "ratios": ratios,
        "geomeans": geomeans,
        "ratio_summary": summary,
        "ceilings": ceilings,
        "targets": targets,
        "targets_passed": all(t["passed"] for t in targets),
    }
    if cuda_extra:
        report["cuda"] = cuda_extra
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False, default=float) + "\n")
    tmp.replace(out_path)
    print(f"\nwrote {out_path} (timing took {elapsed:.0f} s)", file=stream)
    if args.update_readme:
        _render(report, out_path, args)
    return report


def _render(report, json_path, args):
    """The README tables of a report; written into the README's marked section with --update-readme."""
    readme = Path(args.readme) if args.readme else bench_report.default_readme()
    link = os.path.relpath(Path(json_path).resolve(), readme.resolve().parent)
    text = bench_report.ops_markdown(report, link)
    if args.update_readme:
        if report["config"]["quick"]:
            raise SystemExit("bench-ops: --update-readme takes full results only, not --quick ones")
        bench_report.update_readme(readme, f"ops-{report['device']}", text)
    return text


def _check_build(device, stream):
    """build_info(), after refusing to time the reference in place of missing kernels."""
    import glow_ext
    from .. import ops

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-ops: --device cuda, but torch sees no CUDA device")
    info = glow_ext.build_info()
    if not ops.kernels_available():
        raise SystemExit(f"bench-ops: glow_ext's compiled kernels are not loaded ({ops.LOAD_ERROR}); "
                         "'ours' would be the pure-PyTorch reference. Build the extension first.")
    if device == "cuda" and not info.get("cuda_kernels"):
        raise SystemExit(f"bench-ops: glow_ext was built without CUDA kernels (build_info: {info})")
    if device == "cpu" and not all(os.environ.get(name) for name in MALLOC_ENV):
        print("bench-ops: note: " + " and ".join(MALLOC_ENV) + " are not set, so fresh allocations "
              "may page-fault and CPU timings of every method vary between runs (scripts/main.sh "
              "sets them)", file=stream)
    return info


def _check_agreement(shapes, device, seed, stream):
    """Every shape's Problem, checked before any timing: ({label: problem}, {label: errors})."""
    problems, checks = {}, {}
    for shape in shapes:
        pb = Problem(shape, device, seed)
        try:
            errors = check_problem(pb)
        except AgreementError as error:
            raise SystemExit(f"bench-ops: AGREEMENT CHECK FAILED, nothing timed.\n{error}") from None
        worst = max(errors, key=errors.get)
        print(f"check {pb.label():>14}: all methods agree with ours (cond(W) {pb.cond:.2f}; "
              f"largest relative error {errors[worst]:.1e} at {worst})", file=stream)
        problems[pb.label()] = pb
        checks[pb.label()] = {"cond_W": pb.cond, "errors": errors}
    return problems, checks


def ceilings_of_run(device, quick, stream):
    """This machine's GEMM rates and copy bandwidth, measured once per run (roofline module)."""
    ceilings = measure_ceilings(device, reps=3 if quick else 5, min_time_s=0.1 if quick else 0.3)
    print(f"ceilings: GEMM {ceilings['gemm_gflops']['float32']:.0f} GFLOP/s float32, "
          f"{ceilings['gemm_gflops']['float64']:.0f} GFLOP/s float64 ({ceilings['gemm_size']}^3 mm); "
          f"copy {ceilings['copy_gbps']:.1f} GB/s (read + write, {ceilings['copy_mb']} MB)", file=stream)
    return ceilings


def _time_problems(problems, sync, reps, min_time_s, warmup, ceilings, stream):
    results, ratios = {}, {}
    for index, (label, pb) in enumerate(problems.items(), 1):
        n, c, h, w = pb.shape
        print(f"[{index}/{len(problems)}] {label}  (C={c}, N·H·W={n * h * w}; "
              "ms per call, median; ours ±IQR; (baseline/ours); clone (x ours/clone); "
              "ours' % of roofline)", file=stream)
        results[label], ratios[label] = time_problem(pb, sync, reps, min_time_s, warmup, ceilings)
        print_shape_table(label, results[label], stream)
    return results, ratios


def _cuda_extras(problems, reps, min_time_s, warmup, seed):
    bw = cuda_bandwidth(CUDA_BANDWIDTH_SHAPE, reps, min_time_s, warmup, seed)
    small = next((pb for pb in problems.values() if pb.shape[1] <= 192), None)
    large = next((pb for pb in problems.values()
                  if pb.shape[1] > 192 and pb.shape[0] * pb.shape[2] * pb.shape[3] < pb.shape[1]),
                 None)
    sync_checks = {pb.label(): cuda_sync_check(pb) for pb in (small, large) if pb is not None}
    return {"bandwidth": bw, "sync_check": sync_checks,
            "sync_check_passed": all(r["passed"] for s in sync_checks.values() for r in s.values())}


def print_ratio_summary(summary, stream):
    """Geomean of baseline time / ours per mode and baseline, and the shapes where ours is slower."""
    n = next(iter(summary["forward"].values()))["n_shapes"]
    # "summary:" starts the part of the log that benchmarks/gpu_check.sh copies.
    print(f"\nsummary: over {n} shapes, geometric mean of baseline time / ours (higher is better); "
          "[shapes where ours < 1.0x]", file=stream)
    print(f"  {'mode':<15} " + " ".join(f"{b:>14}" for b in BASELINES), file=stream)
    for mode in MODES:
        cells = [f"{geomean_str(s['geomean'])} [{s['shapes_below_1x']}]"
                 for s in (summary[mode][b] for b in BASELINES)]
        print(f"  {mode:<15} " + " ".join(f"{c:>14}" for c in cells), file=stream)


def print_targets(title, targets, stream):
    print(f"\n{title}:", file=stream)
    for t in targets:
        mark = "met   " if t["passed"] else "MISSED"
        detail = f"  [{t['detail']}]" if t.get("detail") else ""
        print(f"  {mark}  {t['target']}: {t['value']:.2f} (goal {t['op']} {t['threshold']:g}){detail}",
              file=stream)


def _print_summary(device, summary, results, targets, cuda_extra, stream):
    print_ratio_summary(summary, stream)
    print_targets(f"speed goals ({device}; evaluated, never fatal)", targets, stream)
    if not cuda_extra:
        return
    bw = cuda_extra["bandwidth"]
    print(f"\nbandwidth at {'x'.join(map(str, bw['shape']))}: ours forward "
          f"{bw['ours_forward_gbps']:.1f} GB/s vs device copy (x.clone()) {bw['copy_gbps']:.1f} GB/s "
          f"= {100 * bw['fraction_of_copy']:.0f}%", file=stream)
    for label in results:
        b = results[label]["bandwidth_gbps"]
        print(f"  {label:>14}: ours {b['ours_forward']:.1f} GB/s, clone {b['clone']:.1f} GB/s",
              file=stream)
    print("host-sync check (torch.cuda.set_sync_debug_mode('error')):", file=stream)
    for label, per_op in cuda_extra["sync_check"].items():
        print(f"  {label:>14}: " + ", ".join(
            f"{op} {'no sync' if r['passed'] else 'SYNCS (' + r['error'] + ')'}"
            for op, r in per_op.items()), file=stream)


def build_parser(default_out_dir=None):
    parser = argparse.ArgumentParser(
        prog="glow-ext bench-ops",
        description=__doc__.split("\n\n")[0],
        epilog="Baselines: " + "; ".join(f"{k}: {v}" for k, v in METHOD_DESCRIPTIONS.items()))
    add_arguments(parser, default_out_dir)
    return parser


def main(argv=None, default_out_dir=None):
    args = build_parser(default_out_dir).parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
