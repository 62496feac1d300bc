"""Memory and speed of reversible backprop: `python -m glow_ext bench-reversible [options]`.

For K in {8, 16, 32} flow steps per level at L=3 on 3x32x32 (the paper's CIFAR-10 model, coupling
width 512), the ordinary Glow against the same weights with `reversible=True`:

  saved bytes  storages of every tensor autograd saves for backward during one forward pass
               (`glow_ext.reversible.saved_tensor_bytes`, deterministic): the activations, i.e.
               without the parameters (autograd saves those too, but they exist anyway), and in
               the JSON also the total with them
  peak memory  of a training step above the resting state (weights, gradients, Adam state):
               CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set
               (VmHWM, reset before the step) in a process whose allocator returns freed buffers
               to the OS. Every configuration runs in fresh processes, so peaks do not carry over.
  step time    one training step (forward, backward, Adam update), median over --reps after a
               warm-up step

Before timing, the gradients of the two models are compared (same weights, same batch) and the
drift of reconstructing the first level's input through K steps is measured; a gradient difference
beyond tolerance aborts the run. Writes reversible-<device>.json, .md and .png under --out, and
with --update-readme the README's generated table.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

GRAD_NORM_TOL = 1e-3  # ‖Δg‖/‖g‖ per parameter; a flipped ReLU unit shows as a local max-abs error
STEP_TIME_TARGET = 1.5
SAVED_RATIO_TARGET = 5.0
FULL = dict(ks=(8, 16, 32), hidden=512, batch=8, reps=5)
QUICK = dict(ks=(2, 4), hidden=16, batch=2, reps=2)


def build(K, hidden, batch, device, seed, reversible=False):
    """A Glow on 3x32x32 with ActNorm initialised from one batch, and a fresh batch to train on."""
    from ..models import Glow

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Glow(3, 32, K=K, L=3, hidden_channels=hidden, reversible=reversible).to(device)
    init_batch = (torch.rand(batch, 3, 32, 32, generator=generator) - 0.5).to(device)
    with torch.no_grad():
        model.train()(init_batch)
    x = (torch.rand(batch, 3, 32, 32, generator=generator) - 0.5).to(device)
    return model, x


def loss_of(model, x):
    return model.bits_per_dim(x, 256).mean()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# The memory child returns every buffer of 64 kB or more to the OS when it is freed, so its resident
# set follows the live tensors (the timing child keeps them, see glow_ext.bench.common.MALLOC_ENV).
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_one(what, K, reversible, hidden, batch, reps, device, seed):
    """what="memory": bytes saved for backward and the peak memory of a training step above the
    resting state (gradients, optimizer state and weights allocated by a first step);
    what="time": step times. Runs in a child process."""
    from ..reversible import saved_tensor_bytes

    device = torch.device(device)
    model, x = build(K, hidden, batch, device, seed, reversible)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss_of(model, x).backward()
        optimizer.step()

    step()  # allocates the gradients and the optimizer state
    _sync(device)
    if what == "memory":
        _, saved_total = saved_tensor_bytes(loss_of, model, x)
        _, saved = saved_tensor_bytes(loss_of, model, x, exclude=list(model.parameters()))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        else:
            _reset_peak_rss()
            baseline = _rss_bytes()
        step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else _peak_rss_bytes())
        return {"saved_bytes": saved, "saved_bytes_with_parameters": saved_total,
                "peak_bytes_over_baseline": max(peak - baseline, 0),
                "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda"
                else "process peak resident set (VmHWM)"}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
            "step_ms_max": 1e3 * max(times), "reps": reps}


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def agreement(K, hidden, batch, device, seed):
    """Gradients of the ordinary and the reversible model on the same weights and batch, and the
    reconstruction drift of the first level's input through its K steps (float32)."""
    device = torch.device(device)
    standard, x = build(K, hidden, batch, device, seed)
    reversible = copy.deepcopy(standard)
    reversible.reversible = True
    grads = []
    for model in (standard, reversible):
        model.zero_grad()
        loss_of(model, x).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    g_std, g_rev = grads
    norm_rel = {n: ((g_rev[n] - g_std[n]).norm() / g_std[n].norm().clamp_min(1e-30)).item() for n in g_std}
    max_rel = {n: _max_rel(g_rev[n], g_std[n]) for n in g_std}
    h = torch.nn.functional.pixel_unshuffle(x, 2)
    with torch.no_grad():
        y = h
        for step in standard.levels[0].steps:
            y, _ = step(y)
        for step in reversed(standard.levels[0].steps):
            y = step.reverse(y)
    worst = max(norm_rel, key=norm_rel.get)
    return {"K": K, "grad_norm_rel_max": norm_rel[worst], "grad_norm_rel_worst_param": worst,
            "grad_max_rel_max": max(max_rel.values()),
            "params_over_1e-4_max_rel": sum(v > 1e-4 for v in max_rel.values()),
            "n_params": len(max_rel), "reconstruction_max_rel": _max_rel(y, h)}


