"""Plots, markdown tables and the README section of `glow-ext bench` (glow_ext.bench.suite).

Everything here reads the JSON reports the suite wrote, so `glow-ext bench --render-only` can redraw
from committed results: logdet-<device>.png (log-log cost against C with the fitted exponents),
layers-<device>.png (speed-up bars per level shape and mode, and a % of roofline panel), SUMMARY-<device>.md, and the README's section
between `<!-- bench:<device>:begin -->` and `<!-- bench:<device>:end -->`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

PARTS = ("logdet", "layers", "e2e")
PLOTS_NEED = 'plots need the [bench] extra: pip install "glow_ext[bench]"'
MODES = ("forward", "fwd+bwd", "inverse", "inverse fwd+bwd")
BASELINES = ("naive", "lu_layer", "folded", "folded_perm")
BASELINE_LABELS = {"naive": "naive (slogdet)", "lu_layer": "LU layer", "folded": "folded PyTorch",
                   "folded_perm": "folded, rows permuted by index"}
BASELINE_COLUMNS = {"naive": "vs naive", "lu_layer": "vs LU layer", "folded": "vs folded",
                    "folded_perm": "vs folded (perm)"}
METHOD_LABELS = {
    "slogdet": "slogdet", "slogdet_f64": "slogdet float64", "det": "det", "lu": "ours: H·W·(Σ logs + Σ log_s)",
    "inverse": "torch.inverse", "linalg_inv_f64": "linalg.inv float64",
    "triangular": "2 triangular solves", "ours_op": "ours: inverse op, 16 px",
    "naive_op": "naive inverse layer, 16 px",
}


def default_readme():
    """The page whose marked sections the benchmarks regenerate: the checkout's docs/performance.md."""
    return Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def add_readme_arguments(parser, section, rendered):
    """--update-readme, --readme and --render-only of a benchmark that fills the results page's
    <!-- bench:{section}:begin/end --> section and, with --render-only, `rendered` from --out."""
    parser.add_argument("--update-readme", action="store_true",
                        help=f"replace the results page's section between <!-- bench:{section}:begin --> and "
                             f"<!-- bench:{section}:end --> with the results (full results only)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="page to update (default: the checkout's docs/performance.md)")
    parser.add_argument("--render-only", action="store_true",
                        help=f"time nothing: {rendered} from the JSON in --out (and the README section "
                             "with --update-readme)")


def load_reports(out_dir, device):
    reports = {}
    for part in PARTS:
        path = Path(out_dir) / f"{part}-{device}.json"
        if path.is_file():
            reports[part] = json.loads(path.read_text())
    return reports


def render(out_dir, device, readme=None):
    """Plots and SUMMARY-<device>.md from the JSON files in out_dir, and the README section when a
    readme path is given. Returns (reports, files written)."""
    out_dir = Path(out_dir)
    reports = load_reports(out_dir, device)
    if not reports:
        raise FileNotFoundError(f"no {'/'.join(PARTS)}-{device}.json in {out_dir}")
    if readme is not None and any(r["config"]["quick"] for r in reports.values()):
        raise ValueError("the README shows full results only; these include --quick ones")
    if "layers" in reports:
        require_roofline(reports["layers"], out_dir / f"layers-{device}.json",
                         "glow-ext bench --parts layers")
    files, plots = [], []
    for part, draw in (("logdet", plot_curves), ("layers", plot_layers), ("e2e", plot_e2e)):
        if part in reports:
            try:
                files.append(draw(reports[part], out_dir / f"{part}-{device}.png"))
                plots.append(part)
            except ImportError as error:  # matplotlib comes with the [bench] extra: tables only
                print(f"no {part} plot ({error}): {PLOTS_NEED}")
    summary = out_dir / f"SUMMARY-{device}.md"
    summary.write_text(summary_markdown(reports, device, "", plots) + "\n")
    files.append(summary)
    if readme is not None:
        prefix = os.path.relpath(out_dir.resolve(), Path(readme).resolve().parent) + "/"
        update_readme(readme, device, summary_markdown(reports, device, prefix, plots))
        files.append(Path(readme))
    return reports, files


# --------------------------------------------------------------------------------------------------
# Markdown


def _ms(ms):
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _x(ratio):
    if not math.isfinite(ratio):
        return "n/a"
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _machine(report):
    m = report["machine"]
    if report["device"] == "cuda":
        return f"{m.get('gpu_name', 'GPU')} (CUDA {m.get('cuda_runtime')})"
    return f"{m['cpu_model']}, {m['torch_num_threads']} threads"


def _when(report):
    return report["date"][:10]


def _display_channels(body):
    channels = body["channels"]
    wanted = {channels[0], 48, body["fit_min_c"], channels[-1]}
    return [c for c in channels if c in wanted]


def curves_markdown(report, prefix):
    body = report
    cs = _display_channels(body)
    top = str(body["channels"][-1])
    lines = [
        f"**Log-determinant and inverse cost against C** ({_machine(report)}, {_when(report)}; "
        f"`{prefix}logdet-{report['device']}.json`). k is the exponent of time ∝ C^k, a least-squares "
        f"fit on log-log over C ≥ {body['fit_min_c']}; the logdet is the layer's, "
        f"H·W·(Σ logs + log|det W|) at 4x4 pixels.",
        "",
        "| | method | forward k | " + " | ".join(f"ms at C={c}" for c in cs)
        + f" | fwd+bwd k | fwd+bwd ms at C={top} |",
        "|---|---|---|" + "---|" * len(cs) + "---|---|",
    ]
    for curve in ("logdet", "inverse"):
        for method in body["times"][curve]["forward"]:
            fwd = body["times"][curve]["forward"][method]
            bwd = body["times"][curve]["fwd+bwd"][method]
            lines.append(
                f"| {curve} | {METHOD_LABELS.get(method, method)} | "
                f"{body['fits'][curve]['forward'][method]['slope']:.2f} | "
                + " | ".join(_ms(fwd[str(c)]["median_ms"]) for c in cs)
                + f" | {body['fits'][curve]['fwd+bwd'][method]['slope']:.2f} | {_ms(bwd[top]['median_ms'])} |")
    t = body["times"]
    lines += ["", (
        f"At C = {top}: the layer logdet by float64 slogdet takes "
        f"{_ms(t['logdet']['fwd+bwd']['slogdet_f64'][top]['median_ms'])} ms forward+backward, ours "
        f"{_ms(t['logdet']['fwd+bwd']['lu'][top]['median_ms'])} ms "
        f"({_x(t['logdet']['fwd+bwd']['slogdet_f64'][top]['median_ms'] / t['logdet']['fwd+bwd']['lu'][top]['median_ms'])}); "
        f"inverting 16 pixels takes {_ms(t['inverse']['forward']['naive_op'][top]['median_ms'])} ms "
        f"through torch.inverse, {_ms(t['inverse']['forward']['ours_op'][top]['median_ms'])} ms through "
        f"the inverse op ({_x(t['inverse']['forward']['naive_op'][top]['median_ms'] / t['inverse']['forward']['ours_op'][top]['median_ms'])}).")]
    training = body["inverse_training"]
    ratios = training["naive_op_over_ours_op"]
    below = training["channels_below_1x"]
    lines += ["", (
        "The inverse in training (forward + backward into y and every parameter, 16 pixels): naive "
        "inverse layer time / the inverse op's at C = "
        + ", ".join(f"{c}: {_x(r)}" for c, r in ratios.items())
        + (f"; below 1.0x at C = {', '.join(map(str, below))}" if below else "; never below 1.0x")
        + " (goal: >= 1.0x at every C).")]
    return lines


# Pass-through passes and training modes, each a table of its own (one would be ~25 columns wide).
NO_GRAD_MODES = ("forward", "inverse")
TRAINING_MODES = ("fwd+bwd", "inverse fwd+bwd")
ROOFLINE_NOTE = (
    "% roofline = the least time the work could take, max(flops / GEMM rate, bytes / copy "
    "bandwidth), over ours' median time, with the ceilings measured in the same run (the copy "
    "bandwidth: the faster of a 256 MB copy and x.clone() at the shape, which may run from cache); "
    "flops and bytes "
    "as `glow_ext.bench.roofline.layer_work` counts them (2·C²·N·H·W per channel mix: one per pass, "
    "two more per backward; on the folded path the C×C algebra too: 2C³/3 to assemble W, 4C³/3 "
    "for W⁻¹, 2C³ for the backward's chain rule; each image-sized tensor read or written once); "
    "bwd = the forward op's backward alone, timed as backward(retain_graph=True) on a graph built "
    "outside the timed region.")


def _mode_columns(mode, cuda):
    cols = [f"{mode} ms"] + [BASELINE_COLUMNS[b] for b in BASELINES] + ["% roofline"]
    if mode == "forward":
        cols += ["ours/copy"] + (["GB/s: ours / copy"] if cuda else [])
    if mode == "fwd+bwd":
        cols += ["bwd/fwd", "bwd % roofline"]
    return cols


def _mode_cells(results, ratios, mode, cuda):
    roof = results["roofline"]
    cells = [_ms(results[mode]["ours"]["median_ms"])] + [_x(ratios[mode][b]) for b in BASELINES]
    cells.append(f"{roof[mode]['pct']:.0f}%")
    if mode == "forward":
        cells.append(f"{1 / ratios['forward']['clone_over_ours']:.1f}")
        if cuda:
            gbps = results["bandwidth_gbps"]
            cells.append(f"{gbps['ours_forward']:.0f} / {gbps['clone']:.0f}")
    if mode == "fwd+bwd":
        cells += [f"{roof['backward']['ms'] / roof['forward']['ms']:.1f}",
                  f"{roof['backward']['pct']:.0f}%"]
    return cells


def _summary_cells(per_mode, mode, cuda):
    """A geomean row's cells for one mode; per_mode[mode][baseline] is a geomean or a ratio_summary
    entry (then with its count of shapes below 1.0x)."""
    cells = [""]
    for b in BASELINES:
        entry = per_mode[mode][b]
        if isinstance(entry, dict):
            cells.append(f"**{_x(entry['geomean'])}** ({entry['shapes_below_1x']} < 1x)")
        else:
            cells.append(f"**{_x(entry)}**")
    return cells + [""] * (len(_mode_columns(mode, cuda)) - len(cells))


def speed_tables(head, rows, summaries, cuda):
    """Markdown lines of two tables (no-grad passes, training modes) with the same rows.

    head: the leading column names; rows: [(leading cells, results, ratios)] as time_problem returns
    them; summaries: [(leading cells, {mode: {baseline: geomean or ratio_summary entry}})]."""
    lines = []
    for title, modes in (("Forward and inverse (no grad)", NO_GRAD_MODES),
                         ("Training: the pass and its backward through autograd, every parameter "
                          "and the input requiring grad", TRAINING_MODES)):
        cols = head + [c for mode in modes for c in _mode_columns(mode, cuda)]
        lines += [f"*{title}*", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for lead, results, ratios in rows:
            cells = lead + [c for mode in modes for c in _mode_cells(results, ratios, mode, cuda)]
            lines.append("| " + " | ".join(cells) + " |")
        for lead, per_mode in summaries:
            cells = lead + [c for mode in modes for c in _summary_cells(per_mode, mode, cuda)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def ceilings_line(report):
    c = report["ceilings"]
    return (f"Ceilings measured in this run: GEMM {c['gemm_gflops']['float32']:.0f} GFLOP/s float32, "
            f"{c['gemm_gflops']['float64']:.0f} GFLOP/s float64 ({c['gemm_size']}³ torch.mm), copy "
            f"{c['copy_gbps']:.1f} GB/s (bytes read + written, {c['copy_mb']} MB). " + ROOFLINE_NOTE)


def targets_lines(title, targets):
    lines = [f"{title}:", ""]
    for t in targets:
        detail = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"- {'met' if t['passed'] else '**missed**'}: {t['target']}: {t['value']:.2f}, "
                     f"goal {t['op']} {t['threshold']:g}{detail}")
    return lines


def layers_markdown(report, prefix):
    cuda = report["device"] == "cuda"
    lines = [
        f"**ActNorm + 1x1 conv at the level shapes of three Glow models** ({_machine(report)}, "
        f"{_when(report)}; `{prefix}layers-{report['device']}.json`). ms per call of ours; \"vs\" "
        "columns are baseline time / ours, from the same run: naive = ActNorm + conv2d + slogdet "
        "(torch.inverse of W, conv2d, ActNorm undone for the inverse), LU layer = W assembled from "
        "P·L·U each call (rosinality-style), folded = plain float32 PyTorch (W = P·L·U' "
        "with masks built once, ActNorm folded in, one baddbmm; autograd), folded (perm) = the same "
        "fold with W's rows permuted by indexing instead of the dense P matmul (one C×C matmul "
        "fewer: the stronger baseline at large C); ours/copy = ours time / "
        "x.clone() time, the memory floor"
        + ("; GB/s = bytes read and written by the forward pass / median time, ours and x.clone()."
           if cuda else "."),
        "",
    ]
    rows, summaries = [], []
    for name, model in report["models"].items():
        for label, s in model["per_shape"].items():
            rows.append(([f"{name} ({model['batch']})", str(s["level"]), label.replace("x", ",")],
                         s["results"], s["ratios"]))
        summaries.append(([f"**{name}**", "geomean", ""], model["geomeans"]))
    n_shapes = sum(len(m["per_shape"]) for m in report["models"].values())
    summaries.append(([f"**all {n_shapes}**", "geomean", ""], report["ratio_summary_all"]))
    lines += speed_tables(["model (batch)", "level", "N,C,H,W"], rows, summaries, cuda)
    lines += [ceilings_line(report), ""]
    lines += targets_lines(f"Training goals over the {n_shapes} level shapes", report["targets"])
    extra = report.get("cuda")
    if extra:
        bw = extra["bandwidth"]
        lines += ["", (
            f"Bandwidth at {'x'.join(map(str, bw['shape']))}: ours forward {bw['ours_forward_gbps']:.0f} GB/s "
            f"against a device copy of {bw['copy_gbps']:.0f} GB/s ({100 * bw['fraction_of_copy']:.0f}%). "
            "Host-sync check (torch.cuda.set_sync_debug_mode('error')) of forward, backward, inverse and "
            "inverse backward: "
            + ("no host synchronisation" if extra["sync_check_passed"] else "**a host synchronisation**")
            + f" at {', '.join(extra['sync_check'])}.")]
    return lines


def require_roofline(report, path, command):
    """A clear error for a report written before the roofline columns existed."""
    if "ceilings" not in report:
        raise ValueError(f"{path} predates the roofline and inverse fwd+bwd columns; re-run `{command}`")


def ops_markdown(report, link):
    """The README's bench-ops table from ops-<device>.json; link: the JSON's path as the text shows it."""
    cuda = report["device"] == "cuda"
    config = report["config"]
    lines = [
        f"<!-- generated by `glow-ext bench-ops --render-only --update-readme` from {link}; do not "
        "edit by hand -->",
        f"Measured by `glow-ext bench-ops` (`{link}`, {_when(report)}, {_machine(report)}, torch "
        f"{report['torch_version']}, {config['dtype']}; medians of {config['reps']} measurements; all "
        "methods start from the same LU parameters and are checked against each other, outputs and "
        "gradients of both training modes, before timing). \"vs\" columns are baseline time / ours: "
        "(a) *naive* = ActNorm + `conv2d` with a plain weight + `slogdet` (`torch.inverse` of W, "
        "`conv2d`, ActNorm undone for the inverse), (b) *LU layer* = the usual layer assembling "
        "`P·L·U` with two C×C matmuls per call, (c) *folded* = plain float32 PyTorch as a user would write it (masks "
        "built once, `W = P @ (lower*lmask + I) @ (upper*umask + diag(sign_s*exp(log_s)))`, ActNorm "
        "folded in, one `baddbmm`, autograd; the inverse from two triangular solves), (c') *folded "
        "(perm)* = the same fold with W's rows permuted by indexing instead of the dense P matmul "
        "(one C×C matmul fewer, so faster at large C), (d) `x.clone()`.",
        "",
    ]
    rows = [([label.replace("x", ",")], report["results"][label], report["ratios"][label])
            for label in report["results"]]
    lines += speed_tables(["shape (N,C,H,W)"], rows,
                          [([f"**geomean of {len(rows)}**"], report["ratio_summary"])], cuda)
    lines += [ceilings_line(report), ""]
    lines += targets_lines("Speed goals (the training goals last)", report["targets"])
    return "\n".join(lines)


def e2e_markdown(report, prefix):
    from . import e2e

    return e2e.markdown(report, prefix, _machine(report), _when(report))


def summary_markdown(reports, device, link_prefix="", plots=("logdet", "layers")):
    """The generated tables for one device; link_prefix is the results folder relative to the file
    the text goes into, plots the parts whose PNG exists."""
    parts = [p for p in PARTS if p in reports]
    first = reports[parts[0]]
    lines = [
        f"<!-- generated by `glow-ext bench --device {device}` from "
        + ", ".join(f"{p}-{device}.json" for p in parts) + "; do not edit by hand -->",
        f"{device.upper()} results: {_machine(first)}, torch {first['torch_version']}, float32; medians "
        f"of repeated calibrated measurements (spread in the JSON); every method was checked against "
        f"the others before timing. Regenerate with `glow-ext bench --device {device} --update-readme` "
        "(or `python benchmarks/run_all.py`).",
        "",
    ]
    if "logdet" in reports:
        lines += curves_markdown(reports["logdet"], link_prefix)
        if "logdet" in plots:
            lines += ["", f"![cost against C]({link_prefix}logdet-{device}.png)"]
        lines.append("")
    if "layers" in reports:
        lines += layers_markdown(reports["layers"], link_prefix)
        if "layers" in plots:
            lines += ["", f"![speed-ups per level shape]({link_prefix}layers-{device}.png)"]
        lines.append("")
    if "e2e" in reports:
        lines += e2e_markdown(reports["e2e"], link_prefix)
        if "e2e" in plots:
            lines += ["", f"![end to end]({link_prefix}e2e-{device}.png)"]
    return "\n".join(lines).rstrip()


def part_digest(part, report):
    """Console lines with a part's headline numbers, each starting with "<part>: " (gpu_check.sh
    copies them into its summary)."""
    if part == "logdet":
        fits = report["fits"]
        below = report["inverse_training"]["channels_below_1x"]
        lines = [f"fitted exponent k, forward / fwd+bwd, C >= {report['fit_min_c']}: " + "; ".join(
            f"{m} {fits[curve]['forward'][m]['slope']:.2f} / {fits[curve]['fwd+bwd'][m]['slope']:.2f}"
            for curve in fits for m in fits[curve]["forward"]),
            "inverse op fwd+bwd vs the naive inverse layer: below 1.0x at "
            + (f"C = {', '.join(map(str, below))}" if below else "no C")]
    elif part == "layers":
        lines = [f"{name} geomean speed-up vs naive / LU layer / folded: " + ", ".join(
            f"{mode} " + " / ".join(_x(m["geomeans"][mode][b]) for b in BASELINES) for mode in MODES)
            for name, m in report["models"].items()]
        summary = report["ratio_summary_all"]
        lines.append("all shapes, geomean (shapes below 1.0x) vs naive / LU layer / folded: " + ", ".join(
            f"{mode} " + " / ".join(f"{_x(s['geomean'])} ({s['shapes_below_1x']})"
                                    for s in (summary[mode][b] for b in BASELINES)) for mode in MODES))
        lines.append("training goals: " + "; ".join(
            f"{'met' if t['passed'] else 'MISSED'} {t['target']} {t['value']:.2f}"
            for t in report["targets"]))
        if report.get("cuda"):
            bw = report["cuda"]["bandwidth"]
            lines.append(f"ours forward {bw['ours_forward_gbps']:.0f} GB/s vs copy {bw['copy_gbps']:.0f} GB/s; "
                         f"host synchronisations: {'none' if report['cuda']['sync_check_passed'] else 'FOUND'}")
    else:
        from . import e2e

        lines = e2e.digest(report)
    return "\n".join(f"{part}: {line}" for line in lines)


# --------------------------------------------------------------------------------------------------
# README


def markers(device):
    return f"<!-- bench:{device}:begin -->", f"<!-- bench:{device}:end -->"


def replace_marked_section(text, device, content):
    """text with what lies between the device's two marker lines replaced by content."""
    begin, end = markers(device)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the README has no '{begin}' ... '{end}' section to fill")
    head = text[:start + len(begin)]
    return head + "\n" + content.strip() + "\n" + text[stop:]


def update_readme(path, device, content):
    """Rewrite only the marked section of the README (others edit the rest of the file)."""
    path = Path(path)
    new = replace_marked_section(path.read_text(), device, content)
    tmp = path.with_name(path.name + ".bench-tmp")
    tmp.write_text(new)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report, path):
    """2x2 log-log panels (logdet / inverse x forward / fwd+bwd): median ms against C, IQR as error
    bars, the fitted power law dashed over the fitted range, its exponent in the legend."""
    plt = _pyplot()
    channels = report["channels"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), dpi=110)
    for row, curve in enumerate(("logdet", "inverse")):
        for col, mode in enumerate(("forward", "fwd+bwd")):
            ax = axes[row][col]
            for method, per_c in report["times"][curve][mode].items():
                ms = [per_c[str(c)]["median_ms"] for c in channels]
                iqr = [per_c[str(c)]["iqr_ms"] / 2 for c in channels]
                fit = report["fits"][curve][mode][method]
                line = ax.errorbar(channels, ms, yerr=iqr, marker="o", markersize=3, linewidth=1,
                                   label=f"{METHOD_LABELS.get(method, method)} (k={fit['slope']:.2f})")
                if math.isfinite(fit["slope"]):
                    xs = [c for c in channels if c >= fit["min_c"]]
                    ax.plot(xs, [fit["prefactor_ms"] * c ** fit["slope"] for c in xs], "--",
                            color=line[0].get_color(), linewidth=2, alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.axvline(report["fit_min_c"], color="0.7", linewidth=0.8, linestyle=":")
            ax.set_xlabel("channels C")
            ax.set_ylabel("ms per call (median)")
            what = "logdet of ActNorm + 1x1 conv" if curve == "logdet" else "inverse"
            ax.set_title(f"{what}, {mode}", fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
            ax.grid(True, which="both", alpha=0.25)
    fig.suptitle(f"Cost against C, {_machine(report)}, torch {report['torch_version']}, {_when(report)} "
                 f"(dashed: fit on C ≥ {report['fit_min_c']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _minor_ratio_label(value, _):
    """2x, 5x, 0.2x, 0.5x ... between the decades' labels (all nine crowd a short panel)."""
    if value <= 0 or value >= 10:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}x" if leading in (2, 5) else ""


def plot_e2e(report, path):
    from . import e2e

    return e2e.plot(report, path, _pyplot)


def plot_layers(report, path):
    """One panel per mode: baseline time / ours for every level shape of every model, log scale; a
    last panel: ours' % of the roofline per mode (and the backward alone)."""
    plt = _pyplot()
    from matplotlib import ticker

    labels, rows, roofs = [], [], []
    for name, model in report["models"].items():
        for label, s in model["per_shape"].items():
            n, c, h, w = (int(v) for v in label.split("x"))
            labels.append(f"{name}\nC={c} {h}²")
            rows.append(s["ratios"])
            roofs.append(s["results"]["roofline"])
    fig, axes = plt.subplots(len(MODES) + 1, 1, figsize=(max(8.0, 0.75 * len(labels) + 2), 15), dpi=110,
                             sharex=True)
    width = 0.8 / len(BASELINES)
    for ax, mode in zip(axes, MODES):
        for i, baseline in enumerate(BASELINES):
            xs = [j + (i - (len(BASELINES) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r[mode][baseline] for r in rows], width=width * 0.95,
                   label=f"vs {BASELINE_LABELS[baseline]}")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_ratio_label))
        ax.set_ylabel("baseline time / ours")
        ax.set_title(f"{mode}: speed-up of the fused op (> 1: ours faster)", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.25)
    ax = axes[-1]
    roof_modes = MODES + ("backward",)
    roof_width = 0.8 / len(roof_modes)
    for i, mode in enumerate(roof_modes):
        xs = [j + (i - (len(roof_modes) - 1) / 2) * roof_width for j in range(len(roofs))]
        ax.bar(xs, [r[mode]["pct"] for r in roofs], width=roof_width * 0.95, label=mode,
               color=plt.cm.viridis(i / len(roof_modes)))
    ax.axhline(100.0, color="k", linewidth=0.8)
    ax.axhline(70.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_ylabel("% of roofline")
    ax.set_title("ours' time as % of the roofline (dashed: the 70% goal at C ≤ 48; backward = "
                 "the backward alone)", fontsize=10)
    ax.legend(fontsize=7, ncol=len(roof_modes), loc="upper right")
    ax.grid(True, axis="y", alpha=0.25)
    axes[-1].set_xticks(range(len(labels)))
    axes[-1].set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
    ceilings = report["ceilings"]
    fig.suptitle(f"ActNorm + 1x1 conv at Glow's level shapes, {_machine(report)}, "
                 f"torch {report['torch_version']}, {_when(report)}\nroofline ceilings measured in the "
                 f"run: GEMM {ceilings['gemm_gflops']['float32']:.0f} GFLOP/s float32, copy "
                 f"{ceilings['copy_gbps']:.0f} GB/s",
                 fontsize=10)
    # One legend above the panels, where it cannot cover a bar.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(BASELINES),
               fontsize=8, bbox_to_anchor=(0.5, 0.958))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
