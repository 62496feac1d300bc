"""Command line of glow_ext: `python -m glow_ext COMMAND ...` or `glow-ext COMMAND ...`.

Each command is one entry of COMMANDS: (name, help, add_arguments(parser), run(args) -> exit code).
Its module is imported only when the command runs, so `glow-ext info` stays light. To add a command
write its two functions and append an entry. train, sample and evaluate live in
glow_ext.training.commands, ablate in glow_ext.training.ablation (the training application is the
glow_ext.training package); bench-ops in glow_ext.bench.ops, bench in glow_ext.bench.suite (its
plots and tables in glow_ext.bench.report), bench-reversible in glow_ext.bench.reversible,
bench-dropin in glow_ext.bench.dropin, bench-dropin-flows in glow_ext.bench.dropin_flows.

`pip install glow_ext` brings torch and numpy only. A command that cannot run without an optional
package is wrapped in `_needs_extra`: without the package it says, in one line, which extra to
install (exit status 2). The benchmarks need none: without matplotlib they skip their plots.
"""
import argparse
import importlib
import importlib.util
import json
import sys

# The modules each extra of pyproject.toml provides that some command cannot run without:
# scikit-learn's digits dataset, pillow for image folders and sample grids.
REQUIRED_MODULES = {"train": ("sklearn", "PIL")}


def _info_arguments(parser):
    parser.add_argument("--compact", action="store_true", help="one line instead of indented JSON")


def _info_run(args):
    import glow_ext

    print(json.dumps(glow_ext.build_info(), indent=None if args.compact else 2, sort_keys=True))
    return 0


def _lazy(module, function, exit_status=None):
    """glow_ext.<module>.<function>, imported only when called. exit_status: what to return
    instead of the function's result (for runs that return data or nothing)."""
    def call(arg):
        result = getattr(importlib.import_module(f"glow_ext.{module}"), function)(arg)
        return result if exit_status is None else exit_status
    return call


def _needs_extra(extra, run):
    """run, unless a module of REQUIRED_MODULES[extra] is missing: then one line naming the extra."""
    def checked(args):
        if any(importlib.util.find_spec(module) is None for module in REQUIRED_MODULES[extra]):
            print(f'glow-ext {args.command} needs the [{extra}] extra: pip install "glow_ext[{extra}]"',
                  file=sys.stderr)
            return 2
        return run(args)
    return checked


COMMANDS = [
    ("info", "print how the extension was built (glow_ext.build_info()) as JSON",
     _info_arguments, _info_run),
    ("bench-ops", "benchmark the fused ActNorm + LU 1x1 conv op against pure-PyTorch baselines",
     _lazy("bench.ops", "add_arguments"), _lazy("bench.ops", "run", exit_status=0)),
    ("bench", "what LU buys: logdet/inverse cost against C, the layer at Glow's level shapes, a whole "
              "Glow training step and sampling; JSON, plots and a markdown summary",
     _lazy("bench.suite", "add_arguments"), _lazy("bench.suite", "run_command")),
    ("bench-reversible", "reversible vs ordinary backprop: memory saved for backward, peak memory "
                         "and step time for K = 8, 16, 32",
     _lazy("bench.reversible", "add_arguments"), _lazy("bench.reversible", "run", exit_status=0)),
    ("bench-dropin", "a training step of rosinality- and y0ast-style Glows with their own layers "
                     "against the glow_ext.compat drop-ins, same weights",
     _lazy("bench.dropin", "add_arguments"), _lazy("bench.dropin", "run_command")),
    ("bench-dropin-flows", "each WaveGlow, Glow-TTS, RADTTS, normflows and nflows 1x1-conv drop-in "
                           "against its original at the peers' real shapes: forward, forward + "
                           "backward, inverse",
     _lazy("bench.dropin_flows", "add_arguments"), _lazy("bench.dropin_flows", "run_command")),
    ("bench-amp", "a Glow's training step and sampling in float32 and under autocast (ours and the "
                  "rosinality-style model), and the round-trip error at every level shape",
     _lazy("bench.amp", "add_arguments"), _lazy("bench.amp", "run_command")),
    ("train", "train Glow (digits by default; cifar10, a folder of images); also under torchrun",
     _lazy("training.commands", "train_arguments"),
     _needs_extra("train", _lazy("training.commands", "train_run"))),
    ("sample", "write a grid of samples from a trained checkpoint as a PNG",
     _lazy("training.commands", "sample_arguments"),
     _needs_extra("train", _lazy("training.commands", "sample_run"))),
    ("evaluate", "print the test bits/dim of a trained checkpoint",
     _lazy("training.commands", "evaluate_arguments"),
     _needs_extra("train", _lazy("training.commands", "evaluate_run"))),
    ("ablate", "permutation ablation on digits: reverse vs shuffle vs learned 1x1 conv, 3 seeds",
     _lazy("training.ablation", "ablate_arguments"),
     _needs_extra("train", _lazy("training.ablation", "ablate_run"))),
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