def _child(args):
    result = measure_one(args.child, args.K, args.mode == "reversible", args.hidden, args.batch,
                         args.reps, args.device, args.seed)
    print(json.dumps(result))


def _run_child(what, K, mode, cfg, device, seed):
    cmd = [sys.executable, "-m", "glow_ext.bench.reversible", "--child", what, "--K", str(K),
           "--mode", mode, "--hidden", str(cfg["hidden"]), "--batch", str(cfg["batch"]),
           "--reps", str(cfg["reps"]), "--device", device, "--seed", str(seed)]
    env = {**os.environ, **MEMORY_CHILD_ENV} if what == "memory" else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench-reversible: the {mode} K={K} {what} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args):
    if args.update_readme and args.quick:
        raise SystemExit("bench-reversible: --update-readme takes full results, not --quick ones")
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("hidden", "batch", "reps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.ks:
        cfg["ks"] = tuple(args.ks)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-reversible: --device cuda but no CUDA device is visible")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench-reversible on {device}: K in {cfg['ks']}, L=3, 3x32x32, width {cfg['hidden']}, "
          f"batch {cfg['batch']}, {cfg['reps']} timed steps", flush=True)

    checks = []
    for K in cfg["ks"]:
        print(f"  checking gradients K={K} ...", flush=True)
        check = agreement(K, cfg["hidden"], cfg["batch"], device, args.seed)
        checks.append(check)
        if check["grad_norm_rel_max"] > GRAD_NORM_TOL:
            raise SystemExit(f"bench-reversible: gradients disagree at K={K}: {check}")

    rows = []
    total = 2 * len(cfg["ks"])
    for i, (K, mode) in enumerate((K, m) for K in cfg["ks"] for m in ("standard", "reversible")):
        print(f"  [{i + 1}/{total}] K={K} {mode} ...", end=" ", flush=True)
        row = {"K": K, "reversible": mode == "reversible",
               **_run_child("memory", K, mode, cfg, device, args.seed),
               **_run_child("time", K, mode, cfg, device, args.seed)}
        print(f"saved {row['saved_bytes'] / 2**20:.1f} MiB, peak +{row['peak_bytes_over_baseline'] / 2**20:.1f} MiB, "
              f"step {row['step_ms_median']:.1f} ms", flush=True)
        rows.append(row)

    by = {(r["K"], r["reversible"]): r for r in rows}
    summary = []
    for K in cfg["ks"]:
        std, rev = by[K, False], by[K, True]
        summary.append({"K": K, "saved_ratio": std["saved_bytes"] / rev["saved_bytes"],
                        "peak_ratio": std["peak_bytes_over_baseline"] / max(rev["peak_bytes_over_baseline"], 1),
                        "step_time_ratio": rev["step_ms_median"] / std["step_ms_median"]})
    k_max = max(cfg["ks"])
    rev_saved = [by[K, True]["saved_bytes"] for K in cfg["ks"]]
    targets = {
        "reversible_saved_bytes_flat_in_K": len(set(rev_saved)) == 1,
        f"saved_ratio_at_K{k_max}_ge_{SAVED_RATIO_TARGET:g}": summary[-1]["saved_ratio"] >= SAVED_RATIO_TARGET,
        f"step_time_ratio_le_{STEP_TIME_TARGET:g}": all(s["step_time_ratio"] <= STEP_TIME_TARGET for s in summary),
    }
    from .common import report_header

    result = {"benchmark": "reversible", **report_header(device), "quick": bool(args.quick),
              "config": {**cfg, "ks": list(cfg["ks"]), "L": 3,
                                                     "image": [3, 32, 32], "seed": args.seed},
              "agreement": checks, "runs": rows, "summary": summary, "targets": targets}
    name = f"reversible-{device}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    written = ".json, .md"
    try:
        plot(result, out / f"{name}.png")
        written += ", .png"
    except ImportError as error:  # matplotlib comes with the [bench] extra: tables only
        from .report import PLOTS_NEED

        print(f"no plot ({error}): {PLOTS_NEED}")
    print(markdown(result))
    print(f"wrote {out / name}{written}")
    if args.update_readme:
        from .report import default_readme, update_readme

        page = args.readme or default_readme()
        update_readme(page, name, markdown(result))
        print(f"updated the {name} section of {page}")
    return result


