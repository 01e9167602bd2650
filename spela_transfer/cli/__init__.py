"""Command line entry point: `spela-transfer {extract,fit,report}`.

Each sub-command lives in its own module with `add_parser(subparsers)` and
`run(args) -> int`. This module only dispatches, sets up logging, and turns
expected errors into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from spela_transfer import LOG_FORMAT, __version__
from spela_transfer.cli import extract, fit, report
from spela_transfer.errors import SpelaTransferError

logger = logging.getLogger("spela_transfer")

# Errors a user can cause with a bad flag, file or config. They are printed as one
# line; anything else is a bug and keeps its traceback.
USER_ERRORS = (SpelaTransferError, ValueError, FileNotFoundError, NotADirectoryError, KeyError)

# Resume instructions printed when a command is interrupted, by command name.
RESUME_HINTS = {
    "extract": "complete chunks are kept; rerun the same command to resume from them",
    "fit": "finished runs are kept in runs.csv; rerun with --resume and the same --out to continue",
    "report": "nothing was lost; rerun the same command",
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spela-transfer",
        # Without this, argparse reads a prefix such as --download as --download-weights.
        allow_abbrev=False,
        description="Cache frozen-backbone features and compare SPELA, backprop and "
        "logistic-regression heads on them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (extract, fit, report):
        module.add_parser(subparsers)
    return parser


def configure_logging(debug: bool, quiet: bool) -> None:
    level = logging.INFO
    if debug:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug, args.quiet)
    try:
        return args.run(args)
    except KeyboardInterrupt as interrupt:
        # A command can put what the interrupt left behind, and how to go on, in the exception.
        hint = str(interrupt) or RESUME_HINTS[args.command]
        print(f"spela-transfer {args.command}: interrupted; {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"spela-transfer {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
