"""The scripts' command lines: argparse whose errors are one line, the trainers' shared flags, and ``main``,
which turns every failure the user can fix into one ``error:`` line on stderr and exit code 2.

Only scripts import this module; ``import vqrae`` never does.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from .config import ConfigError, load_config
from .runtime.config import TrainingError
from .runtime.elastic import PREEMPTED_EXIT, Preempted


class UsageError(ValueError):
    """Bad command-line input; reported as one line and exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line) instead of printing the whole usage block."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        raise UsageError(message)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its whitespace collapsed), or its type when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


USER_ERRORS = (ValueError, OSError, TrainingError)  # ConfigError and UsageError are ValueErrors


def main(run: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """``run(argv)``; a user-fixable failure prints ``error: <one line>`` and gives exit code 2, a run stopped by a
    pre-emption signal after its checkpoint ``stopped: <one line>`` and ``PREEMPTED_EXIT`` (75), else 0."""
    try:
        run(argv)
    except Preempted as e:  # a checkpoint was written: the scheduler may requeue the job
        print(f"stopped: {one_line(e)}", file=sys.stderr)
        return PREEMPTED_EXIT
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def training_args(description: str, default_config: str, argv=None) -> argparse.Namespace:
    """The trainers' command line: ``--config``, ``--resume``, dotted overrides and the launcher's rank."""
    p = Parser(description=description)
    p.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint, if any) or a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run.steps=100 optim.lr=1e-4")
    try:
        return p.parse_args(argv)
    except UsageError as e:
        raise ConfigError(str(e)) from None


def train_command(schema: type, train: Callable, doc: str, default_config: str) -> Callable[..., None]:
    """The ``main(argv)`` of a training script: ``--config``, ``--resume`` and dotted overrides, then
    ``train(load_config(schema, ...), resume)``."""

    def main(argv: Optional[Sequence[str]] = None) -> None:
        args = training_args(doc.split("\n")[0], default_config, argv)
        train(load_config(schema, args.config, args.overrides), args.resume)

    return main


def check_model_arg(model: str, default: str) -> None:
    """A ``--model`` that is neither a folder nor a hub id (owner/name) is a ``UsageError``; the default one
    also says how to make it."""
    from .hub import is_hub_id  # a hub id resolves when the model loads

    if not os.path.isdir(model) and not is_hub_id(model):
        hint = " (train one with `bash scripts/run_demo.sh`, or pass --model DIR)" if model == default else ""
        raise UsageError(f"no model directory at '{model}'{hint}")