def markdown(result):
    cfg, m = result["config"], result["machine"]
    lines = [
        f"Reversible backprop, Glow L=3 on 3x32x32, width {cfg['hidden']}, batch {cfg['batch']}, "
        f"device {result['device']} ({m.get('gpu_name') or m['cpu_model']}, {m['cpu_count']} cores, "
        f"torch {result['torch_version']}, {result['date'][:10]}).", "",
        "| K | activations saved for backward: standard | reversible | ratio | peak memory: standard | reversible "
        "| step: standard | reversible | time ratio | max grad diff (‖Δg‖/‖g‖) | input drift |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["K"], r["reversible"]): r for r in result["runs"]}
    checks = {c["K"]: c for c in result["agreement"]}
    for s in result["summary"]:
        std, rev, c = by[s["K"], False], by[s["K"], True], checks[s["K"]]
        lines.append(
            f"| {s['K']} | {std['saved_bytes'] / 2**20:.1f} MiB | {rev['saved_bytes'] / 2**20:.1f} MiB "
            f"| {s['saved_ratio']:.1f}x | {std['peak_bytes_over_baseline'] / 2**20:.0f} MiB "
            f"| {rev['peak_bytes_over_baseline'] / 2**20:.0f} MiB | {std['step_ms_median']:.0f} ms "
            f"| {rev['step_ms_median']:.0f} ms | {s['step_time_ratio']:.2f}x "
            f"| {c['grad_norm_rel_max']:.1e} | {c['reconstruction_max_rel']:.1e} |")
    lines += ["", "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                          for k, v in result["targets"].items()), ""]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [s["K"] for s in result["summary"]]
    by = {(r["K"], r["reversible"]): r for r in result["runs"]}
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for (reversible, label), color in zip(((False, "standard"), (True, "reversible")), ("C0", "C1")):
        ax_mem.plot(ks, [by[K, reversible]["saved_bytes"] / 2**20 for K in ks], "o-", color=color,
                    label=f"{label}: activations saved for backward")
        ax_mem.plot(ks, [by[K, reversible]["peak_bytes_over_baseline"] / 2**20 for K in ks], "s--",
                    color=color, label=f"{label}: peak of a step")
        ax_time.plot(ks, [by[K, reversible]["step_ms_median"] for K in ks], "o-", color=color,
                     label=label)
    ax_mem.set(xlabel="K (steps per level)", ylabel="MiB", title="memory", ylim=(0, None))
    ax_time.set(xlabel="K (steps per level)", ylabel="training step (ms, median)",
                title="step time", ylim=(0, None))
    for ax in (ax_mem, ax_time):
        ax.set_xticks(ks)
        ax.legend()
        ax.grid(alpha=0.3)
    cfg = result["config"]
    fig.suptitle(f"Glow L=3, 3x32x32, width {cfg['hidden']}, batch {cfg['batch']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser, default_out="benchmarks/results"):
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny configuration for CI ({QUICK}); write it somewhere other than the "
                        "committed results")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=default_out, help="folder for the JSON, markdown and PNG")
    parser.add_argument("--ks", type=int, nargs="+", help=f"flow steps per level (default {FULL['ks']})")
    parser.add_argument("--hidden", type=int, help=f"coupling width (default {FULL['hidden']})")
    parser.add_argument("--batch", type=int, help=f"batch size (default {FULL['batch']})")
    parser.add_argument("--reps", type=int, help=f"timed steps (default {FULL['reps']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-readme", action="store_true",
                        help="replace the <!-- bench:reversible-<device>:begin/end --> section of "
                             "docs/performance.md")
    parser.add_argument("--readme", default=None, help=argparse.SUPPRESS)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m glow_ext.bench.reversible", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--K", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("standard", "reversible"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
