"""What every `deconver <step>` shares: the exit-status rule, and its "pipeline or by hand" argument checks.

The rule (docs/ARCHITECTURE.md, "Every CLI step"), the same for every step:

    0  done, or already done (a rerun with the same inputs does nothing and says so)
    1  the step failed while running: a corrupt or inconsistent input file, a prediction of the wrong
       shape, a result of an earlier step that is missing, a disk that is full
    2  a usage or configuration error, found before any work: a bad or missing argument, an unknown
       key, name or model, an input the user named (a flag's path, a study file, a dataset root) that
       does not exist

A step's ``run(args)`` raises `UsageError` (`deconver.config.ConfigError` is one) or `StepError`
(`deconver.data.DatasetError`, `EvaluationError`, `AggregateError`, `ReportError`, a broken model file)
and `run_step` turns either into one line ``deconver <step>: error: <message>`` and its status;
argparse's own errors (an unknown flag, ``--fold x``) exit 2 too. Any other exception is a bug and
keeps its traceback (exit status 1). Nothing here imports more than the standard library, so
``deconver --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

DONE, FAILED, USAGE = 0, 1, 2
EXIT_STATUS_HELP = ("exit status of every step: 0 done or already done, 1 the step failed while running, "
                    "2 a usage or configuration error (docs/ARCHITECTURE.md, \"Every CLI step\")")


class UsageError(ValueError):
    """A bad or missing argument, an unknown key or name, or an input the user named that does not exist (exit 2)."""


class StepError(Exception):
    """The step failed while running, for the reason its message names (exit 1)."""


def exit_status(err: BaseException) -> int | None:
    """The status of an error a step raised: 1 for a `StepError` (checked first: a broken model file is
    both), 2 for a `UsageError`, None for anything else (a bug: it keeps its traceback)."""
    if isinstance(err, StepError):
        return FAILED
    if isinstance(err, UsageError):
        return USAGE
    return None


def run_step(name: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``run(args)`` under the rule: its own status (0 when it returns None), or one line naming the error."""
    try:
        return int(run(args) or DONE)
    except (UsageError, StepError) as err:
        status = exit_status(err)
        message = str(err)
    except OSError as err:  # a full disk or a read-only results folder: one line, not a traceback
        from deconver.io import output_problem

        message = output_problem(err)
        if message is None:
            raise
        status = FAILED
    print(f"deconver {name}: error: {message}", file=sys.stderr)
    return status


def flag(dest: str) -> str:
    """The command-line flag of an argparse destination (``pred_dir`` -> ``--pred-dir``)."""
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value is not False and value != "" and value != []


def pipeline_mode(args: argparse.Namespace, *, pipeline: Sequence[str] = (), by_hand: Sequence[str] = (),
                  not_with_config: Sequence[str] = ()) -> bool:
    """True when ``--config`` is given (pipeline use: every argument of `pipeline` is needed, none of
    `not_with_config` allowed), False for hand use (every argument of `by_hand` is needed); a
    `UsageError` naming the missing or clashing arguments otherwise."""
    if _given(args, "config"):
        missing = [flag(d) for d in pipeline if not _given(args, d)]
        if missing:
            raise UsageError(f"--config needs {' '.join(missing)}")
        clash = [flag(d) for d in not_with_config if _given(args, d)]
        if clash:
            raise UsageError(f"give either --config (pipeline) or {' '.join(clash)} (by hand), not both")
        return True
    missing = [flag(d) for d in by_hand if not _given(args, d)]
    if missing:
        pipe = " ".join(["--config STUDY.yaml", *(flag(d) for d in pipeline)])
        raise UsageError(f"give {pipe}, or by hand {' '.join(flag(d) for d in by_hand)} "
                         f"(missing {' '.join(missing)})")
    return False


def named_input(value: str | Path | None, name: str) -> Path | None:
    """`value` (a path the user named with `name`, a flag or a config key) as a Path, None when not given;
    a `UsageError` naming both when it does not exist."""
    if value is None or value == "":
        return None
    path = Path(value)
    if not path.exists():
        raise UsageError(f"{name}: {path} does not exist")
    return path
