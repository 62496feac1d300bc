"""The ablate command: the paper's Figure 3 question (reverse vs shuffle vs learned 1x1 conv) on
digits, several seeds per permutation with the same budget; writes ablation.json, .md and .png."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from .commands import report_error


ABLATION_PERMUTATIONS = ("reverse", "shuffle", "invconv_lu")
# The digits default model (glow_ext.training.config.DATASET_DEFAULTS["digits"]: dropout 0.2, logit
# preprocessing) with half its steps: 9 runs take ~10 minutes on 2 CPU cores (wall_s in
# benchmarks/results/ablation/ablation.json).
ABLATION_DEFAULTS = dict(steps=1500, K=8, L=3, hidden=64, batch_size=64, lr=2e-3, warmup=200,
                         eval_every=100)


def ablate_arguments(parser):
    d = ABLATION_DEFAULTS
    parser.add_argument("--out", default="benchmarks/results/ablation",
                        help="results folder (default benchmarks/results/ablation)")
    parser.add_argument("--permutations", default=",".join(ABLATION_PERMUTATIONS),
                        help="comma-separated (default reverse,shuffle,invconv_lu)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    parser.add_argument("--coupling", choices=("affine", "additive"), default="affine")
    parser.add_argument("--steps", type=int, default=d["steps"],
                        help=f"optimizer steps per run, the same for all (default {d['steps']})")
    parser.add_argument("--time-limit", type=float, help="also stop each run after this many seconds "
                        "(then the budgets differ in steps: the 1x1 conv is slower per step)")
    parser.add_argument("--K", type=int, default=d["K"])
    parser.add_argument("--L", type=int, default=d["L"])
    parser.add_argument("--hidden", type=int, default=d["hidden"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--warmup", type=int, default=d["warmup"])
    parser.add_argument("--eval-every", type=int, default=d["eval_every"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs-dir", help="keep each run's folder (checkpoints, metrics, samples) "
                        "here; default: a temporary folder, deleted at the end")


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _ordering(means: dict) -> dict:
    """Does learned 1x1 <= shuffle <= reverse hold (mean test bpd over seeds)?"""
    needed = ("invconv_lu", "shuffle", "reverse")
    if not all(k in means and math.isfinite(means[k]) for k in needed):
        return {"holds": None, "observed": None}
    observed = " < ".join(sorted(needed, key=lambda k: means[k]))
    holds = means["invconv_lu"] <= means["shuffle"] <= means["reverse"]
    return {"holds": holds, "observed": observed}


def run_ablation(out="benchmarks/results/ablation", permutations=ABLATION_PERMUTATIONS, seeds=(0, 1, 2),
                 coupling="affine", steps=ABLATION_DEFAULTS["steps"], time_limit=None, K=8, L=3,
                 hidden=64, batch_size=64, lr=2e-3, warmup=200, eval_every=100, device="cpu",
                 log=print, runs_dir=None) -> dict:
    """Trains every (permutation, seed) on digits with the same budget (steps, and the time limit
    if given), the rest of the digits defaults unchanged; writes ablation.json, ablation.md and
    ablation.png into `out` and returns the results. Each run's folder goes under `runs_dir`, or
    a temporary folder deleted at the end."""
    import shutil
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = None if runs_dir else tempfile.mkdtemp(prefix="glow-ablation-")
    runs_root = Path(runs_dir or scratch)
    try:
        return _run_ablation(out, runs_root, permutations, seeds, coupling, steps, time_limit, K, L,
                             hidden, batch_size, lr, warmup, eval_every, device, log)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_ablation(out, runs_root, permutations, seeds, coupling, steps, time_limit, K, L, hidden,
                  batch_size, lr, warmup, eval_every, device, log) -> dict:
    from .config import defaults_for
    from .loop import train

    runs = []
    t0 = time.perf_counter()
    for perm in permutations:
        for seed in seeds:
            config = defaults_for("digits")
            config.update(dataset="digits", K=K, L=L, hidden=hidden, coupling=coupling,
                          permutation=perm, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                          lr_decay="cosine", eval_every=eval_every, sample_every=0,
                          log_every=max(1, steps // 4), seed=seed, device=device,
                          time_limit=time_limit, out=str(runs_root / f"{perm}-seed{seed}"))
            log(f"== ablation run {len(runs) + 1}/{len(permutations) * len(seeds)}: {perm}, seed {seed}",
                file=sys.stderr)
            summary = train(config, force=True)
            metrics = [json.loads(line) for line in
                       (Path(config["out"]) / "metrics.jsonl").read_text().splitlines()]
            speeds = [m["it_per_s"] for m in metrics if m["split"] == "train" and m["step"] > 1]
            runs.append({"permutation": perm, "seed": seed, "best_test_bpd": summary["best_test_bpd"],
                         "best_step": summary["best_step"], "final_test_bpd": summary["final_test_bpd"],
                         "steps": summary["step"], "wall_s": summary["wall_s"],
                         "it_per_s": statistics.median(speeds) if speeds else None,
                         "n_params": summary["n_params"]})
    per_perm = {}
    for perm in permutations:
        rs = [r for r in runs if r["permutation"] == perm]
        best_mean, best_std = _mean_std([r["best_test_bpd"] for r in rs])
        final_mean, final_std = _mean_std([r["final_test_bpd"] for r in rs])
        per_perm[perm] = {"best_mean": best_mean, "best_std": best_std, "final_mean": final_mean,
                          "final_std": final_std,
                          "wall_s_mean": statistics.fmean(r["wall_s"] for r in rs),
                          "it_per_s_mean": statistics.fmean(r["it_per_s"] for r in rs if r["it_per_s"]),
                          "n_params": rs[0]["n_params"]}
    verdict = {"best": _ordering({k: v["best_mean"] for k, v in per_perm.items()}),
               "final": _ordering({k: v["final_mean"] for k, v in per_perm.items()})}
    digits = defaults_for("digits")
    result = {"setup": {"dataset": "digits (1500 train / 297 test, 17 levels)", "coupling": coupling,
                        "dropout": digits["dropout"], "logit_alpha": digits["logit_alpha"],
                        "K": K, "L": L, "hidden": hidden, "steps": steps, "time_limit": time_limit,
                        "batch_size": batch_size, "lr": lr, "warmup": warmup, "lr_decay": "cosine",
                        "optimizer": "adam", "eval_every": eval_every, "seeds": list(seeds),
                        "device": device},
              "runs": runs, "per_permutation": per_perm, "paper_ordering": verdict,
              "total_wall_s": time.perf_counter() - t0}
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation.md").write_text(ablation_markdown(result))
    try:
        ablation_plot(result, out / "ablation.png")
    except ImportError as e:  # matplotlib comes with the [train] extra; the tables need none
        log(f"no plot ({e}): the plot needs matplotlib", file=sys.stderr)
    return result


def ablation_markdown(result: dict) -> str:
    s = result["setup"]
    seeds = s["seeds"]
    limit = f" (time limit {s['time_limit']:g} s)" if s["time_limit"] else ""
    names = {"reverse": "reverse", "shuffle": "shuffle", "invconv_lu": "learned 1x1 conv (LU)",
             "invconv": "learned 1x1 conv (dense)"}
    lines = [
        f"# Permutation ablation on digits ({s['coupling']} coupling)", "",
        f"Glow K={s['K']} L={s['L']} hidden={s['hidden']}, {s['steps']} steps of batch {s['batch_size']} "
        f"per run{limit}, "
        f"Adam lr {s['lr']} ({s['warmup']} warm-up steps, cosine decay), coupling dropout "
        f"{s['dropout']}, logit preprocessing a={s['logit_alpha']}, test bpd every "
        f"{s['eval_every']} steps on the 297 held-out digits; device {s['device']}. "
        f"Seeds {', '.join(map(str, seeds))}. Lower is better.", "",
        "| permutation | best test bpd per seed | best: mean ± std | final test bpd: mean ± std "
        "| it/s | wall s/run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for perm, p in result["per_permutation"].items():
        per_seed = ", ".join(f"{r['best_test_bpd']:.3f}" for r in result["runs"] if r["permutation"] == perm)
        lines.append(f"| {names.get(perm, perm)} | {per_seed} | {p['best_mean']:.3f} ± {p['best_std']:.3f} "
                     f"| {p['final_mean']:.3f} ± {p['final_std']:.3f} | {p['it_per_s_mean']:.1f} "
                     f"| {p['wall_s_mean']:.0f} |")
    lines.append("")
    for kind, label in (("best", "best test bpd (held-out selection)"), ("final", "final test bpd")):
        v = result["paper_ordering"][kind]
        if v["holds"] is None:
            lines.append(f"- {label}: not all three permutations were run.")
        else:
            lines.append(f"- {label}: observed order {v['observed']} — the paper's ordering "
                         f"(learned 1x1 ≤ shuffle ≤ reverse) {'holds' if v['holds'] else 'does NOT hold'}.")
    lines.append(f"\nTotal wall time {result['total_wall_s']:.0f} s. Raw numbers: ablation.json.\n")
    return "\n".join(lines)


def ablation_plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    perms = list(result["per_permutation"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, kind in enumerate(("best", "final")):
        means = [result["per_permutation"][p][f"{kind}_mean"] for p in perms]
        stds = [result["per_permutation"][p][f"{kind}_std"] for p in perms]
        xs = [j + (i - 0.5) * 0.38 for j in range(len(perms))]
        ax.bar(xs, means, width=0.36, yerr=stds, capsize=4, label=f"{kind} test bpd",
               color=("#4c72b0", "#dd8452")[i], alpha=0.85)
        for j, p in enumerate(perms):
            vals = [r[f"{kind}_test_bpd"] for r in result["runs"] if r["permutation"] == p]
            ax.scatter([xs[j]] * len(vals), vals, color="k", s=10, zorder=3)
    values = [r[f"{k}_test_bpd"] for r in result["runs"] for k in ("best", "final")
              if r[f"{k}_test_bpd"] is not None and math.isfinite(r[f"{k}_test_bpd"])]
    if values:
        lo, hi = min(values), max(values)
        ax.set_ylim(lo - 0.3 * (hi - lo + 0.05), hi + 0.3 * (hi - lo + 0.05))
    ax.set_xticks(range(len(perms)))
    ax.set_xticklabels(perms)
    ax.set_ylabel("test bits/dim (lower is better)")
    s = result["setup"]
    ax.set_title(f"digits, {s['coupling']} coupling, K={s['K']} L={s['L']} width {s['hidden']}, "
                 f"{s['steps']} steps, {len(s['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ablate_run(args):
    from .data import DataError
    from .errors import TrainingError

    try:
        perms = [p.strip() for p in args.permutations.split(",") if p.strip()]
        for p in perms:
            if p not in ("reverse", "shuffle", "invconv_lu", "invconv"):
                raise TrainingError(f"unknown permutation {p!r}")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        run_ablation(args.out, perms, seeds, args.coupling, args.steps, args.time_limit, args.K,
                     args.L, args.hidden, args.batch_size, args.lr, args.warmup, args.eval_every,
                     args.device, runs_dir=args.runs_dir)
    except (TrainingError, DataError, ValueError) as e:
        return report_error("ablate", e)
    print((Path(args.out) / "ablation.md").read_text())
    return 0
