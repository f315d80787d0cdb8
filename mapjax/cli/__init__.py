"""The ``mapjax`` command: one module per subcommand, each with ``register(subparsers)`` and ``run(args)``.

    levels    per-value statistics of a reward pool          (mapjax.cli.levels)
    solve     λ for a palette, with its verdict              (mapjax.cli.solve)
    adjust    the nearest reachable palette                  (mapjax.cli.adjust)
    pool      sample a policy and score it into a pool       (mapjax.cli.pool)
    decode    MAP-D on prompts                               (mapjax.cli.decode)
    finetune  MAP-F                                          (mapjax.cli.finetune)
    evaluate  an aligned model's pool against the base's     (mapjax.cli.evaluate)
    demo      the whole procedure offline                    (mapjax.cli.demo)
    explore   a live palette explorer in the browser         (mapjax.cli.explore)

Errors a user can act on (:class:`mapjax.errors.MapjaxError`, and OS errors on a path they gave) print one line,
``mapjax <command>: error: ...``, on stderr and exit 2; a finetuning run that diverged prints its one line and
exits 1; anything else is a bug and keeps its traceback. The exit
statuses are listed in :data:`mapjax.cli.common.EXIT_STATUS_HELP` (and every ``--help``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mapjax.cli import adjust, decode, demo, evaluate, explore, finetune, levels, pool, solve
from mapjax.cli.common import EXIT_BAD_INPUT, EXIT_NOT_REACHED, EXIT_OK, EXIT_STATUS_HELP
from mapjax.errors import DivergenceError, MapjaxError

COMMANDS = (levels, solve, adjust, pool, decode, finetune, evaluate, demo, explore)

__all__ = ["EXIT_BAD_INPUT", "EXIT_NOT_REACHED", "EXIT_OK", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mapjax", description="MAP: align a language model to a palette of values.",
                                     epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mapjax`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:   # --help (0), or a command line argparse cannot read (it printed why; 2)
        return exit.code if isinstance(exit.code, int) else EXIT_BAD_INPUT
    try:
        return args.run(args)
    except DivergenceError as error:   # not bad input: the run failed, and said what it kept (exit 1)
        _refuse(args.command, str(error))
        return EXIT_NOT_REACHED
    except MapjaxError as error:
        return _refuse(args.command, str(error))
    except OSError as error:
        if error.filename is None:   # not about a path the user gave: a bug, keep the traceback
            raise
        return _refuse(args.command, f"{error.filename}: {error.strerror or error}")


def _refuse(command: str, message: str) -> int:
    print(f"mapjax {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT

