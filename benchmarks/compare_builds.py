"""Before/after check of the float32 paths: two checkouts of glow_ext, each with its own built
module, timed in alternating subprocesses (round after round, so load drift hits both alike).

    python benchmarks/compare_builds.py --before /path/to/old/checkout [--after .] [--rounds 6]

Each round runs, in one subprocess per checkout: a Glow training step in float32 (K=8, width 128,
batch 16 of 3x32x32, the trainer's fused Adam; median of --step-reps steps) and the fused layers'
forward + backward at Glow's level shapes (medians of --op-reps calls after 20 warm-up calls). Reported per case: the median
over rounds of before/after (>1: the after checkout is faster), with the spread of the per-round
ratios. Writes JSON to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The child: times every case once in this process's checkout and prints {case: median seconds}.
CHILD = r"""
import json, sys, time, statistics, torch
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
step_reps, op_reps = int(sys.argv[2]), int(sys.argv[3])
from glow_ext.models import Glow
from glow_ext.nn import ActNormInvConv2d
from glow_ext import coupling_ops
from glow_ext.training.objective import adam

def median_time(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)

out = {}
x = torch.rand(16, 3, 32, 32) - 0.5
model = Glow(in_channels=3, image_size=32, K=8, L=3, hidden_channels=128)
with torch.no_grad():
    model(x)
opt = adam(model.parameters(), lr=1e-6)
def step():
    opt.zero_grad(set_to_none=True)
    model.bits_per_dim(x, 256).mean().backward()
    opt.step()
out["glow step K8 w128 b16"] = median_time(step, step_reps, 2)
for shape in ((16, 12, 16, 16), (16, 24, 8, 8), (16, 48, 4, 4), (64, 96, 4, 4)):
    layer = ActNormInvConv2d(shape[1])
    xs = torch.randn(shape, requires_grad=True)
    with torch.no_grad():
        layer(xs)
    def op():
        y, logdet = layer(xs)
        (y.sum() + logdet.sum()).backward()
    out["actnorm+1x1 fwd+bwd " + "x".join(map(str, shape))] = median_time(op, op_reps, 20)
    c = shape[1] // 2
    xb = torch.randn(shape[0], c, *shape[2:], requires_grad=True)
    h = torch.randn(shape[0], 2 * c, *shape[2:], requires_grad=True)
    def coupling():
        y, logdet = coupling_ops.affine_coupling(xb, h)
        (y.sum() + logdet.sum()).backward()
    out["coupling fwd+bwd " + "x".join(map(str, (shape[0], c, *shape[2:])))] = median_time(
        coupling, op_reps, 20)
print(json.dumps(out))
"""


def run_child(tree, threads, step_reps, op_reps):
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()), OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(step_reps), str(op_reps)], env=env,
                            capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the old checkout (with its module built)")
    parser.add_argument("--after", default=".", help="the new checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--step-reps", type=int, default=11, help="timed Glow steps per round")
    parser.add_argument("--op-reps", type=int, default=201, help="timed op calls per case and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare-builds-cpu.json"))
    args = parser.parse_args(argv)
    rounds = []
    started, load_before = time.perf_counter(), os.getloadavg()
    for i in range(args.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        rounds.append({side: run_child(getattr(args, side), args.threads, args.step_reps, args.op_reps) for side in order})
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    cases = {}
    for case in rounds[0]["before"]:
        ratios = sorted(r["before"][case] / r["after"][case] for r in rounds)
        cases[case] = {"ratio_median": statistics.median(ratios), "ratio_min": ratios[0],
                       "ratio_max": ratios[-1], "rounds": len(ratios),
                       "before_median_ms": 1e3 * statistics.median(r["before"][case] for r in rounds),
                       "after_median_ms": 1e3 * statistics.median(r["after"][case] for r in rounds)}
        print(f"{case}: before/after {cases[case]['ratio_median']:.3f} "
              f"[{ratios[0]:.3f}, {ratios[-1]:.3f}]", flush=True)
    report = {"benchmark": "benchmarks/compare_builds.py", "threads": args.threads,
              "step_reps": args.step_reps, "op_reps": args.op_reps,
              "rounds": args.rounds, "wall_s": time.perf_counter() - started,
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "note": "ratio = time of the before checkout / time of the after checkout, per round; "
                      "median and range over the rounds (subprocesses alternate in order)",
              "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
