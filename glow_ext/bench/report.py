"""Plots, markdown tables and the README section of `glow-ext bench` (glow_ext.bench.suite).

Everything here reads the JSON reports the suite wrote, so `glow-ext bench --render-only` can redraw
from committed results: logdet-<device>.png (log-log cost against C with the fitted exponents),
layers-<device>.png (speed-up bars per level shape), SUMMARY-<device>.md, and the README's section
between `<!-- bench:<device>:begin -->` and `<!-- bench:<device>:end -->`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

PARTS = ("logdet", "layers", "e2e")
MODES = ("forward", "fwd+bwd", "inverse")
BASELINES = ("naive", "lu_layer", "folded")
BASELINE_LABELS = {"naive": "naive (slogdet)", "lu_layer": "LU layer", "folded": "folded PyTorch"}
METHOD_LABELS = {
    "slogdet": "slogdet", "slogdet_f64": "slogdet float64", "det": "det", "lu": "ours: H·W·(Σ logs + Σ log_s)",
    "inverse": "torch.inverse", "linalg_inv_f64": "linalg.inv float64",
    "triangular": "2 triangular solves", "ours_op": "ours: inverse op, 16 px",
    "naive_op": "naive inverse layer, 16 px",
}


def default_readme():
    return Path(__file__).resolve().parents[2] / "README.md"


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
    files, plots = [], []
    for part, draw in (("logdet", plot_curves), ("layers", plot_layers), ("e2e", plot_e2e)):
        if part in reports:
            try:
                files.append(draw(reports[part], out_dir / f"{part}-{device}.png"))
                plots.append(part)
            except ImportError as error:  # a bare GPU machine may lack matplotlib: tables only
                print(f"no {part} plot: {error}")
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
    return lines


def layers_markdown(report, prefix):
    cuda = report["device"] == "cuda"
    lines = [
        f"**ActNorm + 1x1 conv at the level shapes of three Glow models** ({_machine(report)}, "
        f"{_when(report)}; `{prefix}layers-{report['device']}.json`). ms per call of ours; the "
        "other columns are baseline time / ours, from the same run: naive = ActNorm + conv2d + slogdet "
        "(torch.inverse for the inverse), LU layer = W assembled from P·L·U each call "
        "(rosinality-style), folded = the best plain-PyTorch form; ours/copy = ours time / x.clone() "
        "time, the memory floor"
        + ("; GB/s = bytes read and written by the forward pass / median time, ours and x.clone()."
           if cuda else "."),
        "",
        "| model (batch) | level | N,C,H,W | forward ms | vs naive | vs LU layer | vs folded | ours/copy "
        + ("| GB/s: ours / copy " if cuda else "") + "| fwd+bwd ms | vs naive | vs LU layer | vs folded | inverse ms | vs naive | vs LU layer | vs folded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for name, model in report["models"].items():
        for label, s in model["per_shape"].items():
            res, rat = s["results"], s["ratios"]
            cells = []
            for mode in MODES:
                cells.append(_ms(res[mode]["ours"]["median_ms"]))
                cells += [_x(rat[mode][b]) for b in BASELINES]
                if mode == "forward":
                    cells.append(f"{1 / rat['forward']['clone_over_ours']:.1f}")
                    if cuda:
                        gbps = res["bandwidth_gbps"]
                        cells.append(f"{gbps['ours_forward']:.0f} / {gbps['clone']:.0f}")
            lines.append(f"| {name} ({model['batch']}) | {s['level']} | {label.replace('x', ',')} | "
                         + " | ".join(cells) + " |")
        gm = model["geomeans"]
        cells = []
        for mode in MODES:
            cells += [""] + [f"**{_x(gm[mode][b])}**" for b in BASELINES]
            if mode == "forward":
                cells += [""] * (2 if cuda else 1)
        lines.append(f"| **{name}** | geomean | | " + " | ".join(cells) + " |")
    extra = report.get("cuda")
    if extra:
        bw = extra["bandwidth"]
        lines += ["", (
            f"Bandwidth at {'x'.join(map(str, bw['shape']))}: ours forward {bw['ours_forward_gbps']:.0f} GB/s "
            f"against a device copy of {bw['copy_gbps']:.0f} GB/s ({100 * bw['fraction_of_copy']:.0f}%). "
            "Host-sync check (torch.cuda.set_sync_debug_mode('error')) of forward, backward, inverse and "
            f"inverse backward: {'PASS' if extra['sync_check_passed'] else 'FAIL'} at "
            f"{', '.join(extra['sync_check'])}.")]
    return lines


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
        lines = [f"fitted exponent k, forward / fwd+bwd, C >= {report['fit_min_c']}: " + "; ".join(
            f"{m} {fits[curve]['forward'][m]['slope']:.2f} / {fits[curve]['fwd+bwd'][m]['slope']:.2f}"
            for curve in fits for m in fits[curve]["forward"])]
    elif part == "layers":
        lines = [f"{name} geomean speed-up vs naive / LU layer / folded: " + ", ".join(
            f"{mode} " + " / ".join(_x(m["geomeans"][mode][b]) for b in BASELINES) for mode in MODES)
            for name, m in report["models"].items()]
        if report.get("cuda"):
            bw = report["cuda"]["bandwidth"]
            lines.append(f"ours forward {bw['ours_forward_gbps']:.0f} GB/s vs copy {bw['copy_gbps']:.0f} GB/s; "
                         f"host-sync check {'PASS' if report['cuda']['sync_check_passed'] else 'FAIL'}")
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


def plot_e2e(report, path):
    from . import e2e

    return e2e.plot(report, path, _pyplot)


def plot_layers(report, path):
    """One panel per mode: baseline time / ours for every level shape of every model, log scale."""
    plt = _pyplot()
    from matplotlib import ticker

    labels, rows = [], []
    for name, model in report["models"].items():
        for label, s in model["per_shape"].items():
            n, c, h, w = (int(v) for v in label.split("x"))
            labels.append(f"{name}\nC={c} {h}²")
            rows.append(s["ratios"])
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.75 * len(labels) + 2), 10), dpi=110, sharex=True)
    width = 0.8 / len(BASELINES)
    for ax, mode in zip(axes, MODES):
        for i, baseline in enumerate(BASELINES):
            xs = [j + (i - (len(BASELINES) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r[mode][baseline] for r in rows], width=width * 0.95,
                   label=f"vs {BASELINE_LABELS[baseline]}")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x" if v < 10 else ""))
        ax.set_ylabel("baseline time / ours")
        ax.set_title(f"{mode}: speed-up of the fused op (> 1: ours faster)", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.25)
    axes[-1].set_xticks(range(len(labels)))
    axes[-1].set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
    fig.suptitle(f"ActNorm + 1x1 conv at Glow's level shapes, {_machine(report)}, "
                 f"torch {report['torch_version']}, {_when(report)}", fontsize=10)
    # One legend above the panels, where it cannot cover a bar.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(BASELINES),
               fontsize=8, bbox_to_anchor=(0.5, 0.965))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
