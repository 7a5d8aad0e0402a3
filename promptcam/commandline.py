"""Plumbing shared by the ``promptcam`` command and ``python -m promptcam.demo``.

A command is an ``add_arguments(parser)`` and a ``run(args) -> int``; heavy imports (torch)
happen inside ``run``, so ``--help`` stays fast. :func:`run_command_line` turns a failure into
one line naming the cause (exit 2 for bad input: a missing or wrong file, a bad value; 1 for
anything else); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Command", "build_parser", "error_line", "run_command_line"]

# Exit status of a run that failed on its input (argparse uses it for bad arguments, too).
BAD_INPUT = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


DEBUG_HELP = "on failure, show the traceback instead of one line"


def build_parser(
    prog: str, description: str, commands: Sequence[Command]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        # Also after the command's name; SUPPRESS keeps a --debug given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sub.set_defaults(run=command.run)
    return parser


def error_line(error: BaseException) -> str:
    """One line naming what went wrong (an OSError's message and file, not its errno)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (OSError, ValueError)):
        return text
    return f"{type(error).__name__}: {text} (--debug shows the traceback)"


def run_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command; a failure prints one line to stderr."""
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        print(f"{parser.prog} {args.command}: error: {error_line(error)}", file=sys.stderr)
        return BAD_INPUT if isinstance(error, (OSError, ValueError)) else 1
