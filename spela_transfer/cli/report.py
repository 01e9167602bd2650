"""`spela-transfer report`: redraw the summary table and plots of a results folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        allow_abbrev=False,
        help="redraw summary.csv, the Markdown table and the plots of a results folder",
        description="Read RESULTS_DIR/runs.csv, rewrite summary.csv, summary.md and the plots, "
        "and print the Markdown summary.",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="folder written by `fit`")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from spela_transfer.evaluation.report import write_report

    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(
            f"results folder {str(results_dir)!r} not found; pass a folder written by "
            "spela-transfer fit"
        )
    print(write_report(results_dir), end="")
    return 0
