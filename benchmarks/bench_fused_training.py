#!/usr/bin/env python3
"""The fused ActNorm + LU 1x1 op in training (issue 9, items 2 and 3), methods interleaved in one
process (medians with the interquartile range, glow_ext.bench.common.time_methods).

Per shape (the 13 Glow level shapes of glow_ext.bench.suite.GLOW_MODELS and the bench-ops shapes):
  fwd+bwd   forward + backward, every parameter requiring grad, loss (y·g).sum() + logdet:
            ours, naive, lu_layer (glow_ext.bench.methods) and "folded" as issue 9 defines it
            (built here: masks once, W = P @ (lower*lmask + I) @ (upper*umask + diag(sign_s*exp(log_s))),
            one baddbmm);
  fwd, bwd  ours alone: forward with grad recording, and the autograd backward of that graph
            (retain_graph; its time is the backward's), for backward / forward;
  inv       inverse forward + backward, loss (x·g).sum(): ours against the naive inverse layer
            (torch.inverse of the dense W, conv2d, ActNorm undone); also at (1, C, 4, 4) for the
            C of the logdet/inverse sweep of glow_ext.bench.curves.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912 \
        python benchmarks/bench_fused_training.py [--threads 2] [--reps 15] [--out FILE.json]
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if (HERE.parent / "glow_ext" / "__init__.py").is_file():
    sys.path.insert(0, str(HERE.parent))

from glow_ext.bench import methods as mb  # noqa: E402
from glow_ext.bench.common import geomean, report_header, time_methods  # noqa: E402
from glow_ext.bench.ops import SHAPES as OPS_SHAPES  # noqa: E402
from glow_ext.bench.suite import GLOW_MODELS, glow_level_shapes  # noqa: E402

SWEEP_CHANNELS = (8, 12, 16, 24, 32, 48, 64, 96, 128)


def issue_folded_forward(pb, x, bias, logs, lower, upper, log_s):
    """Issue 9's "folded": plain float32 PyTorch as a user would write it."""
    n, c, h, w = x.shape
    weight = pb.p_matrix @ (lower * pb.l_mask + pb.eye) @ (
        upper * pb.u_mask + torch.diag(pb.sign_s * log_s.exp()))
    a = logs.exp()
    y = torch.baddbmm((weight @ (a * bias)).view(1, c, 1), (weight * a).expand(n, c, c),
                      x.view(n, c, h * w))
    return y.view(n, c, h, w), (h * w) * (logs.sum() + log_s.sum())


def train_step(pb, fn, theta):
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + theta)

    def step():
        y, logdet = fn(pb, *leaves)
        ((y * pb.g).sum() + logdet).backward()
        for t in leaves:
            t.grad = None
    return step


def ours_forward_and_backward(pb):
    """(forward with grad recording, backward of one retained graph) for ours."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + pb.lu_theta())
    one = torch.ones((), dtype=pb.x.dtype)
    y, logdet = mb.ours_forward(pb, *leaves)
    return (lambda: mb.ours_forward(pb, *leaves),
            lambda: torch.autograd.grad((y, logdet), leaves, (pb.g, one), retain_graph=True))


def inverse_step(pb, fn, theta):
    with torch.no_grad():
        y = mb.ours_forward(pb, pb.x, *pb.lu_theta())[0]
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (y,) + theta)

    def step():
        (fn(pb, *leaves) * pb.g).sum().backward()
        for t in leaves:
            t.grad = None
    return step


def check_folded(pb):
    """The issue's folded baseline agrees with ours (forward and gradients)."""
    grads = []
    for fn in (mb.ours_forward, issue_folded_forward):
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (pb.x,) + pb.lu_theta())
        y, logdet = fn(pb, *leaves)
        ((y * pb.g).sum() + logdet).backward()
        grads.append([y] + [t.grad for t in leaves])
    worst = max(mb.rel_err(a, b) for a, b in zip(*grads))
    assert worst < mb.GRAD_TOL, f"{pb.label()}: issue folded disagrees with ours ({worst:.2g})"


