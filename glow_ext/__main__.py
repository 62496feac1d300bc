"""Command line of glow_ext: `python -m glow_ext COMMAND ...` or `glow-ext COMMAND ...`.

Each command is one entry of COMMANDS: (name, help, add_arguments(parser), run(args) -> exit code).
Its module is imported only when the command runs, so `glow-ext info` stays light. To add a command
write its two functions and append an entry. train, sample, evaluate and ablate live in
glow_ext.cli (training itself in glow_ext.train, the datasets in glow_ext.data); bench-ops in
glow_ext.benchmark, bench in glow_ext.bench_suite (its plots and tables in glow_ext.bench_report),
bench-reversible in glow_ext.bench_reversible.
"""
import argparse
import importlib
import json
import sys


def _info_arguments(parser):
    parser.add_argument("--compact", action="store_true", help="one line instead of indented JSON")


def _info_run(args):
    import glow_ext

    print(json.dumps(glow_ext.build_info(), indent=None if args.compact else 2, sort_keys=True))
    return 0


def _bench_ops_arguments(parser):
    importlib.import_module("glow_ext.benchmark").add_arguments(parser)


def _bench_ops_run(args):
    importlib.import_module("glow_ext.benchmark").run(args)
    return 0


def _bench_arguments(parser):
    importlib.import_module("glow_ext.bench_suite").add_arguments(parser)


def _bench_run(args):
    return importlib.import_module("glow_ext.bench_suite").run_command(args)


def _bench_reversible_arguments(parser):
    importlib.import_module("glow_ext.bench_reversible").add_arguments(parser)


def _bench_reversible_run(args):
    importlib.import_module("glow_ext.bench_reversible").run(args)
    return 0


def _cli_arguments(name):
    return lambda parser: getattr(importlib.import_module("glow_ext.cli"), f"{name}_arguments")(parser)


def _cli_run(name):
    return lambda args: getattr(importlib.import_module("glow_ext.cli"), f"{name}_run")(args)


COMMANDS = [
    ("info", "print how the extension was built (glow_ext.build_info()) as JSON",
     _info_arguments, _info_run),
    ("bench-ops", "benchmark the fused ActNorm + LU 1x1 conv op against pure-PyTorch baselines",
     _bench_ops_arguments, _bench_ops_run),
    ("bench", "what LU buys: logdet/inverse cost against C, the layer at Glow's level shapes, a whole "
              "Glow training step and sampling; JSON, plots and a markdown summary",
     _bench_arguments, _bench_run),
    ("bench-reversible", "reversible vs ordinary backprop: memory saved for backward, peak memory "
                         "and step time for K = 8, 16, 32",
     _bench_reversible_arguments, _bench_reversible_run),
    ("train", "train Glow (digits by default; cifar10, a folder of images); also under torchrun",
     _cli_arguments("train"), _cli_run("train")),
    ("sample", "write a grid of samples from a trained checkpoint as a PNG",
     _cli_arguments("sample"), _cli_run("sample")),
    ("evaluate", "print the test bits/dim of a trained checkpoint",
     _cli_arguments("evaluate"), _cli_run("evaluate")),
    ("ablate", "permutation ablation on digits: reverse vs shuffle vs learned 1x1 conv, 3 seeds",
     _cli_arguments("ablate"), _cli_run("ablate")),
]


def build_parser():
    from glow_ext import __version__

    parser = argparse.ArgumentParser(
        prog="glow-ext", description="glow_ext: fast, exact Glow layers on fused C++/CUDA kernels.")
    parser.add_argument("--version", action="version", version=f"glow_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(_run=run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
