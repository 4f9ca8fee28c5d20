"""The `deconver` command: one subcommand per pipeline step.

Each step lives in its own module, which defines `configure(parser)` (adds the step's arguments)
and `run(args) -> int`. Modules are imported only when their subcommand runs, so `--help` is fast.
Every step exits under one rule (`deconver.steps`): 0 done or already done, 1 failed while running,
2 a usage or configuration error.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from deconver import __version__
from deconver.steps import EXIT_STATUS_HELP, USAGE, run_step

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("deconver.registry.table", "list the registered models (table or --json)"),
    "synth": ("deconver.data.synth", "write a synthetic stand-in dataset in an official layout"),
    "preset": ("deconver.data.autopreset", "print a commented dataset preset planned from the data (--from ROOT)"),
    "prepare": ("deconver.data.prepare", "preprocess a dataset once into the on-disk cache"),
    "split": ("deconver.data.split", "write the fold file of a dataset (kfold, official or the authors' folds)"),
    "protocol": ("deconver.protocol", "print the fully resolved training and evaluation recipe of a dataset"),
    "calibrate": ("deconver.cost.calibrate", "time each (dataset, model) of a study on this device"),
    "plan": ("deconver.cost.cli", "a study's runs with predicted time, device-hours and memory"),
    "train": ("deconver.engine.train", "train one (study, dataset, model, fold) run"),
    "predict": ("deconver.engine.predict", "predict a fold's validation cases (or a folder) in native space"),
    "evaluate": ("deconver.metrics.evaluate", "per-case, per-region metrics of a prediction folder"),
    "complexity": ("deconver.complexity.cli", "parameters, FLOPs (two counters), latency and memory"),
    "aggregate": ("deconver.report.aggregate", "pool per-case metrics and complexity into study tables"),
    "report": ("deconver.report.render", "render tables, figures, statistics and the HTML report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deconver",
        description="Benchmark suite for medical image segmentation centred on Deconver (arXiv:2504.00302).",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"deconver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<step>")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / version / the error and exits
        return USAGE
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    step = argparse.ArgumentParser(prog=f"deconver {name}", description=help_text)
    module.configure(step)
    args = step.parse_args(rest)  # a bad or missing flag: argparse prints it and exits 2
    return run_step(name, module.run, args)


if __name__ == "__main__":
    sys.exit(main())