def measure_shape(shape, reps, min_time_s, warmup, full=True):
    pb = mb.Problem(shape, "cpu", seed=0)
    calls = {"inv_ours": inverse_step(pb, mb.ours_inverse, pb.lu_theta()),
             "inv_naive": inverse_step(pb, mb.naive_inverse, pb.theta("naive"))}
    if full:
        check_folded(pb)
        fwd, bwd = ours_forward_and_backward(pb)
        calls.update({"ours": train_step(pb, mb.ours_forward, pb.lu_theta()),
                      "naive": train_step(pb, mb.naive_forward, pb.theta("naive")),
                      "lu_layer": train_step(pb, mb.lu_layer_forward, pb.lu_theta()),
                      "folded": train_step(pb, issue_folded_forward, pb.lu_theta()),
                      "fwd": fwd, "bwd": bwd})
    res = time_methods(calls, lambda: None, reps, min_time_s, warmup, grad_mode=True)
    med = {k: v["median_ms"] for k, v in res.items()}
    out = {"timings": res, "inv_vs_naive": med["inv_naive"] / med["inv_ours"]}
    if full:
        out.update({f"vs_{b}": med[b] / med["ours"] for b in ("naive", "lu_layer", "folded")})
        out["bwd_over_fwd"] = med["bwd"] / med["fwd"]
    return out


def _spread(res, key):
    r = res["timings"][key]
    return f"{r['median_ms']:.3f}±{r['iqr_ms']:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--min-time-ms", type=float, default=20.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", help="N,C,H,W (default: level + bench-ops shapes)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the (1, C, 4, 4) inverse sweep")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [tuple(s) for m in GLOW_MODELS.values()
              for s in glow_level_shapes(m["image_size"], m["L"], m["batch"])]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    else:
        shapes = levels + [s for s in OPS_SHAPES if s not in levels]
    timing = (args.reps, args.min_time_ms / 1e3, args.warmup)
    report = {"header": report_header("cpu"), "threads": args.threads, "shapes": {}, "sweep": {},
              "load_average_start": os.getloadavg()}
    print(f"{'shape':>14} {'vs naive':>8} {'vs LU':>6} {'vs fold':>7} {'bwd/fwd':>7} {'inv':>6}"
          f"  ours fwd+bwd ms  ours fwd ms  ours bwd ms")
    for shape in shapes:
        res = measure_shape(shape, *timing)
        report["shapes"]["x".join(map(str, shape))] = res
        print(f"{'x'.join(map(str, shape)):>14} {res['vs_naive']:8.2f} {res['vs_lu_layer']:6.2f} "
              f"{res['vs_folded']:7.2f} {res['bwd_over_fwd']:7.2f} {res['inv_vs_naive']:6.2f}  "
              f"{_spread(res, 'ours'):>15} {_spread(res, 'fwd'):>12} {_spread(res, 'bwd'):>12}",
              flush=True)
    level_labels = ["x".join(map(str, s)) for s in levels if s in shapes]
    if level_labels:
        report["geomean_vs_folded_levels"] = geomean(
            [report["shapes"][k]["vs_folded"] for k in level_labels])
        print(f"geomean vs folded over {len(level_labels)} level shapes: "
              f"{report['geomean_vs_folded_levels']:.2f}x")
    if not args.no_sweep:
        for c in SWEEP_CHANNELS:
            res = measure_shape((1, c, 4, 4), *timing, full=False)
            report["sweep"][str(c)] = res
            print(f"inverse fwd+bwd (1,{c},4,4): {res['inv_vs_naive']:.2f}x vs naive inverse "
                  f"(ours {_spread(res, 'inv_ours')} ms)", flush=True)
    report["load_average_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {report['load_average_start']}, at end "
          f"{report['load_average_end']} on {os.cpu_count()} CPUs")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
