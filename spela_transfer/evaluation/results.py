"""File names and columns of a results folder, shared by the runner and the report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

RUNS_FILE = "runs.csv"
DETAILS_FILE = "details.jsonl"
RUN_JSON = "run.json"
SUMMARY_FILE = "summary.csv"
CONFIG_FILE = "config.yaml"

# Files a sweep writes; `force=True` deletes only these, never the whole folder.
RESULT_FILES = (RUNS_FILE, DETAILS_FILE, RUN_JSON, SUMMARY_FILE, CONFIG_FILE, "summary.md")

RUN_KEY = ("head", "protocol", "point", "seed")
RUNS_COLUMNS = (
    "backbone",
    "dataset",
    "cache_key",
    "head",
    "protocol",
    "point",
    "test_size",
    "k_shot",
    "seed",
    "exit_layer",
    "exit_index",
    "is_output",
    "top1",
    "top5",
    "top5_note",
    "balanced_accuracy",
    "train_count",
    "test_count",
    "num_classes",
    "missing_train_classes",
    "split_hash",
    "epochs",
    "fit_seconds",
    "seeds_trained_together",
    "peak_rss_mb",
    "peak_cuda_mb",
    "finished_at",
)
# Columns that differ between two otherwise identical sweeps.
TIMING_COLUMNS = ("fit_seconds", "peak_rss_mb", "peak_cuda_mb", "finished_at")


def read_runs(out_dir: str | Path) -> pd.DataFrame:
    """Read `runs.csv` of an output folder; an empty frame when there is none.

    Raises:
        ValueError: The file is not a CSV with the columns `fit` writes.
    """
    path = Path(out_dir) / RUNS_FILE
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(RUNS_COLUMNS))
    try:
        runs = pd.read_csv(
            path, dtype={"point": str, "top5_note": str, "missing_train_classes": str}
        )
    except ValueError as error:  # pandas' ParserError and UnicodeDecodeError included
        raise ValueError(
            f"results file {str(path)!r} is not a valid CSV ({' '.join(str(error).split())}); "
            "run fit with --force to write it again"
        ) from error
    missing = [column for column in RUNS_COLUMNS if column not in runs.columns]
    if missing:
        raise ValueError(
            f"results file {str(path)!r} lacks the columns {', '.join(missing)}; "
            "run fit with --force to write it again"
        )
    return runs
